"""Weights & Biases: one run per rlsr_ray.run / rlsr_ray.sft (a compare's arms in one group).

The mode is wandb's own: WANDB_MODE=offline writes <run.output_dir>/wandb/offline-run-* for
`wandb sync`; online needs `wandb login` (or WANDB_API_KEY). Every row is logged with its `step`
as the x-axis (define_metric), so the steps a resumed run does again are plotted at their own
step numbers instead of being dropped as steps wandb has already seen."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rlsr_ray.tracking.base import TrackingError


def check() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise TrackingError("run.report_to: wandb is not installed (pip install wandb, or pip install "
                            "'rlsr_ray[tracking]')") from None


class WandbTracker:
    kind = "wandb"

    def __init__(self, output_dir: Path, project: str, name: str, group: str | None, config: dict[str, Any],
                 run_id: str | None, job_type: str):
        import os

        import wandb

        # Offline, the same id goes on in a new local folder (`wandb sync` joins them); wandb's resume
        # is for its server only and, offline, warns that it is ignored.
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")
        try:
            # console="off": the driver's own stdout (progress, the summary JSON) is left as it is.
            self.run = wandb.init(project=project, name=name, group=group, job_type=job_type, config=config,
                                  dir=str(output_dir), id=run_id, resume="allow" if run_id and not offline else None,
                                  settings=wandb.Settings(console="off", init_timeout=60, silent=True),
                                  reinit="finish_previous")
        except Exception as e:  # wandb's own errors: not logged in, server unreachable, timeout
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrackingError(f"run.report_to: wandb could not start a run ({first}); log in with `wandb "
                                "login`, or set WANDB_MODE=offline") from None
        self.run_id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def log_checkpoint(self, step: int, path: str) -> None:
        self.run.summary[f"checkpoint/step_{step}"] = path
        self.run.summary["checkpoint/latest"] = path

    def log_summary(self, summary: dict[str, float]) -> None:
        for k, v in summary.items():
            self.run.summary[f"final/{k}"] = v

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        if not paths:
            return
        import wandb

        art = wandb.Artifact(f"{self.run.id}-outputs", type="rlsr_ray-outputs")
        for p in paths:
            if p.is_dir():
                art.add_dir(str(p), name=p.name)
            else:
                art.add_file(str(p), name=p.name)
        self.run.log_artifact(art)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
