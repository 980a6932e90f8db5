"""Listening sockets of a process session, read from /proc (tests that a Ray stays on loopback)."""
from __future__ import annotations

import os
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


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
