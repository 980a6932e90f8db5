"""metrics.jsonl: one line per step, the run's own record (trackers get the same rows)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """metrics.jsonl, and every row passed on to the run's trackers (run.report_to)."""

    def __init__(self, output_dir: Path, trackers: Any = None):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self.trackers = trackers  # rlsr_ray.tracking.Trackers, owned (opened, closed) by the driver

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()  # a killed run keeps every finished step
        if self.trackers is not None:
            self.trackers.log_row(row)

    def close(self) -> None:
        self._file.close()


def truncate_metrics(output_dir: Path, last_step: int) -> int:
    """Drop lines after `last_step` (written by a run that died before its next checkpoint)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = read_metrics(path)
    kept = [r for r in rows if int(r["step"]) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    tmp.replace(path)
    return len(rows) - len(kept)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
