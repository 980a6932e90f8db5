"""How large each pool may be: an elastic pool's bounds, and the sizes a learner group may train at."""
from __future__ import annotations

from rlsr_ray.config.schema import Config, PoolConfig


def bounds(pool: PoolConfig) -> tuple[int, int]:
    """(min_actors, max_actors) with their defaults: num_actors, a fixed pool."""
    return (pool.num_actors if pool.min_actors is None else pool.min_actors,
            pool.num_actors if pool.max_actors is None else pool.max_actors)


def elastic(pool: PoolConfig) -> bool:
    """Rollout, reward and reference pools with bounds other than num_actors (learners: see learner_sizes)."""
    return pool.num_actors > 0 and bounds(pool) != (pool.num_actors, pool.num_actors)


def learner_sizes(cfg: Config) -> list[int]:
    """The learner group sizes a run may train at, largest first: from pools.learner.max_actors
    (growth is opt-in; default num_actors) down to min_actors, those over which a mini-batch splits
    evenly, num_actors always (8 learners, 2048 sequences a mini-batch, min_actors 4: [8, 4]; a
    pool in the driver is one learner)."""
    p = cfg.pools.learner
    start = max(1, p.num_actors)
    top = max(start, p.max_actors or start)
    rows_mb = cfg.train.mini_batch_prompts * cfg.rollout.samples_per_prompt
    return [w for w in range(top, (p.min_actors or start) - 1, -1) if w == start or rows_mb % w == 0]


def validate_sizes(cfg: Config, need) -> None:
    """validate.py's checks of the pools' bounds (need: its one-line ConfigError)."""
    for role in ("rollout", "reward", "reference"):
        p = getattr(cfg.pools, role)
        lo, hi = bounds(p)
        if (lo, hi) == (p.num_actors, p.num_actors):
            continue
        key = f"pools.{role}"
        need(p.num_actors > 0, f"{key}.num_actors", "a pool with min_actors/max_actors runs in Ray actors: "
             "num_actors >= 1", p.num_actors)
        need(1 <= lo <= p.num_actors, f"{key}.min_actors", f"must be in [1, {key}.num_actors={p.num_actors}]",
             p.min_actors)
        need(hi >= p.num_actors, f"{key}.max_actors", f"must be >= {key}.num_actors={p.num_actors}", p.max_actors)
        need(not (role == "reward" and cfg.reward_service.enabled), f"{key}.min_actors",
             "the reward service scales its own replicas (reward_service.*); leave the pool's bounds unset",
             p.min_actors)
    p = cfg.pools.learner
    need(p.min_actors is None or 1 <= p.min_actors <= max(1, p.num_actors), "pools.learner.min_actors",
         f"must be in [1, pools.learner.num_actors={p.num_actors}]", p.min_actors)
    need(p.shrink_after_s > 0, "pools.learner.shrink_after_s", "must be > 0", p.shrink_after_s)
    need(p.max_actors is None or (p.num_actors > 0 and p.max_actors >= p.num_actors), "pools.learner.max_actors",
         f"must be >= pools.learner.num_actors={p.num_actors} (learners in Ray actors)", p.max_actors)
    sizes = learner_sizes(cfg)
    start = max(1, p.num_actors)
    need(p.min_actors is None or p.min_actors == start or min(sizes) < start,
         "pools.learner.min_actors", "no smaller learner group splits a mini-batch (train.mini_batch_prompts x "
         "rollout.samples_per_prompt sequences) evenly", p.min_actors)
    need(p.max_actors is None or p.max_actors == start or max(sizes) > start,
         "pools.learner.max_actors", "no larger learner group splits a mini-batch (train.mini_batch_prompts x "
         "rollout.samples_per_prompt sequences) evenly", p.max_actors)
