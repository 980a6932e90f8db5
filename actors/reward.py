"""Reward role: ROLLOUTS -> REWARDS, the reward terms of the config (rlsr_ray/algo/terms.py)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc

from rlsr_ray.contract import batch
from rlsr_ray.algo import terms as T
from rlsr_ray.modeling.policy import set_threads
from rlsr_ray.contract.selection import Piece, gather

# Names a data field cannot take among a term's columns: they are the term's own arguments.
RESERVED = {"prompts", "responses", "references", "response_tokens", "finish_reason"}


def row_columns(rows: pa.Table) -> dict[str, list]:
    """What a term gets besides prompts, responses and references: response_tokens,
    finish_reason, and each field of the rows' data (None where a row lacks it)."""
    extras = [json.loads(x) for x in rows.column("data_json").to_pylist()]
    names = sorted({k for e in extras for k in e} - RESERVED)
    columns = {"response_tokens": pc.list_value_length(rows.column("response_ids")).to_pylist(),
               "finish_reason": rows.column("finish_reason").to_pylist()}
    columns.update({k: [e.get(k) for e in extras] for k in names})
    return columns


class RewardActor:
    def __init__(self, terms: list[T.TermSpec], device: str = "cpu", torch_threads: int = 1, rank: int = 0):
        set_threads(torch_threads)
        self.rank, self.specs = rank, list(terms)
        self.terms = [T.build(s, device) for s in self.specs]  # a class term's instance lives here
        # Printed to the driver's log: a second line for one rank means Ray restarted this actor.
        print(f"reward actor {rank} ready (pid {os.getpid()})", flush=True)

    def score(self, rollouts: pa.Table) -> pa.Table:
        rollouts = batch.check(rollouts, batch.ROLLOUTS, f"reward[{self.rank}] input")
        return self.score_checked([rollouts])[0]

    def score_parts(self, selection: list[Piece], *rollouts: pa.Table) -> pa.Table:
        """score() of the rows a selection names in rollout tables passed by reference."""
        return self.score(gather(rollouts, selection, batch.ROLLOUTS))

    def score_checked(self, tables: list[pa.Table]) -> list[pa.Table]:
        """REWARDS for each of several checked ROLLOUTS tables, scored together in one pass (the
        reward service batches requests of several runs this way; their keys may overlap)."""
        rows = pa.concat_tables(tables) if tables else batch.ROLLOUTS.empty_table()
        text = [rows.column(c).to_pylist() for c in ("prompt_text", "response_text", "reference_text")]
        columns = row_columns(rows)
        reward, scores = T.score(self.specs, self.terms, *text, columns)
        out, at = [], 0
        for t in tables:
            part = slice(at, at + len(t))
            at += len(t)
            table = pa.table({"group_id": t.column("group_id"), "sample_idx": t.column("sample_idx"),
                              "reward": pa.array(reward[part], pa.float32()),
                              **{n: pa.array(v[part], pa.float32()) for n, v in scores.items()}})
            out.append(batch.check_rewards(table, f"reward[{self.rank}] output"))
        return out
