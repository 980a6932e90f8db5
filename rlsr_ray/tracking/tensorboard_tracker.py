"""TensorBoard: event files in <run.output_dir>/tensorboard (torch's SummaryWriter)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rlsr_ray.tracking.base import TrackingError


def check() -> None:
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
    except ImportError:
        raise TrackingError("run.report_to: tensorboard is not installed (pip install tensorboard)") from None


class TensorBoardTracker:
    kind = "tensorboard"
    run_id = None

    def __init__(self, log_dir: Path, params: dict[str, str]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps every finished step

    def log_checkpoint(self, step: int, path: str) -> None:
        self.writer.add_text("checkpoint", path, step)

    def log_summary(self, summary: dict[str, float]) -> None:
        self.writer.add_text("summary", "\n".join(f"    {k}: {v:.6g}" for k, v in summary.items()))

    def log_artifacts(self, paths: Sequence[Path]) -> None:  # they lie beside the event files already
        pass

    def close(self, failed: bool = False) -> None:
        self.writer.close()
