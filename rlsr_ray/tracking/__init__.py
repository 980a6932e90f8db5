"""Experiment tracking (run.report_to): TensorBoard, Weights & Biases and MLflow.

Only the driver logs: the per-step rows it writes to metrics.jsonl, the resolved config as run
parameters, each checkpoint's path, and at the end the summary and the output files. Actors never
open a tracking connection."""
from rlsr_ray.tracking.base import Tracker, TrackingError
from rlsr_ray.tracking.trackers import KINDS, Trackers, check_backends, check_run, for_run, open_trackers

__all__ = ["KINDS", "Tracker", "Trackers", "TrackingError", "check_backends", "check_run", "for_run",
           "open_trackers"]
