"""Row selections over tables that stay in Ray's object store.

A pool's outputs (one table per actor, in input order) form one logical sequence of rows. The
driver knows only their lengths and names the rows each consumer needs as pieces, so tables go
from actor to actor and never through the driver; a consumer receives just the tables its pieces
read, as top-level call arguments (which Ray resolves, zero-copy, on the consumer's node).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Piece = tuple[int, int, int]  # (index of the table among those passed, first row, rows)


def pieces(sizes: list[int], ranges: list[tuple[int, int]]) -> list[Piece]:
    """Pieces of tables of these sizes covering the given (start, rows) ranges of their
    concatenation, in order; adjacent pieces of one table are merged."""
    bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    out: list[Piece] = []
    for start, rows in ranges:
        if start < 0 or rows < 0 or start + rows > bounds[-1]:
            raise ValueError(f"rows [{start}, {start + rows}) outside the {int(bounds[-1])} rows of these tables")
        while rows > 0:
            t = int(np.searchsorted(bounds, start, side="right") - 1)
            offset = start - int(bounds[t])
            take = min(rows, int(bounds[t + 1]) - start)
            if out and out[-1][0] == t and out[-1][1] + out[-1][2] == offset:
                out[-1] = (t, out[-1][1], out[-1][2] + take)
            else:
                out.append((t, offset, take))
            start, rows = start + take, rows - take
    return out


def used(selections: list[list[Piece]]) -> tuple[list[int], list[list[Piece]]]:
    """The tables some selections read, and the selections renumbered over just those (so a
    consumer is sent only the tables it needs, each once)."""
    tables = sorted({t for sel in selections for t, _, _ in sel})
    index = {t: i for i, t in enumerate(tables)}
    return tables, [[(index[t], a, n) for t, a, n in sel] for sel in selections]


def runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Row indices as (start, rows) ranges of consecutive indices, in order."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    return [(int(r[0]), len(r)) for r in np.split(rows, breaks)]


def gather(tables: tuple[pa.Table, ...] | list[pa.Table], selection: list[Piece], schema: pa.Schema) -> pa.Table:
    """The rows a selection names, as one table (zero-copy slices of the inputs)."""
    parts = [tables[t].slice(a, n) for t, a, n in selection]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def contiguous(rows: int, n: int) -> list[tuple[int, int]]:
    """n contiguous near-equal (start, rows) ranges of `rows` rows (split's arithmetic)."""
    sizes = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    return [(int(s), int(k)) for s, k in zip(starts, sizes)]


def rollout_summary(table: pa.Table) -> dict:
    """What the driver needs to know of a ROLLOUTS table without holding it (a few bytes a row)."""
    versions = table.column("policy_version")
    return {
        "rows": len(table),
        "response_lengths": pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False)
        .astype(np.int32),
        "stops": int(pc.sum(pc.equal(table.column("finish_reason"), "stop")).as_py() or 0),
        "min_version": int(pc.min(versions).as_py()) if len(table) else -1,
        "max_version": int(pc.max(versions).as_py()) if len(table) else -1,
    }


@dataclass(frozen=True)
class MinibatchParts:
    """One learner's share of one mini-batch, as pieces of the tables passed with it.

    The learner joins rollouts, reference log-probs and `scores` (key + reward columns +
    advantage, small, so sent by value) into TRAIN rows itself.
    """
    rollouts: list[Piece]  # into the rollout tables passed
    ref_logprobs: list[Piece]  # into the reference tables passed (same rows, maybe cut elsewhere)
    scores: pa.Table  # SCORES rows of the same samples
    normaliser: float  # the whole mini-batch's token (or sequence) count, over every learner
    micro_steps: int  # forward/backward passes every learner makes on it (equal on all ranks)
