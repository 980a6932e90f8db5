"""What the LM Evaluation Harness's actor needs from it: the task index (its own tasks plus a
user's include path) and simple_evaluate's result condensed to what the summary keeps. Imports
nothing of rlsr_ray, so the actor (actors/lm_eval_actor.py) and the driver's side
(lm_eval_tasks.py) both use it without importing each other."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any


class LmEvalError(ValueError):
    """A task the harness does not know, a missing include path or harness; one line for the user."""


def task_manager(include_path: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError("eval.lm_eval_tasks: lm-eval is not installed (pip install 'lm-eval[hf]', or pip install "
                          "'rlsr_ray[lm-eval]')") from None
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise LmEvalError(f"eval.lm_eval_include_path: {include_path} is not a folder")
    return TaskManager(include_path=str(Path(include_path).expanduser().resolve()) if include_path else None)


def condense(result: dict[str, Any]) -> dict[str, Any]:
    """simple_evaluate's result -> what the summary keeps: per task its metrics
    ({metric: {"value", "stderr"}}, the harness's "acc,none" / "acc_stderr,none" keys split), shots,
    sample count and version; and per task and metric the per-document scores (doc_id -> score)."""
    tasks: dict[str, Any] = {}
    for task, values in result["results"].items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, v in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or "_stderr" in metric or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            err = values.get(f"{metric}_stderr,{filt}")
            metrics[name] = {"value": float(v),
                             "stderr": float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None}
        tasks[task] = {"metrics": metrics, "num_fewshot": result.get("n-shot", {}).get(task),
                       "samples": result.get("n-samples", {}).get(task, {}).get("effective"),
                       "version": result.get("versions", {}).get(task)}
    scores: dict[str, dict[str, dict[int, float]]] = {}
    for task, samples in (result.get("samples") or {}).items():
        per: dict[str, dict[int, float]] = {}
        for s in samples:
            for metric in s.get("metrics", []):
                v = s.get(metric)
                if isinstance(v, (int, float)) or hasattr(v, "__float__") and not isinstance(v, (tuple, list)):
                    name = metric if s.get("filter", "none") == "none" else f"{metric},{s['filter']}"
                    per.setdefault(name, {})[int(s["doc_id"])] = float(v)
        scores[task] = per
    return {"tasks": tasks, "scores": scores}
