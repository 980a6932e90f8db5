"""Elastic pools on a real multi-node Ray: a node holding a learner rank leaves mid-run, and the
run goes on with a smaller learner group from its newest checkpoint, every step once; a node holding
a rollout actor leaves and another arrives, and the rollout pool goes 2 -> 1 -> 2 without losing a
sample.

Ray's own test cluster (ray.cluster_utils.Cluster): a head and two worker raylets on this
machine, all on 127.0.0.1, each worker with one `learner_slot`; remove_node kills a raylet and
every process on it, as a lost machine does.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from processes import held, titles, wait_constructed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    patched = pytest.MonkeyPatch()  # module-scoped: pytest's monkeypatch fixture is per test
    patched.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # several raylets, all on loopback
    # A dead node is noticed within ~2 s (Ray's default: up to 15 s of missed health checks).
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
              # The tiny runs' rollout tables kept in the object store of the node that made them
              # (not inlined in the driver, as tables under 100 KB are by default): lost with it.
              "max_direct_call_object_size": 256}
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=3, node_ip_address="127.0.0.1",
                                                          include_dashboard=False, _system_config=system))
    nodes = [c.add_node(num_cpus=1, resources={"learner_slot": 1}, node_ip_address="127.0.0.1") for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        c.shutdown()
        patched.undo()


def test_a_learner_node_leaves_the_run_goes_on_with_fewer_learners_and_grows_back(cluster, tmp_path):
    """Two ZeRO-2 learners, one node each: one node is removed, the group goes on with one learner
    from the newest checkpoint; a node is added back, and at the next checkpoint the group grows
    to two again from that checkpoint (pools.learner.max_actors opts in), re-partitioning the
    optimizer state 2 -> 1 -> 2."""
    c, nodes = cluster
    out = tmp_path / "run"
    log = tmp_path / "driver.log"
    args = ["tiny", f"--ray.address={c.address}", "--run.steps=4", "--run.save_every=1", "--run.progress=false",
            "--run.eval_before_after=false", f"--run.output_dir={out}", "--train.zero_stage=2",
            "--pools.learner.num_actors=2", "--pools.learner.min_actors=1", "--pools.learner.max_actors=2",
            "--pools.learner.max_restarts=1",
            "--pools.learner.shrink_after_s=5", "--pools.learner.resources={learner_slot: 1}",
            "--pools.learner.num_cpus=1"]
    proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.run", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        marker = out / "checkpoints" / "step_1" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), log.read_text()[-3000:]
        c.remove_node(nodes[1], allow_graceful=False)  # one learner rank, and its node, gone
        while not any(r["learners"] == 1 for r in _rows(out / "metrics.jsonl")):  # a step on one learner
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        with held(proc.pid):  # while a node comes back, so the run cannot end first
            nodes[1] = c.add_node(num_cpus=1, resources={"learner_slot": 1}, node_ip_address="127.0.0.1")
            c.wait_for_nodes()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], text[-3000:]  # every step once
    # Two learners up to the step the loss was noticed at, one until the checkpoint after the node
    # came back (the driver may have passed one more checkpoint before it was held), two after.
    sizes = [r["learners"] for r in rows]
    assert sizes[0] == 2 and sizes[-1] == 2 and [(a, b) for a, b in zip(sizes, sizes[1:]) if a != b] == \
        [(2, 1), (1, 2)], sizes
    assert "learner group of 2 not placed" in text and "learner group rebuilt with 1 learner(s)" in text
    # Grown at a checkpoint, from that very checkpoint: nothing done again.
    grown = re.search(r"step (\d+): room for 1 more learner\(s\) at a checkpoint", text)
    assert grown and f"learners restored to step {grown.group(1)} from" in text.split(grown.group(0))[1], text[-3000:]
    assert sizes.index(2, sizes.index(1)) == int(grown.group(1))  # the first step after that checkpoint, on two
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["optimizer"] == {"zero_stage": 2, "shards": 2}  # one rank's state, loaded on two


def _hold(classes: tuple[str, ...], proc: subprocess.Popen, timeout_s: float = 120) -> list[int]:
    """SIGSTOP one actor process of each class as soon as it is seen (during its construction)."""
    held: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(held) < len(classes):
        assert proc.poll() is None and time.monotonic() < deadline, f"only {sorted(held)} seen"
        for pid, title in titles():
            cls = title.removeprefix("ray::").split(".")[0]
            if cls in classes and cls not in held:
                os.kill(pid, signal.SIGSTOP)
                held[cls] = pid
        time.sleep(0.02)
    return list(held.values())


def _wait_generated(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until both rollout actors have generated and sit idle (their scoring is held)."""
    seen, idle_since = False, None
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "no generation finished"
        rollout = [t for _, t in titles() if t.startswith("ray::RolloutActor")]
        if any(".generate" in t for t in rollout):
            seen, idle_since = True, None
        elif seen and rollout == ["ray::RolloutActor"] * 2:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return
        time.sleep(0.05)


def _rows(path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return []


def test_a_rollout_node_leaves_another_joins_and_a_draining_learner_node_costs_no_step(cluster, tmp_path):
    """One run, three events. A rollout node is removed after generating step 1 and before its
    tables are read: they are generated again, and the rollout pool goes on with one actor, no
    sample lost or scored 0. A node is added back: the replacement joins at a weight sync and
    generates with the current weights (2 -> 1 -> 2). `ray drain-node` with a deadline on the node
    of one of two ZeRO-2 learners: a checkpoint of the steps done is written and the group rebuilt on
    the other node from it before the node goes, so no step is done again."""
    c, _ = cluster
    rollout_slot = {"num_cpus": 1, "resources": {"rollout_slot": 1}, "node_ip_address": "127.0.0.1"}
    drain_slot = {"num_cpus": 1, "resources": {"drain_slot": 1}, "node_ip_address": "127.0.0.1"}
    rollout_nodes = [c.add_node(**rollout_slot) for _ in range(2)]
    doomed, _kept = c.add_node(**drain_slot), c.add_node(**drain_slot)  # a learner on each
    c.wait_for_nodes()
    out = tmp_path / "run"
    log = tmp_path / "driver.log"
    metrics = out / "metrics.jsonl"
    steps = 8
    args = ["tiny", f"--ray.address={c.address}", f"--run.steps={steps}", "--run.save_every=0",
            "--run.progress=false", "--run.eval_before_after=false", f"--run.output_dir={out}",
            "--pools.rollout.num_actors=2", "--pools.rollout.min_actors=1", "--pools.rollout.max_actors=2",
            "--pools.rollout.resources={rollout_slot: 1}", "--pools.rollout.num_cpus=0", "--train.zero_stage=2",
            "--pools.learner.num_actors=2", "--pools.learner.min_actors=1", "--pools.learner.shrink_after_s=5",
            "--pools.learner.resources={drain_slot: 1}", "--pools.learner.num_cpus=0"]
    proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.run", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_for(what, ok, timeout_s=300):
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            if ok(_rows(metrics), log.read_text()):
                return
            time.sleep(0.2)
        raise AssertionError(f"waiting for {what}: rc={proc.poll()}\n{log.read_text()[-3000:]}")

    try:
        # The reward and reference actors held (SIGSTOP) from their construction on, so that step 1's
        # rollout tables, once generated, wait unread in the rollout nodes' object stores.
        readers = _hold(("RewardActor", "ReferenceActor"), proc)
        try:
            _wait_generated(proc)
            c.remove_node(rollout_nodes[1], allow_graceful=False)  # a rollout actor, its node and tables, gone
        finally:
            for pid in readers:
                os.kill(pid, signal.SIGCONT)
        wait_for("a step with one rollout actor", lambda rows, _: any(r["actors_rollout"] == 1 for r in rows))
        # The driver is held while room comes back, the replacement (asked for when the actor was
        # lost) is placed and constructed, and the drain notice is given: the run cannot end first.
        with held(proc.pid):
            c.add_node(**rollout_slot)
            wait_constructed("RolloutActor", 2, 120, "the replacement rollout actor never started")
            subprocess.run(["ray", "drain-node", f"--address={c.address}", f"--node-id={doomed.node_id}",
                            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot instance reclaimed",
                            "--deadline-remaining-seconds=120"], check=True, capture_output=True, timeout=60)
        wait_for("the checkpoint ahead of the drain", lambda _, text: "ahead of a learner node's drain" in text)
        c.remove_node(doomed, allow_graceful=False)  # the deadline: the node goes
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), text[-3000:]  # every step once
    sizes = [r["actors_rollout"] for r in rows]
    assert sizes[-1] == 2 and [a for a, b in zip(sizes, sizes[1:]) if a != b] == [1], sizes
    # Step 1's tables, lost with their node before they were read, were generated again (the lost
    # actor's share by the other actor) rather than failing the step or scoring anything 0.
    assert re.search(r"pool (reward|reference): an input of actor rank 0's (score|logprobs) was lost with its node.*; "
                     r"generating those rollouts again", text), text[-3000:]
    # Every step generated and scored all its samples: none lost, none scored 0 for a lost actor.
    want = 4 * 2  # tiny: prompts_per_step x samples_per_prompt
    assert all(r["samples"] == want and "skipped" not in r for r in rows), rows
    # One loss, one join. Whether the loss is noticed in a generation (its share sent again to the
    # other actor) or in a weight load (nothing to send again) depends on timing: test_membership.py
    # checks the re-sending itself.
    assert sum(r["membership_events"] for r in rows) == 2, rows
    # The joining actor started from the current weights: no generation came back stale.
    assert all(r["policy_staleness"] == 0 for r in rows) and "came back with policy version" not in text
    assert "pool rollout: actor 2 joined" in text and re.search(r"pool rollout: actor [01] lost", text), text[-3000:]
    nodes = [r["nodes"] for r in rows]
    # Step 1 already without the lost rollout node; then a node back; at the end the drained one gone.
    assert nodes[0] + 1 in nodes and nodes[-1] == nodes[0], nodes
    # The drain: a checkpoint at the step reached, restored at that very step: nothing done again.
    saved = re.search(r"step (\d+): checkpoint written in [\d.]+s ahead of a learner node's drain", text)
    assert saved and f"learners restored to step {saved.group(1)} from" in text, text[-3000:]
    assert "pool learner: actor rank" not in text and "did not finish" not in text, text[-3000:]  # no learner died
    learners = [r["learners"] for r in rows]
    assert learners[0] == 2 and learners[-1] == 1, learners
    state = json.loads((out / "checkpoints" / f"step_{steps}" / "trainer_state.json").read_text())
    assert state["optimizer"] == {"zero_stage": 2, "shards": 1}



class _Maker:
    """Makes an object big enough for the object store of its node (not inlined in the caller)."""

    def __init__(self, rank: int = 0):
        pass

    def make(self, n: int):
        import numpy as np

        return np.ones(n, np.float32)


class _Reader:
    def __init__(self, rank: int = 0):
        pass

    def read(self, array) -> float:
        return float(array.sum())

    def work(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_an_input_lost_with_its_node_is_reported_as_such(cluster):
    """A table made on a node that is gone before another actor reads it: the reading call fails
    with InputLost naming the pool, rank and call (a step then generates those rollouts again;
    learners go back to a checkpoint), not with an error taken for the reader's own failure."""
    import ray
    from ray import cloudpickle

    from actors.pool import InputLost, Pool
    from rlsr_ray.config import PoolConfig
    from rlsr_ray.driver.ray_session import single_node_mode

    c, _ = cluster
    maker_node = c.add_node(num_cpus=1, resources={"maker_slot": 1}, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    single_node_mode()  # this process imported ray before the cluster's loopback setting: apply it
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        maker = Pool("rollout", _Maker, PoolConfig(num_actors=1, num_cpus=0, resources={"maker_slot": 1}), {},
                     placement_timeout_s=60, call_timeout_s=60)
        reader = Pool("reward", _Reader, PoolConfig(num_actors=1, num_cpus=0.5), {}, placement_timeout_s=60,
                      call_timeout_s=60)
        (table,) = maker.submit("make", [(1 << 20,)])  # 4 MB: kept in the maker node's object store
        ray.wait([table], fetch_local=False)
        assert reader.call("read", [(table,)]) == [float(1 << 20)]  # read while its node is up
        (table,) = maker.submit("make", [(1 << 20,)])
        ray.wait([table], fetch_local=False)
        c.remove_node(maker_node, allow_graceful=False)
        with pytest.raises(InputLost, match=r"pool reward: an input of actor rank 0's read was lost with its node"):
            reader.call("read", [(table,)])
        reader.shutdown()
    finally:
        ray.shutdown()


def test_a_learner_group_that_lost_a_node_is_given_back_while_the_driver_waits_on_another_pool(cluster):
    """Ray's GCS retries a group that lost a bundle with nowhere to go in a loop without backoff
    (the GCS and the head's metrics agent a core each: a 2-core machine's generation 10x slower).
    A learner group (rebuilt by the driver, never restarted in place) that lost a node is removed
    while the driver waits on another pool's call, not when the driver next calls the learners."""
    import ray
    from ray import cloudpickle
    from ray.util.placement_group import placement_group_table

    from actors.pool import ActorFailure, Pool
    from rlsr_ray.config import PoolConfig
    from rlsr_ray.driver.ray_session import single_node_mode

    c, nodes = cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    single_node_mode()
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        group = Pool("learner", _Reader, PoolConfig(num_actors=2, num_cpus=0, resources={"learner_slot": 1}), {},
                     placement_timeout_s=60, call_timeout_s=60, ray_restarts=False)
        other = Pool("reward", _Reader, PoolConfig(num_actors=1, num_cpus=0.5), {}, placement_timeout_s=60,
                     call_timeout_s=60)
        assert group.call("work", [(0.0,), (0.0,)]) == [0.0, 0.0]
        c.remove_node(nodes[1], allow_graceful=False)
        deadline = time.monotonic() + 30
        while placement_group_table(group.pg)["state"] != "RESCHEDULING":  # Ray noticed the death
            assert time.monotonic() < deadline, placement_group_table(group.pg)
            time.sleep(0.1)
        assert other.call("work", [(5.0,)]) == [5.0]  # the driver waits on another pool meanwhile
        assert placement_group_table(group.pg)["state"] == "REMOVED"
        with pytest.raises(ActorFailure, match=r"pool learner: actor rank [01] died during work"):
            group.call("work", [(0.0,), (0.0,)])  # the usual recovery path from here (both ranks ended)
        group.shutdown()  # removing a removed group is harmless
        other.shutdown()
    finally:
        ray.shutdown()
        nodes[1] = c.add_node(num_cpus=1, resources={"learner_slot": 1}, node_ip_address="127.0.0.1")
