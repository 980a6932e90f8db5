"""A LoRA run through the pools end to end, killed and resumed: the uninterrupted numbers again."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import in_own_session
from test_resume import COMPARED

pytestmark = pytest.mark.slow

# ZeRO-3 over two learners (each writes its share of the adapters' optimizer state, the frozen
# base partitioned too), no reference pool (the learners score under their base), one step of
# rollouts generated ahead, the adapters broadcast over the weight route (gloo here); the object
# store's path for them is tests/test_lora.py's.
ARGS = ["tiny", "--run.steps=3", "--run.save_every=1", "--train.lora.enabled=true", "--train.lora.rank=4",
        "--pools.reference.num_actors=0", "--train.zero_stage=3", "--pools.learner.num_actors=2",
        "--algo.max_staleness=1", "--rollout.weight_sync=group", "--ray.address=local"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted output dir, resumed output dir, the resumed run's stderr)."""
    tmp = tmp_path_factory.mktemp("lora_run")
    straight, killed = tmp / "straight", tmp / "killed"
    with in_own_session(["-m", "rlsr_ray.run", *ARGS, f"--run.output_dir={straight}"], tmp / "straight.log") as ref:
        proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.run", *ARGS, f"--run.output_dir={killed}"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        marker = killed / "checkpoints" / "step_1" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert marker.exists(), "the run never reached its first checkpoint"
        assert ref.wait(timeout=600) == 0, (tmp / "straight.log").read_text()[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "rlsr_ray.run", *ARGS, f"--run.output_dir={killed}",
                              "--run.resume=auto"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return straight, killed, resumed.stderr


def test_a_lora_run_trains_adapters_and_syncs_only_them(runs, tiny_policy):
    from safetensors.torch import load_file

    straight, _, _ = runs
    rows = _rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3]
    adapter = load_file(str(straight / "checkpoints" / "step_3" / "adapter_model.safetensors"))
    adapter_mb = sum(t.numel() * 4 for t in adapter.values()) / 1e6  # float32 on the wire
    for r in rows:
        assert r["weight_sync_mb"] == pytest.approx(adapter_mb)  # the adapters, not the 2-layer policy
        assert r["weight_sync_path"] == "group"
        assert math.isfinite(r["reward_similarity_mean"]) and "reward_copy_penalty_mean" in r
        assert r["learner_reference_s"] > 0 and "actors_reference" not in r  # no reference pool
    # The policy moves away from its base (the reference), which a KL of exactly 0 would deny.
    assert rows[-1]["kl"] > 0 and rows[-1]["grad_norm"] > 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["merged_model"] == str(straight / "checkpoints" / "step_3" / "merged")


def test_the_final_adapter_and_merged_folder_load_with_peft_and_transformers(runs, tiny_policy):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = runs[0] / "checkpoints" / "step_3"
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged"))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy), str(final))
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    # The merge folds (B A) x scale into W: the same sum in another order, float32 rounding of
    # logits of order 1 through two layers, far below a trained adapter's effect.
    assert torch.allclose(a, b, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    with torch.no_grad():
        assert (base(ids).logits - a).abs().max() > 1e-4


def test_a_killed_lora_run_resumes_exactly(runs):
    straight, killed, stderr = runs
    assert "resumed from" in stderr
    a, b = _rows(straight), _rows(killed)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
