"""The LM Evaluation Harness on each checkpoint (eval.lm_eval_tasks): the paper's classification
half of the comparison.

The harness runs through its Python API (lm_eval.simple_evaluate, its `hf` model on the
checkpoint's folder; an adapter folder as `peft=` on its base) in one actor placed like the rollout
pool (in this process when pools.rollout.num_actors is 0). The task names are checked against the
harness's index (its own tasks plus eval.lm_eval_include_path) before any model is loaded. The
summary keeps, per task, each metric's value and stderr as the harness reports them; per-sample
scores (log_samples) give paired differences between checkpoints, matched by document."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from rlsr_ray.config import Config
from rlsr_ray.evaluation.harness import LmEvalError, task_manager


def check_tasks(cfg: Config) -> None:
    """Every name in eval.lm_eval_tasks is a task, group or tag the harness knows (its own, and the
    YAMLs under eval.lm_eval_include_path). Reads task files only: no model, no dataset."""
    e = cfg.eval
    if not e.lm_eval_tasks:
        return
    import lm_eval

    known = set(task_manager(e.lm_eval_include_path).all_tasks)
    for name in e.lm_eval_tasks:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            where = f" nor under eval.lm_eval_include_path={e.lm_eval_include_path}" if e.lm_eval_include_path else ""
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise LmEvalError(f"eval.lm_eval_tasks: {name!r} is not a task of lm-eval {lm_eval.__version__}{where}"
                              f"{hint}")


def model_args(path: str, dtype: str) -> dict[str, str]:
    """The harness's `hf` model arguments for a checkpoint folder; an adapter on its base."""
    from rlsr_ray.modeling.lora import base_path, is_adapter

    if is_adapter(path):
        return {"pretrained": base_path(path), "peft": path, "dtype": dtype}
    return {"pretrained": path, "dtype": dtype}


def paired(scores: dict[str, dict[str, dict[str, dict[int, float]]]], pairs: list[tuple[str, str]]
           ) -> dict[str, Any]:
    """Per pair X_vs_Y, task and metric: X - Y over the documents both were scored on (mean ± SE)."""
    from rlsr_ray.driver.heldout import paired_delta

    out: dict[str, Any] = {}
    for x, y in pairs:
        per_task: dict[str, Any] = {}
        for task, metrics in scores.get(x, {}).items():
            for metric, xs in metrics.items():
                ys = scores.get(y, {}).get(task, {}).get(metric)
                docs = sorted(set(xs) & set(ys or {}))
                if docs:
                    per_task.setdefault(task, {})[metric] = paired_delta([ys[d] for d in docs], [xs[d] for d in docs])
        out[f"{x}_vs_{y}"] = {"x": x, "y": y, "tasks": per_task}
    return out


def run_all(cfg: Config, checkpoints: list[tuple[str, str]], pairs: list[tuple[str, str]], out: Path
            ) -> dict[str, Any]:
    """Every checkpoint through the configured tasks, one after another in one actor; the
    per-document scores written to out/lm_eval/NAME.json, the summary's part returned."""
    import dataclasses

    from actors.lm_eval_actor import LmEvalActor
    from actors.pool import Pool
    from rlsr_ray.config import pool_device
    from rlsr_ray.modeling.models import resolve_policy
    from rlsr_ray.modeling.policy import resolve_compute_dtype

    e, p = cfg.eval, cfg.pools.rollout
    device = pool_device(p)
    # On CPU the weights stay float32: bf16 weights are inexact, and ~20x slower without AMX.
    dtype = resolve_compute_dtype(cfg.model.compute_dtype, device) if device.startswith("cuda") else "float32"
    one = dataclasses.replace(p, num_actors=min(1, p.num_actors), min_actors=None, max_actors=None)
    pool = Pool("lm_eval", LmEvalActor, one, dict(device=device, torch_threads=p.torch_threads,
                                                  include_path=e.lm_eval_include_path),
                loads="importing lm-eval and indexing its tasks")
    limit = int(e.lm_eval_limit) if e.lm_eval_limit is not None and e.lm_eval_limit >= 1 else e.lm_eval_limit
    (out / "lm_eval").mkdir(parents=True, exist_ok=True)
    per: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    try:
        for name, path in checkpoints:
            args = model_args(resolve_policy(path, cfg.model.cache_dir), dtype)
            [found] = pool.call("evaluate", [(args, list(e.lm_eval_tasks), e.lm_eval_num_fewshot, limit,
                                              e.lm_eval_batch_size, cfg.run.seed)])
            per[name], scores[name] = found["tasks"], found["scores"]
            (out / "lm_eval" / f"{name}.json").write_text(json.dumps(found, indent=1))
    finally:
        pool.shutdown()
    import lm_eval

    return {"lm_eval_version": lm_eval.__version__, "tasks": list(e.lm_eval_tasks), "limit": limit,
            "num_fewshot": e.lm_eval_num_fewshot, "checkpoints": per, "deltas": paired(scores, pairs)}
