"""End to end on real Ray: the tiny preset through all four pools, locally and via `ray job submit`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from listeners import LOOPBACK

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _check_outputs(out: Path, steps: int) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # Each step's rollouts come from the weights the previous step produced.
    assert [r["policy_version"] for r in rows] == list(range(steps))
    for r in rows:
        for k in ("reward_mean", "reward_std", "reward_similarity_mean", "reward_copy_penalty_mean", "kl", "loss",
                  "clip_fraction", "response_length_mean", "rollout_s", "reward_s", "reference_s", "train_s",
                  "weight_sync_s"):
            assert k in r, k
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["heldout"]["n"] == 8
    return summary


def test_tiny_preset_on_local_ray(tiny_run):
    out, text, secret, listeners = tiny_run
    assert "started a local Ray instance" in text
    summary = _check_outputs(out, 3)
    # The user's term (conftest.USER_TERMS) ran in the reward actor and counts with its weight:
    # a mean is linear, so with no copies the step's reward mean is the terms' weighted sum.
    for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()):
        assert r["reward_copy_penalty_mean"] == 0.0 and r["reward_brevity_mean"] > 0
        assert r["reward_mean"] == pytest.approx(r["reward_similarity_mean"] + 0.1 * r["reward_brevity_mean"], abs=1e-5)
    # Security: the Ray started here listens on loopback only, and the auth token never reaches a
    # log line or an output file.
    assert len(listeners) >= 5, listeners
    assert [(a, pid) for a, pid in listeners if a not in LOOPBACK] == []
    assert secret not in text
    # The run's extensions folder holds the lock of a comm-op build killed midway (conftest.tiny_run),
    # which every run used to wait on forever: nothing is built or waited on there, and the log says so.
    lock = out.parent / "torch_extensions" / "deepspeed_shm_comm" / "lock"
    assert f"pool learner: DeepSpeed's shared-memory comm op (deepspeed_shm_comm) is not built or loaded: gloo " \
           f"carries the learners' collectives; the build lock {lock}, left by an interrupted build, is not " \
           f"waited on" in text
    assert not [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["final_checkpoint"])
    assert model.config.num_hidden_layers == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on loopback, in its own session so teardown stops only this cluster."""
    gcs, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=6",
         "--disable-usage-stats"],
        env=ENV, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ok = subprocess.run(["ray", "job", "list", "--address", url], env={**ENV, "RAY_AUTH_MODE": "token"},
                            capture_output=True).returncode == 0
        if ok:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("ray head did not come up: " + (tmp_path / "head.log").read_text()[-2000:])
    yield url
    os.killpg(head.pid, signal.SIGKILL)  # an orderly shutdown takes ~30 s; the session is disposable
    head.wait()


def test_tiny_preset_through_ray_job_submit(ray_head, tmp_path):
    out = tmp_path / "job"
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head, "--", sys.executable, "-m", "rlsr_ray.run", "tiny",
         f"--run.output_dir={out}", "--run.steps=2"],
        env={**ENV, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "started a local Ray instance" not in proc.stdout + proc.stderr  # it joined the head
    _check_outputs(out, 2)


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "tiny", "--run.stepz=1"], env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rlsr_ray: error: unknown config key 'run.stepz'; known keys here: steps, output_dir, seed, "
        "eval_before_after, eval_max_new_tokens, save_every, keep_checkpoints, resume, progress, report_to, "
        "tracking_project, tracking_run_name, tracking_group, mlflow_tracking_uri"]


def test_bad_data_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "tiny", f"--data.path={bad}",
                           f"--run.output_dir={tmp_path / 'o'}"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"rlsr_ray: error: {bad}:2: missing field 'response'"
