"""Kill the driver mid-run, resume with --run.resume=auto, and match an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import in_own_session

pytestmark = pytest.mark.slow

ARGS = ["tiny", "--run.steps=4", "--run.save_every=1", "--run.keep_checkpoints=2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
COMPARED = ("loss", "pg_loss", "kl", "reward_mean", "reward_std", "reward_similarity_mean", "clip_fraction",
            "response_length_mean", "grad_norm", "policy_version", "policy_staleness", "groups_dropped",
            "refill_prompts", "train_groups")


# One layout with all the state a resume must bring back: ZeRO-3 over two learners stores a
# partition per rank and restores parameters from them; rollouts generated up to 2 steps ahead
# (saved with each checkpoint); dynamic sampling refilling dropped groups from further prompts
# (past the saved data cursor). A single ZeRO-0 optimizer copy comes back in tests/test_actors.py
# (test_checkpoint_restores_training_exactly).
LAYOUT = ["--train.zero_stage=3", "--pools.learner.num_actors=2", "--algo.max_staleness=2",
          "--algo.dynamic_sampling=true", "--algo.group_spread_rtol=0.5"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsr_ray.run", *ARGS, f"--run.output_dir={out}", *extra],
                          env=ENV, capture_output=True, text=True, timeout=600)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_driver_resumes_exactly(tmp_path):
    extra = [*LAYOUT, "--ray.address=local"]  # each run its own Ray: the two below run side by side
    straight = tmp_path / "straight"
    # The uninterrupted run, asked to resume where there is nothing to resume: it starts fresh.
    killed = tmp_path / "killed"
    with in_own_session(["-m", "rlsr_ray.run", *ARGS, f"--run.output_dir={straight}", *extra, "--run.resume=auto"],
                        tmp_path / "straight.log") as reference:
        # Own session: SIGKILL reaches the driver and the Ray processes it started, as when a node dies.
        proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.run", *ARGS, *extra, f"--run.output_dir={killed}"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        marker = killed / "checkpoints" / "step_2" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert marker.exists(), "the run never reached its second checkpoint"
        assert not (killed / "checkpoints" / "step_4").exists()
        assert reference.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert "no complete checkpoint" in (tmp_path / "straight.log").read_text()

    resumed = _run(killed, *extra, "--run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _rows(straight), _rows(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # every step exactly once
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step_3", "step_4"]  # retention: the newest two
    assert [r["policy_staleness"] for r in b] == [0, 1, 2, 2]  # never over the bound, and reaching it
    assert sum(r["groups_dropped"] for r in b) > 0 and sum(r["refill_prompts"] for r in b) > 0
    state = json.loads((killed / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["pending_steps"] == [3]  # the last step's rollouts, generated ahead


def test_partial_checkpoint_is_rejected_in_one_line(tmp_path):
    out = tmp_path / "partial"
    bad = out / "checkpoints" / "step_3"
    bad.mkdir(parents=True)
    (bad / "trainer_state.json").write_text('{"format": 1, "step": 3}')
    proc = _run(out, f"--run.resume={bad}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"rlsr_ray: error: {bad / 'trainer_state.json'}: missing field 'policy_version'"
