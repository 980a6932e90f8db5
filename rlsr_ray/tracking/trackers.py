"""The tracker interface, the fan-out the driver writes to, and opening the configured back ends.

Every back end is checked (installed, reachable) before any is opened, so a missing one costs one
line before training starts. A resumed run goes on in the same tracking runs (their ids are kept in
<run.output_dir>/tracking.json); the steps done again after a resume or a recovery are logged again
at the same step numbers, so the newest value at each step is the one metrics.jsonl holds."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlsr_ray.tracking.base import Tracker

KINDS = ("tensorboard", "wandb", "mlflow")


def numeric(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The row's finite numbers (nested dicts flattened with '/'), without its step: what a tracker plots."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step" and not prefix:
            continue
        if isinstance(v, dict):
            out.update(numeric(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
        elif isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as `section.key` -> text: run parameters every back end accepts."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class Trackers:
    """What the driver writes to: every open tracker in turn."""

    def __init__(self, trackers: Iterable[Tracker] = (), ids_path: Path | None = None):
        self.trackers = list(trackers)
        self.ids_path = ids_path
        ids = {type(t).kind: t.run_id for t in self.trackers if t.run_id}
        if ids_path is not None and ids:  # TensorBoard has no run to go on in
            ids_path.write_text(json.dumps(ids, indent=1))

    def log_row(self, row: dict[str, Any]) -> None:
        metrics = numeric(row)
        for t in self.trackers:
            t.log_metrics(metrics, int(row["step"]))

    def log_checkpoint(self, step: int, path: str) -> None:
        for t in self.trackers:
            t.log_checkpoint(step, path)

    def finish(self, summary: dict[str, Any], artifacts: Sequence[Path]) -> None:
        """The end of a run: its summary's numbers and its output files, then every tracker closed."""
        kept = [p for p in artifacts if p.exists()]
        for t in self.trackers:
            t.log_summary(numeric(summary))
            t.log_artifacts(kept)
        self.close()

    def close(self, failed: bool = False) -> None:
        """Every tracker closed (`failed`: the run ended by an error or an interrupt); idempotent."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close(failed)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # after finish() nothing is left open
        self.close(failed=exc_type is not None)


def check_backends(report_to: Sequence[str], mlflow_tracking_uri: str | None) -> None:
    """Each named back end is installed and its store answers; TrackingError (one line) if not."""
    from rlsr_ray.tracking import mlflow_tracker, tensorboard_tracker, wandb_tracker

    for kind in report_to:
        if kind == "mlflow":
            mlflow_tracker.check(mlflow_tracking_uri)
        elif kind == "wandb":
            wandb_tracker.check()
        elif kind == "tensorboard":
            tensorboard_tracker.check()


def open_trackers(report_to: Sequence[str], output_dir: Path, config: dict[str, Any], *, project: str,
                  name: str, group: str | None, mlflow_tracking_uri: str | None, resume: bool,
                  job_type: str) -> Trackers:
    """The trackers run.report_to names, each opened on a run named `name` (in `group`, when set),
    with the resolved config as its parameters. `resume`: go on in the runs tracking.json names."""
    from rlsr_ray.tracking import mlflow_tracker, tensorboard_tracker, wandb_tracker

    kinds = [k for k in report_to if k != "none"]
    check_backends(kinds, mlflow_tracking_uri)  # every back end checked before any run is opened
    ids_path = output_dir / "tracking.json"
    ids = json.loads(ids_path.read_text()) if resume and ids_path.exists() else {}
    params = flat_params(config)
    opened: list[Tracker] = []
    try:
        for kind in kinds:
            if kind == "tensorboard":
                opened.append(tensorboard_tracker.TensorBoardTracker(output_dir / "tensorboard", params))
            elif kind == "wandb":
                opened.append(wandb_tracker.WandbTracker(output_dir, project, name, group, config, ids.get(kind),
                                                         job_type))
            else:
                opened.append(mlflow_tracker.MlflowTracker(mlflow_tracking_uri, project, name, group, params,
                                                           ids.get(kind), job_type))
    except Exception:
        for t in opened:
            t.close()
        raise
    return Trackers(opened, ids_path)


def check_run(cfg: Any) -> None:
    """check_backends for a Config's run.report_to: called with the other input checks."""
    check_backends(cfg.run.report_to, cfg.run.mlflow_tracking_uri)


def for_run(cfg: Any, output_dir: Path, job_type: str, resume: bool) -> Trackers:
    """open_trackers for a Config's run.* settings: the run named run.tracking_run_name (None: the
    output folder's name), its parameters the whole resolved config."""
    r = cfg.run
    return open_trackers(r.report_to, output_dir, cfg.to_dict(), project=r.tracking_project,
                         name=r.tracking_run_name or output_dir.resolve().name, group=r.tracking_group,
                         mlflow_tracking_uri=r.mlflow_tracking_uri, resume=resume, job_type=job_type)
