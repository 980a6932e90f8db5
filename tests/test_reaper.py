"""A process's children die with it when a reaper watches them (Linux), and survive without one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

PARENT = """
import subprocess, sys, time
from actors.reaper import child_pids, reap_with_this_process
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
if sys.argv[1] == "reap":
    reap_with_this_process(child_pids())
print(engine.pid, flush=True)
time.sleep(300)
"""


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["reap", "control"])
def test_children_die_with_a_sigkilled_parent_only_when_reaped(mode):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    engine = int(parent.stdout.readline())
    try:
        time.sleep(0.5)  # the reaper is up
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone(engine, 10 if mode == "reap" else 2) == (mode == "reap")
    finally:
        for pid in (engine,):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
