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
from rlsr_ray.driver.pipeline import Pools, fetch_rollouts, finish_generation, score, start_generation


def answers(pools: Pools, prompts: pa.Table, spec: SamplingSpec) -> list[dict[str, Any]]:
    """One response per prompt, in the prompts' order, with its reward-model scores."""
    gen = finish_generation(pools, start_generation(pools, prompts, spec, step=-1))
    rewards = score(pools, gen, with_reference=False).rewards
    rollouts = fetch_rollouts(pools, gen)
    by_group = {g: k for k, g in enumerate(rollouts.column("group_id").to_pylist())}
    scored = {g: k for k, g in enumerate(rewards.column("group_id").to_pylist())}
    r, w = rollouts.to_pydict(), rewards.to_pydict()
    # The held-out score is the similarity term's, or the reward's where a run has no such term.
    sim = "similarity" if "similarity" in w else "reward"
    terms = [n for n in w if n not in ("group_id", "sample_idx", "reward")]
    copied = w.get("copy_penalty")
    out = []
    for g in prompts.column("group_id").to_pylist():
        k, j = by_group[g], scored[g]
        out.append({"output": r["response_text"][k], "tokens": len(r["response_ids"][k]),
                    "finish_reason": r["finish_reason"][k], "similarity": float(w[sim][j]),
                    "reward": float(w["reward"][j]), "copy_penalized": bool(copied and copied[j]),
                    "terms": {n: float(w[n][j]) for n in terms}})
    return out


def heldout_similarity(pools: Pools, prompts: pa.Table, max_new_tokens: int) -> dict[str, Any]:
    spec = SamplingSpec(n=1, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    rows = answers(pools, prompts, spec)
    return {"similarity": [x["similarity"] for x in rows], "responses": [x["output"] for x in rows],
            "lengths": [x["tokens"] for x in rows]}


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
