"""The Arrow contract between pools: schemas, boundary checks, and joins by key.

Rows are per sample, keyed by (group_id, sample_idx). Token ids travel as list<int32> and per-token
floats as list<float32>, unpadded; tensors are padded only where they are built. A pool returns
only the columns it adds; the actor that makes a table and the actor that reads it both check it,
and the learners join on the key, so a malformed batch fails where it was made, not three pools
later.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlsr_ray.contract.selection import MinibatchParts, contiguous, gather

KEY = ["group_id", "sample_idx"]

PROMPTS = pa.schema([
    pa.field("group_id", pa.int64(), nullable=False),  # one prompt = one GRPO group
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # chat template applied
    pa.field("reference_text", pa.string(), nullable=False),  # the human reference answer
    pa.field("prompt_text", pa.string(), nullable=False),  # the last user turn, for reward terms
    pa.field("data_json", pa.string(), nullable=False),  # the data row's other fields, a JSON object
])

ROLLOUTS = pa.schema([
    pa.field("group_id", pa.int64(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),  # 0..n-1 within the group
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("reference_text", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("data_json", pa.string(), nullable=False),
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),  # [L] generated, EOS included if produced
    pa.field("response_text", pa.string(), nullable=False),  # decoded without special tokens
    pa.field("rollout_logprobs", pa.list_(pa.float32()), nullable=False),  # [L] log pi_old(token)
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS) or "length"
    pa.field("policy_version", pa.int64(), nullable=False),  # optimizer steps behind the weights used
])

REWARDS = pa.schema([
    pa.field("group_id", pa.int64(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("reward", pa.float32(), nullable=False),  # the weighted sum of the terms (algo/terms.py)
])  # ... then one float32 column per reward term, named by it (check_rewards)

REF_LOGPROBS = pa.schema([
    pa.field("group_id", pa.int64(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("ref_logprobs", pa.list_(pa.float32()), nullable=False),  # [L] log pi_ref(token)
])

# Supervised fine-tuning rows: the prompt (chat template applied) and the reference answer's ids.
SFT = pa.schema([
    pa.field("group_id", pa.int64(), nullable=False),  # the example's index in the training split
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),  # [L] reference answer + EOS
])

# The driver's answer to a step's rewards: what the learners join onto rollouts (small: no lists).
SCORES = pa.schema(list(REWARDS) + [pa.field("advantage", pa.float32(), nullable=False)])

TRAIN = pa.schema(
    list(ROLLOUTS)
    + [f for f in REWARDS if f.name not in KEY]
    + [f for f in REF_LOGPROBS if f.name not in KEY]
    + [pa.field("advantage", pa.float32(), nullable=False)]  # group-relative, per sequence
)


class BatchError(ValueError):
    """A table that breaks the contract at a pool boundary."""


def check(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Check columns, types, nulls and per-row invariants; return the table in schema order."""
    if not isinstance(table, pa.Table):
        raise BatchError(f"{where}: expected a pyarrow.Table, got {type(table).__name__}")
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise BatchError(f"{where}: missing column(s) {missing}; has {table.column_names}")
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise BatchError(f"{where}: unexpected column(s) {extra}")
    table = table.select(schema.names)
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            raise BatchError(f"{where}: column {f.name!r} has type {col.type}, expected {f.type}")
        if col.null_count:
            raise BatchError(f"{where}: column {f.name!r} has {col.null_count} null(s)")
    table = table.cast(schema)  # carry the nullability flags of the contract
    _check_invariants(table, where)
    return table


def check_rewards(table: pa.Table, where: str) -> pa.Table:
    """check() for REWARDS: the key and `reward`, then each reward term's own float32 column."""
    if not isinstance(table, pa.Table):
        raise BatchError(f"{where}: expected a pyarrow.Table, got {type(table).__name__}")
    terms = [n for n in table.column_names if n not in REWARDS.names]
    schema = pa.schema(list(REWARDS) + [pa.field(n, pa.float32(), nullable=False) for n in terms])
    return check(table, schema, where)


def _list_lengths(table: pa.Table, name: str) -> np.ndarray:
    return pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)


def sequence_tokens(tables: Iterable[pa.Table]) -> int:
    """Prompt + response tokens of every row of `tables` (TRAIN or SFT tables), padding excluded."""
    return int(sum(_list_lengths(t, c).sum() for t in tables for c in ("prompt_ids", "response_ids")))


def _check_invariants(table: pa.Table, where: str) -> None:
    names = set(table.column_names)
    if "prompt_ids" in names and len(table) and _list_lengths(table, "prompt_ids").min() == 0:
        raise BatchError(f"{where}: empty prompt_ids")
    if "response_ids" in names:
        n_resp = _list_lengths(table, "response_ids")
        for col in ("rollout_logprobs", "ref_logprobs"):
            if col in names:
                bad = np.nonzero(_list_lengths(table, col) != n_resp)[0]
                if len(bad):
                    raise BatchError(
                        f"{where}: row {int(bad[0])}: len({col}) != len(response_ids)"
                    )
    if "finish_reason" in names:
        bad = set(table.column("finish_reason").to_pylist()) - {"stop", "length"}
        if bad:
            raise BatchError(f"{where}: finish_reason must be 'stop' or 'length', got {sorted(bad)}")
    # Non-finite rewards are the driver's to handle (it skips the step and says why); a
    # non-finite advantage can only come from a bug, so it stops the batch here.
    for col in ("advantage",):
        if col in names:
            vals = table.column(col).to_numpy()
            if not np.all(np.isfinite(vals)):
                raise BatchError(f"{where}: column {col!r} has NaN or inf")
    if set(KEY) <= names:
        keys = table.select(KEY).group_by(KEY).aggregate([([], "count_all")])
        if len(keys) != len(table):
            raise BatchError(f"{where}: duplicate (group_id, sample_idx) keys")


def join(left: pa.Table, right: pa.Table, where: str) -> pa.Table:
    """Inner join on the key; every left row must find exactly one right row. Left order is kept.

    Arrow's hash join cannot carry list columns, so only keys and row numbers are joined and the
    full rows are gathered with take().
    """
    if len(right) != len(left):
        raise BatchError(f"{where}: {len(left)} rows cannot pair with {len(right)}")
    li = left.select(KEY).append_column("__l", pa.array(np.arange(len(left)), pa.int64()))
    ri = right.select(KEY).append_column("__r", pa.array(np.arange(len(right)), pa.int64()))
    pairs = li.join(ri, KEY, join_type="inner").sort_by("__l")
    if len(pairs) != len(left):
        raise BatchError(f"{where}: key mismatch ({len(pairs)} of {len(left)} rows found a partner)")
    out = left.take(pairs.column("__l"))
    taken = right.take(pairs.column("__r"))
    for name in right.column_names:
        if name not in KEY:
            out = out.append_column(right.schema.field(name), taken.column(name))
    return out


def split(table: pa.Table, n: int) -> list[pa.Table]:
    """n contiguous, near-equal slices (whole groups are not required to stay together)."""
    return [table.slice(start, rows) for start, rows in contiguous(len(table), n)]


def assemble_train(parts: list[MinibatchParts], rollouts: tuple[pa.Table, ...], ref_logprobs: tuple[pa.Table, ...],
                   where: str) -> list[pa.Table]:
    """A learner's TRAIN mini-batches from pieces of rollout and reference tables plus SCORES,
    each input checked as it arrives (the join checks that every row finds its partner)."""
    out = []
    for p in parts:
        rows = check(gather(rollouts, p.rollouts, ROLLOUTS), ROLLOUTS, where)
        ref = check(gather(ref_logprobs, p.ref_logprobs, REF_LOGPROBS), REF_LOGPROBS, where)
        scores = check(p.scores, SCORES, where)
        out.append(join(join(rows, scores, where), ref, where))
    return out
