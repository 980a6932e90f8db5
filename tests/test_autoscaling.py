"""Scale-up from zero on one CPU machine with Ray's fake multi-node provider.

The head has no GPUs; node types carry logical GPUs, an accelerator label and a custom resource.
The run's pools ask for them (compute stays on the CPU via pools.*.device=cpu), so the placement
groups can only be satisfied by nodes the autoscaler adds while the driver waits.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from listeners import LOOPBACK, session_listeners
from processes import held, wait_constructed

pytestmark = pytest.mark.slow

WORKER_TYPES = {
    "gpu_a100": {"resources": {"CPU": 3, "GPU": 2, "accelerator_type:A100": 1}, "node_config": {},
                 "min_workers": 0, "max_workers": 2},
    "reward_cpu": {"resources": {"CPU": 2, "reward_node": 10}, "node_config": {}, "min_workers": 0,
                   "max_workers": 2},
}


def _fake_cluster_config() -> dict:
    """A cluster-launcher config for Ray's fake_multinode provider: nodes are local raylets."""
    return {
        "cluster_name": "rlsr-fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                                 **WORKER_TYPES},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    import ray

    from rlsr_ray.driver.ray_session import running_cluster_address, single_node_mode

    config = tmp_path / "fake_cluster.json"
    config.write_text(json.dumps(_fake_cluster_config()))
    # Single-node mode keeps the head, the autoscaler and every node it adds on 127.0.0.1 (the fake
    # provider starts its raylets at the address get_node_ip_address gives); this process and the
    # run it starts join in the same mode (else each looks for a raylet of its own at the machine's
    # address). Ray's address="auto" below also turns token auth on in this process for good, its
    # RAY_AUTH_MODE and its cached config alike: left as Ray sets them.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    single_node_mode()
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    # As in Ray's own fake-cluster tests: one cluster per machine, stopped before and after.
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    # --block in a session of its own: the head, the autoscaler and the raylets it starts go with one
    # SIGKILL to the session (`ray stop` waits seconds on each killed process it did not start).
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--autoscaling-config={config}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (address := running_cluster_address()) is None:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        assert address.startswith("127.0.0.1:"), address
        ray.init(address="auto")
        try:
            yield ray, head.pid
        finally:
            ray.shutdown()
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        subprocess.run(["ray", "stop", "--force"], capture_output=True)  # anything that left the session


def test_pools_wait_for_autoscaler_and_run_finishes(fake_cluster, tmp_path):
    ray, head = fake_cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1  # head only
    out = tmp_path / "run"
    args = ["tiny", f"--run.output_dir={out}", "--run.steps=3", "--ray.placement_timeout_s=300",
            "--pools.learner.num_gpus=1", "--pools.learner.accelerator_type=A100", "--pools.learner.device=cpu",
            "--pools.reference.num_gpus=1", "--pools.reference.device=cpu",
            "--pools.rollout.num_gpus=1", "--pools.rollout.device=cpu",
            # An elastic reward pool of 1 to 2 actors, one per reward node: its second actor needs a
            # node of its own, asked for while the run goes on.
            "--pools.reward.resources={reward_node: 6}", "--pools.reward.max_actors=2"]
    log = tmp_path / "driver.log"
    # Without RAY_AUTH_MODE, as a user's shell has it: the run finds the cluster `ray start` left on
    # this machine and joins it with the token `ray start` wrote.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.run", *args], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        # After step 1 the driver is held until the second reward actor is up on a node of its own
        # (a tiny step takes about a second: the run could otherwise end before the node is added).
        with held(proc.pid):
            wait_constructed("RewardActor", 2, 180, "the second reward actor never started")
            # The head, the autoscaler, the nodes it added and their actors: loopback only.
            listeners = session_listeners(head)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = log.read_text()
    assert len(listeners) >= 10 and [(a, pid) for a, pid in listeners if a not in LOOPBACK] == [], listeners
    assert "joined the running Ray cluster" in stderr
    assert "waiting" in stderr and "for 1 x {'CPU': 1.0, 'GPU': 1.0" in stderr
    alive = [n for n in ray.nodes() if n["Alive"]]
    gpu_nodes = [n for n in alive if n["Resources"].get("GPU", 0) > 0]
    reward_nodes = [n for n in alive if n["Resources"].get("reward_node", 0) > 0]
    assert gpu_nodes and reward_nodes, [n["Resources"] for n in alive]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The elastic pool grew onto the node added for it, and its request is withdrawn after the run.
    assert "asked the autoscaler for room for 5 actors" in stderr
    assert len(reward_nodes) == 2 and rows[-1]["actors_reward"] == 2, ([n["Resources"] for n in alive], rows)
    assert not _capacity_request(ray)


def _capacity_request(ray) -> list:
    """What request_resources asked of the autoscaler and still holds (empty: nothing)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return list(status.resource_demands.cluster_constraint_demand)
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


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
