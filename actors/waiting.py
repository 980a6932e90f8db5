"""When a long wait of the driver says that it is still waiting: a first line after a few seconds,
then at intervals that double up to a ceiling, so a wait of seconds stays quiet, one of minutes is
seen at once, and one of hours does not flood the log."""
from __future__ import annotations

from typing import Iterator

FIRST_S, MAX_S = 5.0, 300.0


def report_times(first_s: float = FIRST_S, max_s: float = MAX_S) -> Iterator[float]:
    """Seconds into a wait at which a 'still waiting' line is due: 5, 15, 35, 75, ... with the
    defaults (the interval doubling from first_s, never above max_s)."""
    at, step = first_s, first_s
    while True:
        yield at
        step = min(step * 2, max_s)
        at += step


def waited(seconds: float) -> str:
    """A wait's length as a person reads it: 40s, 3m20s, 1h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Reports:
    """The 'still waiting' schedule of one wait that began at `start` (time.monotonic()): `due` is
    when the next line is; advance() after writing one. Disabled: never due."""

    def __init__(self, start: float, enabled: bool = True, first_s: float = FIRST_S):
        self._times = report_times(first_s) if enabled else iter(())
        self.start = start
        self.due = start + next(self._times, float("inf"))

    def advance(self) -> None:
        self.due = self.start + next(self._times, float("inf"))
