"""Child processes that must die with their actor (vLLM's engine-core processes, on Linux).

Ray kills an actor's process with SIGKILL, which its children do not notice: an orphaned vLLM
engine keeps its GPU memory, and the restarted actor then finds the GPU full. A small reaper
process is started with PR_SET_PDEATHSIG, so the kernel signals it when the actor dies; it then
SIGKILLs the pids it was given. Its own exit when the actor ends normally is the same signal.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1

_REAPER = """
import os, signal, sys, time
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def reap(*_):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, reap)
if os.getppid() != parent:  # the actor died before the death signal was armed
    reap()
while True:
    time.sleep(3600)
"""


def _arm_death_signal() -> None:  # runs in the reaper between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reap_with_this_process(pids: list[int]) -> subprocess.Popen | None:
    """Start the reaper for `pids`; None where the platform has no PR_SET_PDEATHSIG (not Linux).

    The kernel sends the signal when the thread that started the reaper ends: call this from the
    actor's main thread (Ray runs a plain actor's methods there)."""
    if not sys.platform.startswith("linux") or not pids:
        return None
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), *map(str, pids)],
                            preexec_fn=_arm_death_signal, stdin=subprocess.DEVNULL, close_fds=True)


def child_pids() -> list[int]:
    """Every process below this one (vLLM's engine core and its workers)."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]
