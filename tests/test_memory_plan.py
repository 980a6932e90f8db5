"""The memory plan refuses what will not fit, before anything starts, in one line naming the pool,
the figure and the settings to change; the shipped GPU presets fit their cards."""
from __future__ import annotations

import subprocess
import sys

import pytest

from rlsr_ray.plan import __main__ as plan_cli
from rlsr_ray.config import load_config
from rlsr_ray.plan.memory_plan import PlanError, check

WITHOUT_FEATURES = ["--train.gradient_checkpointing=false", "--train.logprob_chunk_tokens=0"]


def test_gpu_a100_as_it_was_is_refused_and_as_shipped_fits():
    """4 x 4,096-token micro-batches on 40 GB A100s: without checkpointing and chunked log-probs the
    learner's activations alone are over the card."""
    cfg = load_config("gpu_a100", WITHOUT_FEATURES)
    with pytest.raises(PlanError) as e:
        check(cfg, cfg.model.policy)
    line = str(e.value)
    assert line.startswith("pool learner: ") and "over its 40 GB" in line and "\n" not in line
    assert "activations kept (4 x 4096 tokens)" in line and "train.gradient_checkpointing=true" in line
    shipped = load_config("gpu_a100")
    assert [p.role for p in check(shipped, shipped.model.policy)] == ["rollout", "reference", "learner"]


@pytest.mark.parametrize("preset", ["paper_qwen7b", "paper_llama8b", "paper_qwen32b"])
def test_the_paper_presets_fit_their_h100s(preset):
    cfg = load_config(preset)
    plans = check(cfg, cfg.model.policy)
    assert {p.role: p.capacity_gb for p in plans} == {"rollout": 80, "reference": 80, "learner": 80}


def test_a_vllm_engine_whose_kv_cache_cannot_hold_one_sequence_is_refused():
    """32B on one 80 GB card at 82 %: the bf16 weights leave the KV cache less than one 4,096-token
    sequence, and vLLM would refuse to start after the model had loaded."""
    cfg = load_config("paper_qwen32b", ["--rollout.vllm_tensor_parallel_size=1", "--pools.rollout.num_gpus=1",
                                        "--rollout.vllm_gpu_memory_utilization=0.82"])
    with pytest.raises(PlanError, match=r"^pool rollout: .* less than one 4096-token sequence .*"
                                        r"rollout\.vllm_tensor_parallel_size"):
        check(cfg, cfg.model.policy)


def test_the_plan_command_prints_every_pool_and_exits_1_when_one_is_over(capsys):
    assert plan_cli.main(["gpu_a100"]) == 0
    out = capsys.readouterr().out
    assert "pool learner (cuda, 40 GB device)" in out and "fits" in out and "OVER" not in out
    assert plan_cli.main(["gpu_a100", *WITHOUT_FEATURES]) == 1
    captured = capsys.readouterr()
    assert "OVER" in captured.out and captured.err.startswith("rlsr_ray: over: pool learner: ")


def test_a_run_over_its_device_is_refused_before_anything_starts(tmp_path, tiny_policy):
    """A device of 1 MB for the tiny learner: one line, exit 2, no output folder, no Ray."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "tiny", f"--run.output_dir={out}",
                           "--pools.learner.device_memory_gb=0.001"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlsr_ray: error: pool learner: ") and "over its 0.001 GB" in last, last
    assert not out.exists() and "Ray" not in proc.stderr
