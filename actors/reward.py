"""Reward role: ROLLOUTS -> REWARDS, sentence-transformers embeddings + the copy penalty."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from rlsr_ray import batch
from rlsr_ray.policy import set_threads
from rlsr_ray.algo.reward import PenaltyRule, cosine_rows, rlsr_rewards
from rlsr_ray.selection import Piece, gather


class RewardActor:
    def __init__(self, model_path: str, rule: PenaltyRule, device: str = "cpu", torch_threads: int = 1,
                 batch_size: int = 64, rank: int = 0):
        from sentence_transformers import SentenceTransformer

        set_threads(torch_threads)
        self.rank, self.rule, self.batch_size = rank, rule, batch_size
        self.model = SentenceTransformer(model_path, device=device)
        self._ref_cache: dict[str, np.ndarray] = {}  # references repeat n times per step and every epoch
        # Printed to the driver's log: a second line for one rank means Ray restarted this actor.
        print(f"reward actor {rank} ready (pid {os.getpid()})", flush=True)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)

    def _reference_embeddings(self, refs: list[str]) -> np.ndarray:
        new = sorted({r for r in refs if r not in self._ref_cache})
        if new:
            self._ref_cache.update(zip(new, self._embed(new)))
        return np.stack([self._ref_cache[r] for r in refs])

    def score(self, rollouts: pa.Table) -> pa.Table:
        rollouts = batch.check(rollouts, batch.ROLLOUTS, f"reward[{self.rank}] input")
        return self.score_checked([rollouts])[0]

    def score_parts(self, selection: list[Piece], *rollouts: pa.Table) -> pa.Table:
        """score() of the rows a selection names in rollout tables passed by reference."""
        return self.score(gather(rollouts, selection, batch.ROLLOUTS))

    def score_checked(self, tables: list[pa.Table]) -> list[pa.Table]:
        """REWARDS for each of several checked ROLLOUTS tables, embedded together in one pass (the
        reward service batches requests of several runs this way; their keys may overlap)."""
        responses = [x for t in tables for x in t.column("response_text").to_pylist()]
        refs = [x for t in tables for x in t.column("reference_text").to_pylist()]
        if not responses:
            sim = np.zeros(0, np.float32)
        else:
            sim = cosine_rows(self._embed(responses), self._reference_embeddings(refs))
        reward, lcs, penalized = rlsr_rewards(sim, responses, refs, self.rule)
        out, at = [], 0
        for t in tables:
            rows = slice(at, at + len(t))
            at += len(t)
            table = pa.table({
                "group_id": t.column("group_id"), "sample_idx": t.column("sample_idx"),
                "reward": pa.array(reward[rows], pa.float32()), "similarity": pa.array(sim[rows], pa.float32()),
                "lcs_chars": pa.array(lcs[rows], pa.int32()), "lcs_penalized": pa.array(penalized[rows], pa.bool_()),
            })
            out.append(batch.check(table, batch.REWARDS, f"reward[{self.rank}] output"))
        return out
