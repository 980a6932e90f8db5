"""SIGKILL one actor of each pool during a `tiny` run. Ray restarts rollout, reward and reference
actors (max_restarts) and re-sends the interrupted call; the driver re-syncs a restarted rollout
actor's weights, and rebuilds a learner group that lost an actor from the newest checkpoint. The
learners are two ZeRO-2 ranks, so the group re-forms and reloads partitioned optimizer state. The
run finishes with every step recorded exactly once."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
from processes import in_own_session, titles, wait_constructed

pytestmark = pytest.mark.slow

# After step N, these actors at once: each pool recovers on its own, so two at a time cost
# no coverage and half the steps.
VICTIMS = [(2, ("RolloutActor", "RewardActor")), (4, ("ReferenceActor", "LearnerActor"))]


def _pids(class_name: str, session: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(session), "-f", f"ray::{class_name}"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _session(session: int) -> list[str]:
    """Every process still in a process session: pid and command line."""
    out = subprocess.run(["pgrep", "-a", "-s", str(session)], capture_output=True, text=True)
    return out.stdout.splitlines()


def _steps_done(path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def _running(args: list[str], out, log):
    """The driver in a session of its own (its Ray included), output to `log`; killed on the way out."""
    with in_own_session(["-m", "rlsr_ray.run", *args, f"--run.output_dir={out}"], log) as proc:
        yield proc


def _wait_steps(proc: subprocess.Popen, out, log, steps: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while _steps_done(out / "metrics.jsonl") < steps and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


# ray.address=local: a fresh Ray in the driver's session, whatever earlier tests left running.
BASE = ["tiny", "--ray.address=local", "--run.eval_before_after=false"]
ARGS = [*BASE, "--run.steps=6", "--run.save_every=1", "--rollout.max_new_tokens=48", "--train.zero_stage=2",
        "--pools.learner.num_actors=2", "--rollout.weight_sync=group"]
COMPARED = ("loss", "kl", "reward_mean", "reward_similarity_mean", "response_length_mean", "grad_norm", "policy_version")


# "async": rollouts of the next step are generated while the learners train. A rollout actor
# killed then loses a generation made on weights one version old; it is made again on the current
# weights, so from there on the run is a valid one but not the uninterrupted run's twin.
MODES = {"on_policy": [], "async": ["--algo.max_staleness=1"]}


@pytest.mark.parametrize("mode", MODES)
def test_actors_killed_mid_run_are_restarted_and_the_run_finishes(tmp_path, mode):
    args = [*ARGS, *MODES[mode]]
    straight = tmp_path / "straight"
    out = tmp_path / "chaos"
    log = tmp_path / "driver.log"
    killed = []
    # The uninterrupted run alongside, in a session (and local Ray) of its own: the victims are
    # looked up in the chaos run's session only.
    with _running(args, straight, tmp_path / "straight.log") if mode == "on_policy" else \
            contextlib.nullcontext() as reference, _running(args, out, log) as proc:
        for after_step, victims in VICTIMS:
            _wait_steps(proc, out, log, after_step)
            for victim in victims:
                pids = _pids(victim, proc.pid)
                assert pids, f"no {victim} process found"
                os.kill(pids[0], signal.SIGKILL)
                killed.append(victim)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        if reference is not None:
            assert reference.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    text = log.read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # every step exactly once
    if mode == "on_policy":
        # Retried calls, re-synced weights and the rebuilt learner reproduce the uninterrupted run.
        for ra, rb in zip([json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()], rows):
            for k in COMPARED:
                assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    else:
        assert max(r["policy_staleness"] for r in rows) == 1  # overlapped, never more than the bound
    assert killed == [v for _, pair in VICTIMS for v in pair]
    for role in ("rollout", "reward", "reference"):
        assert text.count(f"{role} actor 0 ready") == 2, role  # started, then restarted once
    assert "re-syncing weights and regenerating" in text
    # The restarted rollout actor holds no end of the weight route: found before a broadcast, that
    # sync goes through the object store, and the route reopens (again for the rebuilt learners).
    assert "restarted since the weight route opened" in text
    assert text.count("weight route open:") >= 3
    assert "pool learner: actor rank" in text and "learners restored to step" in text
    assert text.count("Started a local Ray instance") == 1  # one run, not a restart of the driver


def test_a_hung_actor_times_out_naming_step_pool_and_rank(tmp_path):
    """SIGSTOP the reward actor as soon as it is ready: Ray sees a live actor, so only the reward
    pool's call timeout can end the wait. The other pools keep ray.call_timeout_s (an hour), so
    however slow this machine's first generate is, the first call that can time out is a score."""
    out = tmp_path / "hung"
    log = tmp_path / "driver.log"
    with _running([*BASE, "--run.steps=50", "--pools.reward.call_timeout_s=5"], out, log) as proc:
        deadline = time.monotonic() + 300
        while not (ready := re.search(r"reward actor 0 ready \(pid (\d+)\)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(int(ready.group(1)), signal.SIGSTOP)
        stopped = time.monotonic()
        assert proc.wait(timeout=600) == 1, log.read_text()[-3000:]
        waited = time.monotonic() - stopped
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("rlsr_ray: error: step ") and \
        "pool reward: actor rank(s) [0] on node(s) 127.0.0.1 did not finish score within" in last, last
    assert "within 5s (pools.reward.call_timeout_s)" in last
    assert waited >= 5  # the score call was submitted after the stop, and waited its whole bound
    assert _steps_done(out / "metrics.jsonl") < 50


def test_a_learner_group_that_never_forms_ends_the_run_in_one_line_and_leaves_no_actor(tmp_path):
    """SIGSTOP one of two learners as soon as it has loaded the policy: the group it should join
    can then never form (its peer waits in the rendezvous store), and only the start-up deadline
    ends the run. Which start-up step the stop catches (the driver's wait for the constructor, the
    rendezvous or the group join) depends on timing; the line names the one it was in."""
    out = tmp_path / "unformed"
    log = tmp_path / "driver.log"
    # The other roles in the driver: two actor processes load, so the learners are constructed well
    # within the deadline even on a loaded machine, and the stop, not the load, is what it catches.
    in_driver = [f"--pools.{r}.num_actors=0" for r in ("rollout", "reward", "reference")]
    with _running([*BASE, "--run.steps=1", "--pools.learner.num_actors=2", "--ray.startup_timeout_s=30", *in_driver],
                  out, log) as proc:
        wait_constructed("LearnerActor", 1, 300, log.read_text()[-3000:])
        pid = next(p for p, t in titles() if t.startswith("ray::LearnerActor") and ".__init__" not in t)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
        waited = time.monotonic() - stopped
        lines = log.read_text().strip().splitlines()
        deadline = time.monotonic() + 30  # the session's Ray is going; its workers with it
        while (left := _session(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert re.fullmatch(r"rlsr_ray: error: pool learner: actor rank\(s\) \[[01](, 1)?\] on node\(s\) 127\.0\.0\.1 "
                        r"did not finish (start \(loading the policy \S+\)|rendezvous \(naming where the group meets\)|"
                        r"setup \(joining the learner group and building the DeepSpeed engine\)) within 30s "
                        r"\(ray\.startup_timeout_s\)", lines[-1]), lines[-1]
    assert waited < 30 + 30, waited  # the deadline, then the pools and the session's Ray shut down
    assert any("pool learner: waiting 5s on actor rank(s)" in x for x in lines), lines[-20:]
    assert left == [], left  # no actor (or any other process of the run's session) outlives it
    assert not (out / "metrics.jsonl").exists()


def test_ctrl_c_prints_one_line_with_the_newest_checkpoint_and_exits_130(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it."""
    out = tmp_path / "interrupted"
    log = tmp_path / "driver.log"
    with _running([*BASE, "--run.steps=200", "--run.save_every=1"], out, log) as proc:
        _wait_steps(proc, out, log, 2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    reached = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert last.startswith(f"rlsr_ray: interrupted after step {reached}; newest checkpoint {out}/checkpoints/step_"), last
    assert last.endswith(f"--run.resume=auto --run.output_dir={out}"), last
    assert "Traceback" not in text, text[-3000:]
