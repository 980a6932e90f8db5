"""Elastic learners on a real multi-node Ray: a node holding a learner rank leaves mid-run, and
the run goes on with a smaller learner group from its newest checkpoint, every step once.

Ray's own test cluster (ray.cluster_utils.Cluster): a head and two worker raylets on this
machine, all on 127.0.0.1, each worker with one `learner_slot`; remove_node kills a raylet and
every process on it, as a lost machine does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    keep = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # several raylets, all on loopback
    # A dead node is noticed within ~2 s (Ray's default: up to 15 s of missed health checks).
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=3, node_ip_address="127.0.0.1",
                                                          include_dashboard=False, _system_config=system))
    nodes = [c.add_node(num_cpus=1, resources={"learner_slot": 1}, node_ip_address="127.0.0.1") for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        c.shutdown()
        if keep is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = keep


def test_a_learner_node_leaves_and_the_run_goes_on_with_fewer_learners(cluster, tmp_path):
    c, nodes = cluster
    out = tmp_path / "run"
    log = tmp_path / "driver.log"
    args = ["tiny", f"--ray.address={c.address}", "--run.steps=3", "--run.save_every=1", "--run.progress=false",
            "--run.eval_before_after=false", f"--run.output_dir={out}", "--train.zero_stage=2",
            "--pools.learner.num_actors=2", "--pools.learner.min_actors=1", "--pools.learner.max_restarts=1",
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
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3], text[-3000:]  # every step once
    # Two learners up to the step the loss was noticed at (the node may outlive a step), one after.
    sizes = [r["learners"] for r in rows]
    assert sizes[0] == 2 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True), sizes
    assert "learner group of 2 not placed" in text and "learner group rebuilt with 1 learner(s)" in text
    state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["optimizer"] == {"zero_stage": 2, "shards": 1}  # two ranks' state, one rank on
