"""Scale-up from zero on one CPU machine with Ray's fake multi-node provider.

The head has no GPUs; node types carry logical GPUs, an accelerator label and a custom resource.
The run's pools ask for them (compute stays on the CPU via pools.*.device=cpu), so the placement
groups can only be satisfied by nodes the autoscaler adds while the driver waits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

WORKER_TYPES = {
    "gpu_a100": {"resources": {"CPU": 3, "GPU": 2, "accelerator_type:A100": 1}, "node_config": {},
                 "min_workers": 0, "max_workers": 2},
    "reward_cpu": {"resources": {"CPU": 2, "reward_node": 10}, "node_config": {}, "min_workers": 0,
                   "max_workers": 1},
}


@pytest.fixture
def fake_cluster():
    import ray
    from ray.cluster_utils import AutoscalingCluster

    cluster = AutoscalingCluster(head_resources={"CPU": 1}, worker_node_types=WORKER_TYPES,
                                 idle_timeout_minutes=5)
    cluster.start()  # note: `ray stop --force` first, as Ray's own fake-cluster tests do
    ray.init(address="auto")
    try:
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_pools_wait_for_autoscaler_and_run_finishes(fake_cluster, tmp_path):
    ray = fake_cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1  # head only
    out = tmp_path / "run"
    args = ["tiny", f"--run.output_dir={out}", "--run.steps=2", "--ray.placement_timeout_s=300",
            "--pools.learner.num_gpus=1", "--pools.learner.accelerator_type=A100", "--pools.learner.device=cpu",
            "--pools.reference.num_gpus=1", "--pools.reference.device=cpu",
            "--pools.rollout.num_gpus=1", "--pools.rollout.device=cpu",
            "--pools.reward.resources={reward_node: 1}"]
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.run", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "joined the running Ray cluster" in proc.stderr
    assert "waiting" in proc.stderr and "for 1 x {'CPU': 1.0, 'GPU': 1.0" in proc.stderr
    alive = [n for n in ray.nodes() if n["Alive"]]
    gpu_nodes = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    reward_nodes = [n for n in alive if n["Resources"].get("reward_node", 0) > 0]
    assert gpu_nodes and reward_nodes, [n["Resources"] for n in alive]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_missing_resources_fail_with_a_message_naming_them(tmp_path):
    """No autoscaler, nothing to wait for: after the timeout the error names what was missing."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlsr_ray.run", "tiny", f"--run.output_dir={tmp_path}", "--ray.placement_timeout_s=3",
         "--pools.learner.num_gpus=1", "--pools.learner.accelerator_type=H100", "--pools.learner.device=cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlsr_ray: error: pool learner: gave up after")
    assert "'GPU': 1.0" in last and "accelerator_type:H100" in last
