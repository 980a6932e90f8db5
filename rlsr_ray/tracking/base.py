"""What every tracking back end implements, and the one error they raise; the back ends import this,
trackers.py opens them."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence


class TrackingError(RuntimeError):
    """A tracking back end that is not installed or cannot be reached; one line for the user."""


class Tracker(Protocol):
    run_id: str | None  # kept in tracking.json so a resumed run goes on in the same tracking run

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_checkpoint(self, step: int, path: str) -> None: ...

    def log_summary(self, summary: dict[str, float]) -> None: ...

    def log_artifacts(self, paths: Sequence[Path]) -> None: ...

    def close(self, failed: bool = False) -> None: ...
