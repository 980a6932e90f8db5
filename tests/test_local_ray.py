"""The local Ray every command starts (run, sft, eval, compare through run.connect_ray) listens on
loopback only, even when the command imported ray before starting it, as rlsr_ray.sft does
(Ray Train). rlsr_ray.serving.policy_server sets the variable before its own ray import (tests/test_serve.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from listeners import LOOPBACK, own_ray_env, session_listeners

pytestmark = pytest.mark.slow

SCRIPT = """
import ray.train  # what rlsr_ray.sft imports before it starts Ray
from rlsr_ray.config import load_config
from rlsr_ray.driver.ray_session import connect_ray

assert connect_ray(load_config("tiny", ["--ray.address=local"]))
import ray

@ray.remote(num_cpus=0)
class Worker:  # a worker process of its own, with its own gRPC server
    def ping(self):
        return 1

w = Worker.remote()
assert ray.get(w.ping.remote()) == 1
print("ready: ray and a worker are up", flush=True)
import time
time.sleep(120)
"""


def test_a_local_ray_started_after_importing_ray_listens_on_loopback_only(tmp_path):
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=own_ray_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "ready: ray" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        listeners = session_listeners(proc.pid)  # GCS, raylet, agents, the driver's and the worker's servers
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(listeners) >= 5, listeners
    assert [(a, pid) for a, pid in listeners if a not in LOOPBACK] == [], log.read_text()[-3000:]
