"""Supervised fine-tuning on Ray Train: batches cut for workers, and SFT -> RLSR on its output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from rlsr_ray import batch
from rlsr_ray.sft import worker_shares


def test_a_global_batch_is_length_sorted_and_split_over_workers():
    lengths = [(3, 9), (1, 1), (2, 4), (5, 5), (1, 2)]  # (prompt, answer) tokens
    rows = pa.table({"group_id": pa.array(range(5), pa.int64()),
                     "prompt_ids": pa.array([[7] * p for p, _ in lengths], pa.list_(pa.int32())),
                     "response_ids": pa.array([[8] * r for _, r in lengths], pa.list_(pa.int32()))})
    shares, tokens, passes = worker_shares(batch.check(rows, batch.SFT, "t"), [0, 1, 2, 3, 4], 2, 2)
    assert [s.column("group_id").to_pylist() for s in shares] == [[1, 4, 2], [3, 0]]  # totals 2 3 6 | 10 12
    assert tokens == 21.0  # every answer token of the batch: the normaliser on both workers
    assert passes == 2  # 3 rows in micro-batches of 2


@pytest.mark.slow
def test_sft_on_two_workers_writes_a_policy_that_rlsr_starts_from(tmp_path):
    """Two Ray Train workers (ZeRO-2) fine-tune the tiny policy; plain transformers loads the
    result, its weights moved, and `rlsr_ray.run` trains from it with it as the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlsr_ray.models import resolve_policy

    out = tmp_path / "sft"
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.sft", "tiny", "--ray.address=local",
                           f"--run.output_dir={out}", "--sft.steps=3", "--sft.batch_examples=8", "--sft.lr=1e-3",
                           "--pools.learner.num_actors=2", "--train.zero_stage=2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = out / "final"
    tuned = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_policy("tiny-random", "~/.cache/rlsr_ray"),
                                                dtype=torch.float32).state_dict()
    moved = max(float((tuned[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-4, moved

    rl = tmp_path / "rl"
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "tiny", "--ray.address=local", "--run.steps=1",
                           "--run.eval_before_after=false", f"--model.policy={final}", f"--run.output_dir={rl}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((rl / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["reference_policy"] == str(final.resolve())
    assert np.isfinite(json.loads((rl / "metrics.jsonl").read_text().splitlines()[0])["kl"])
