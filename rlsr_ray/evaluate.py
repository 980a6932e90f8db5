"""Held-out evaluation: greedy responses to held-out prompts, scored by the reward model.

Before/after results are paired per prompt, so the delta's standard error reflects the change
rather than how hard the prompts are.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from actors.sampling import SamplingSpec
from rlsr_ray.pipeline import Pools, fetch_rollouts, finish_generation, score, start_generation


def heldout_similarity(pools: Pools, prompts: pa.Table, max_new_tokens: int) -> dict[str, Any]:
    spec = SamplingSpec(n=1, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    gen = finish_generation(pools, start_generation(pools, prompts, spec, step=-1))
    rewards = score(pools, gen, with_reference=False).rewards
    rollouts = fetch_rollouts(pools, gen)
    sims = dict(zip(rewards.column("group_id").to_pylist(), rewards.column("similarity").to_pylist()))
    order = rollouts.column("group_id").to_pylist()
    return {
        "similarity": [float(sims[g]) for g in order],
        "responses": rollouts.column("response_text").to_pylist(),
        "lengths": [len(x) for x in rollouts.column("response_ids").to_pylist()],
    }


def paired_delta(before: list[float], after: list[float]) -> dict[str, float]:
    """Mean of after - before with its standard error (sample std / sqrt(n))."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if b.shape != a.shape or b.size == 0:
        raise ValueError("paired_delta needs two non-empty lists of one length")
    d = a - b
    se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"n": int(d.size), "before_mean": float(b.mean()), "after_mean": float(a.mean()),
            "delta_mean": float(d.mean()), "delta_se": se,
            "z": float(d.mean() / se) if se and se > 0 else float("nan")}
