"""Resource and batch arithmetic, pure and tested: placement-group bundles, sizes per learner.

Nothing here touches Ray; pool.py turns bundles into placement groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rlsr_ray.config import Config, PoolConfig

ROLES = ("rollout", "reward", "reference", "learner")


def bundle(pool: PoolConfig) -> dict[str, float]:
    """The resources of one actor of a pool, as a placement-group bundle."""
    b: dict[str, float] = {"CPU": float(pool.num_cpus)}
    if pool.num_gpus:
        b["GPU"] = float(pool.num_gpus)
    if pool.accelerator_type:
        # Ray labels nodes with "accelerator_type:<T>": 1; a sliver of it pins the bundle there.
        b[f"accelerator_type:{pool.accelerator_type}"] = 0.001
    b.update({k: float(v) for k, v in pool.resources.items()})
    return {k: v for k, v in b.items() if v > 0}


def bundles(pool: PoolConfig) -> list[dict[str, float]]:
    return [bundle(pool) for _ in range(pool.num_actors)]


def total_resources(cfg: Config) -> dict[str, float]:
    """What all Ray-actor pools together ask of the cluster."""
    total: dict[str, float] = {}
    for role in ROLES:
        for b in bundles(getattr(cfg.pools, role)):
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
    return total


def local_num_cpus(cfg: Config) -> int:
    """Logical CPUs for a Ray started by rlsr_ray: what the pools ask, plus one for the driver.

    Pools run their phases one after another, so on a small machine the logical count may exceed
    the physical cores; each actor still uses only `torch_threads` threads.
    """
    if cfg.ray.num_cpus is not None:
        return cfg.ray.num_cpus
    return int(math.ceil(total_resources(cfg).get("CPU", 0.0))) + 1


@dataclass(frozen=True)
class StepPlan:
    rows_per_step: int  # sequences generated per step (prompts x samples)
    minibatches_per_step: int  # optimizer steps per RL step
    rows_per_minibatch: int
    rows_per_learner: int  # rows of one mini-batch on one learner
    micro_steps: int  # micro-batches per mini-batch per learner (gradient accumulation)
    learner_world_size: int


def step_plan(cfg: Config, learners: int | None = None) -> StepPlan:
    """The step's arithmetic for a learner group of `learners` (None: pools.learner.num_actors)."""
    n = cfg.rollout.samples_per_prompt
    t = cfg.train
    world = learners or max(1, cfg.pools.learner.num_actors)
    rows_mb = t.mini_batch_prompts * n
    per_learner = rows_mb // world  # config.validate saw that it divides
    return StepPlan(
        rows_per_step=t.prompts_per_step * n,
        minibatches_per_step=t.prompts_per_step // t.mini_batch_prompts,
        rows_per_minibatch=rows_mb,
        rows_per_learner=per_learner,
        micro_steps=math.ceil(per_learner / t.micro_batch_size),
        learner_world_size=world,
    )


def minibatch_rows(groups: int, group_size: int, mini_batch_prompts: int, world: int) -> list[tuple[int, int]]:
    """(first row, rows) of each mini-batch of a step that kept `groups` groups, in row order.

    Mini-batches hold mini_batch_prompts whole groups; when dynamic sampling left fewer groups
    the last one is smaller, and is merged into the one before if it has fewer rows than there are
    learners (every learner needs a row). Empty when the step has fewer rows than learners.
    """
    rows, per_mb = groups * group_size, mini_batch_prompts * group_size
    bounds = list(range(0, rows, per_mb)) + [rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < world:
        del bounds[-2]
    if rows < world:
        return []
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]
