"""The processes a test started, by their titles: Ray titles an actor's worker `ray::<Class>` once
__init__ has returned (`ray::<Class>.__init__` while it runs, `ray::<Class>.<method>` in a call)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


def titles() -> list[tuple[int, str]]:
    """(pid, title) of every process descended from this one: the Ray clusters and runs the tests
    started, never the actors of another Ray on the machine (a test may SIGSTOP what it finds)."""
    lines = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [x.split(None, 2) for x in lines.splitlines()]
    parent = {int(r[0]): int(r[1]) for r in rows if len(r) >= 2}
    ours = {os.getpid()}

    def descends(pid: int) -> bool:
        seen = []
        while pid not in ours and pid in parent and pid not in seen and pid > 1:
            seen.append(pid)
            pid = parent[pid]
        if pid in ours:
            ours.update(seen)
            return True
        return False

    return [(int(r[0]), r[2].strip()) for r in rows if len(r) == 3 and descends(int(r[0]))]


def constructed(cls: str) -> int:
    """How many actors of this class have been constructed and are alive."""
    return sum(1 for _, t in titles() if t.startswith(f"ray::{cls}") and not t.startswith(f"ray::{cls}.__init__"))


def wait_constructed(cls: str, n: int, timeout_s: float, what: str) -> None:
    """Until n actors of this class are constructed; `what` is the failure's message."""
    deadline = time.monotonic() + timeout_s
    while constructed(cls) < n:
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@contextlib.contextmanager
def held(pid: int):
    """The process stopped (SIGSTOP) for the block and continued after it, whatever happens: a
    driver held so that its run cannot end before the cluster has changed."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _as_in_a_terminal() -> None:
    """SIGINT back to its default in the child, as a terminal's foreground command has it: a test
    session started in the background of a non-interactive shell has it ignored, and the child
    would inherit that (Python then leaves KeyboardInterrupt off, and Ctrl-C does nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def in_own_session(args: list[str], log, env: dict | None = None):
    """`python ARGS` in a process session of its own (a local Ray it starts included), stdout and
    stderr to `log`; the whole session killed on the way out if it is still running."""
    proc = subprocess.Popen([sys.executable, *args], env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_as_in_a_terminal)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def killed_comm_op_build(extensions_dir) -> str:
    """What a first run interrupted by Ctrl-C used to leave: DeepSpeed's shared-memory comm op
    started building into `extensions_dir` as `deepspeed.init_distributed` started it, then the
    build (compiler included) SIGKILLed while it holds torch's build lock. Returns the lock's path."""
    lock = os.path.join(extensions_dir, "deepspeed_shm_comm", "lock")
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
    proc = subprocess.Popen([sys.executable, "-c", code],
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not os.path.exists(lock):
            assert proc.poll() is None and time.monotonic() < deadline, "the build never took its lock"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert os.path.exists(lock)
    return lock
