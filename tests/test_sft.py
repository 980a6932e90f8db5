"""Supervised fine-tuning on Ray Train: batches cut for workers, and SFT -> RLSR on its output."""
from __future__ import annotations

import json
import subprocess
import sys

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


def _sft(out, *args):
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.sft", "tiny", "--ray.address=local",
                           f"--run.output_dir={out}", "--sft.batch_examples=8", "--sft.lr=1e-3", "--sft.save_every=2",
                           "--pools.learner.num_actors=2", "--train.zero_stage=2", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_sft_on_two_workers_resumes_exactly_and_writes_a_transformers_folder(tmp_path):
    """Two Ray Train workers (ZeRO-2) fine-tune the tiny policy three steps in one go, and two
    then one more with run.resume=auto (Ray Train's get_checkpoint on the same run name): the
    ZeRO-2 shards, RNG and data cursor come back, so the weights are bitwise equal and
    metrics.jsonl holds each step once. Plain transformers loads the result, and its weights
    moved. (RLSR from an SFT policy: tests/test_compare.py.)"""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlsr_ray.models import resolve_policy

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _sft(whole, "--sft.steps=3")
    tuned = AutoModelForCausalLM.from_pretrained(whole / "final", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_policy("tiny-random", "~/.cache/rlsr_ray"),
                                                dtype=torch.float32).state_dict()
    moved = max(float((tuned[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-4, moved

    _sft(parts, "--sft.steps=2")
    done = _sft(parts, "--sft.steps=3", "--run.resume=auto")
    assert "resumed from step 2" in done.stdout + done.stderr
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(parts / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    rows = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(list((parts / "ray_train").iterdir())) == 1  # one Ray Train run, gone on from


@pytest.mark.parametrize("uri", [False, True])
def test_resume_auto_picks_the_newest_run_that_reported_a_checkpoint(tmp_path, uri):
    """run.resume=auto lists the storage path through pyarrow (a local path or a URI) and skips
    runs that never reported a checkpoint; a fresh run gets a name of its own."""
    from rlsr_ray.config import ConfigError, load_config
    from rlsr_ray.sft import train_run_name

    for name, reported in [("sft-20261101-000000-000", True), ("sft-20261102-000000-000", True),
                           ("sft-20261103-000000-000", False)]:
        (tmp_path / name).mkdir()
        if reported:
            (tmp_path / name / "checkpoint_manager_snapshot.json").write_text("{}")
    storage = f"file://{tmp_path}" if uri else str(tmp_path)
    cfg = load_config("tiny", ["--run.resume=auto"])
    assert train_run_name(cfg, storage) == "sft-20261102-000000-000"
    fresh = train_run_name(load_config("tiny", []), storage)
    assert fresh.startswith("sft-") and not (tmp_path / fresh).exists()
    assert train_run_name(load_config("tiny", ["--run.resume=sft-20261101-000000-000"]), storage) == \
        "sft-20261101-000000-000"
    with pytest.raises(ConfigError, match="no SFT run named 'nope'"):
        train_run_name(load_config("tiny", ["--run.resume=nope"]), storage)
