"""The processes on this machine by their titles: Ray titles an actor's worker `ray::<Class>` once
__init__ has returned (`ray::<Class>.__init__` while it runs, `ray::<Class>.<method>` in a call)."""
from __future__ import annotations

import subprocess


def titles() -> list[tuple[int, str]]:
    """(pid, title) of every process."""
    lines = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [(int(p), t.strip()) for p, t in (x.strip().split(None, 1) for x in lines.splitlines() if " " in x.strip())]


def constructed(cls: str) -> int:
    """How many actors of this class have been constructed and are alive."""
    return sum(1 for _, t in titles() if t.startswith(f"ray::{cls}") and not t.startswith(f"ray::{cls}.__init__"))
