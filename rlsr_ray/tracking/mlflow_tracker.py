"""MLflow, through MlflowClient on run.mlflow_tracking_uri (None: MLflow's own choice,
MLFLOW_TRACKING_URI or its default). A local store is an SQLite file (sqlite:///path/mlflow.db);
the experiment is run.tracking_project. A compare's arms are child runs of one parent run named
after the comparison (MLflow's mlflow.parentRunId tag), which also holds the report."""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from rlsr_ray.tracking.base import TrackingError

GROUP_TAG = "rlsr_ray.group"
PARENT_TAG = "rlsr_ray.group_parent"
MAX_PARAM = 6000  # MLflow's limit on a parameter's value


def check(uri: str | None) -> None:
    """Installed, and the store answers (one quick try, not MLflow's minutes of retries)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("run.report_to: mlflow is not installed (pip install mlflow, or pip install "
                            "'rlsr_ray[tracking]')") from None
    try:
        with _quick_http():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # the socket's own reason where there is one, not urllib3's retry story
        errno = re.search(r"\[Errno [^\]]+\][^'\")]*", str(e))
        first = errno.group(0).strip() if errno else (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TrackingError(f"run.report_to: the MLflow store {uri or '(MLflow default)'} cannot be reached: "
                            f"{first}") from None


@contextmanager
def _quick_http():
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def metric_key(name: str) -> str:
    """MLflow's allowed characters (letters, digits, _ - . / : and space); others become _."""
    return re.sub(r"[^\w\-./: ]", "_", name)


class MlflowTracker:
    kind = "mlflow"

    def __init__(self, uri: str | None, experiment: str, name: str, group: str | None, params: dict[str, str],
                 run_id: str | None, job_type: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            experiment, artifact_location=_artifacts_beside(self.client.tracking_uri, experiment))
        parent = self._parent(exp_id, group) if group else None
        if job_type == "report" and parent is not None:  # the comparison's report goes on its parent run
            run_id = parent
        if run_id is None:
            tags = {"rlsr_ray.job_type": job_type}
            if group:
                tags.update({GROUP_TAG: group, "mlflow.parentRunId": parent})
            run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            items = [Param(k[:250], v[:MAX_PARAM]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # log_batch takes 100 parameters at a time
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _parent(self, exp_id: str, group: str) -> str:
        found = self.client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{group}'", max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(exp_id, run_name=group, tags={PARENT_TAG: group, GROUP_TAG: group}).info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_checkpoint(self, step: int, path: str) -> None:
        self.client.set_tag(self.run_id, f"checkpoint.step_{step}", path)
        self.client.set_tag(self.run_id, "checkpoint.latest", path)

    def log_summary(self, summary: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(f"final/{k}"), v, now, 0) for k, v in summary.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for p in paths:
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
            else:
                self.client.log_artifact(self.run_id, str(p))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _artifacts_beside(uri: str, experiment: str) -> str | None:
    """A new experiment in a local SQLite store keeps its artifacts in mlartifacts/ beside the
    database file (MLflow's own default is relative to wherever the process runs)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
    return (db.parent / "mlartifacts" / re.sub(r"[^\w\-.]", "_", experiment)).as_uri()
