"""Forwarding the rows a Ray Train worker writes to metrics.jsonl to the driver's trackers.

SFT's rank-0 worker writes metrics.jsonl (on storage the driver sees: final/ must be there too);
only the driver holds tracking runs, so it reads the file as it grows. A worker group restarted
from a checkpoint cuts the file back to that step and writes the steps again: the rows that
differ from what was forwarded at the same line are forwarded again."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


class MetricsTail:
    def __init__(self, path: Path, trackers: Any, forwarded: list[str] | None = None, every_s: float = 1.0):
        """`forwarded`: the lines the tracking runs already hold (a resumed run's), none by default."""
        self.path, self.trackers, self.every_s = path, trackers, every_s
        self.sent: list[str] = list(forwarded or [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-tail", daemon=True)

    def start(self) -> "MetricsTail":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread, then forwards what the file holds now (the run's last rows)."""
        self._stop.set()
        self._thread.join()
        self.poll()

    def poll(self) -> int:
        """Forwards the complete lines not yet forwarded as they stand; returns how many."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        lines = text.split("\n")[:-1]  # a line still being written has no newline yet
        same = 0
        while same < min(len(lines), len(self.sent)) and lines[same] == self.sent[same]:
            same += 1
        for line in lines[same:]:
            self.trackers.log_row(json.loads(line))
        self.sent = lines
        return len(lines) - same

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()
