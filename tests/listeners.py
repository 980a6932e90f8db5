"""Listening sockets of a process session, read from /proc (tests that a Ray stays on loopback)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def session_listeners(session: int) -> list[tuple[str, int]]:
    """(address, pid) of every listening TCP socket held by a process of this session (from /proc)."""
    inodes = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) != session:
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = int(proc.name)
        except OSError:  # exited meanwhile, or not ours to read
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append((fields[1].rsplit(":", 1)[0], inodes[fields[9]]))
    return found


def own_ray_env(**extra: str) -> dict[str, str]:
    """This process's environment for a command whose Ray's sockets are read: without the
    variables that would put that Ray on loopback for it (a fixture here may have set them) or
    send it to another cluster; the command has to do it itself."""
    drop = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def command_listeners(argv: list[str], log: Path, timeout_s: float, ready: str = "", every_s: float = 1.0,
                      **env: str) -> tuple[int, set[tuple[str, int]]]:
    """Run `python -m argv...` in a session of its own (its Ray included, output to `log`, `env`
    added to own_ray_env()), reading its session's listening sockets every `every_s` once `ready`
    is in the log, until it ends: (exit code, every socket seen). Killed, with its session, past
    timeout_s."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], env=own_ray_env(**env), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[tuple[str, int]] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            if ready in log.read_text():
                seen.update(session_listeners(proc.pid))
            time.sleep(every_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, seen


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
