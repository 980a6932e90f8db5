"""The pools a run needs, built from the config: rollout, reward (or the shared reward service),
reference and the learner group, plus the learner -> rollout weight route."""
from __future__ import annotations

from rlsr_ray.config import Config, pool_device, reference_in_learner, uses_weight_route


def learner_settings(cfg: Config, lr: float, micro_steps: int):
    """The learner's settings from the config (rlsr_ray.sft passes its own learning rate)."""
    from actors.learner import LearnerSettings
    from rlsr_ray.algo.loss import LossSettings
    from rlsr_ray.modeling.lora import LoraSpec

    a, t = cfg.algo, cfg.train
    return LearnerSettings(
        lr=lr, adam_betas=t.adam_betas, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
        zero_stage=t.zero_stage, micro_batch_size=t.micro_batch_size, micro_steps=micro_steps,
        loss=LossSettings(a.clip_eps, a.kl_coef, a.kl_estimator, a.loss_aggregation),
        temperature=_temperature(cfg), compute_dtype=cfg.model.compute_dtype,
        recompute_old_logprobs=a.recompute_old_logprobs, seed=cfg.run.seed, optimizer=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing, logprob_chunk_tokens=t.logprob_chunk_tokens,
        offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
        max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
        attn_implementation=cfg.model.attn_implementation,
        lora=LoraSpec.from_config(t.lora), reference_in_learner=reference_in_learner(cfg),
    )


def learner_pool(cfg: Config, policy_path: str, learners: int | None = None,
                 placement_timeout_s: float | None = None):
    """The learner pool's actors, `learners` of them (None: pools.learner.num_actors), created (they
    load the policy) but not yet in a group."""
    import dataclasses

    from actors.learner import LearnerActor
    from actors.pool import Pool
    from rlsr_ray.plan.resources import step_plan

    plan = step_plan(cfg, learners)
    p = cfg.pools.learner
    if learners is not None and p.num_actors > 0:
        p = dataclasses.replace(p, num_actors=learners)
    settings = learner_settings(cfg, cfg.train.lr, plan.micro_steps)
    timeouts = _timeouts(cfg)
    if placement_timeout_s is not None:
        timeouts["placement_timeout_s"] = placement_timeout_s
    # No Ray restarts: a learner group is rebuilt whole and reloaded from a checkpoint (trainer.py).
    return Pool("learner", LearnerActor, p, dict(
        policy_path=policy_path, settings=settings, world_size=plan.learner_world_size,
        device=pool_device(p), torch_threads=p.torch_threads, cache_dir=cfg.model.cache_dir),
        ray_restarts=False, loads=f"loading the policy {policy_path}", **timeouts)


def rebuild_learner_group(cfg: Config, policy_path: str, at_most: int | None = None):
    """(a set-up learner group, its step plan) at the largest size in pool_sizes.learner_sizes (up
    to at_most) the cluster places: each size but the smallest gets pools.learner.shrink_after_s
    to be placed, the smallest ray.placement_timeout_s, as a first build does."""
    import logging

    from actors.pool import PoolTimeout
    from rlsr_ray.config.pool_sizes import learner_sizes
    from rlsr_ray.plan.resources import step_plan

    sizes = [s for s in learner_sizes(cfg) if at_most is None or s <= at_most]
    for size, smaller in zip(sizes, sizes[1:] + [None]):
        try:
            learner = learner_pool(cfg, policy_path, size,
                                   None if smaller is None else cfg.pools.learner.shrink_after_s)
        except PoolTimeout as e:
            if smaller is None:
                raise
            logging.getLogger("rlsr_ray").warning("learner group of %d not placed (%s); trying %d", size, e,
                                                  smaller)
            continue
        try:
            finish_setup(learner, start_setup(learner))
        except BaseException:
            learner.shutdown()
            raise
        return learner, step_plan(cfg, size)
    raise AssertionError("learner_sizes is never empty")


def room_for_learners(cfg: Config, extra: int, wait_s: float = 1.0) -> bool:
    """Whether the cluster places `extra` more learner bundles now: a placement group of them that
    is placed within wait_s (and removed at once). A quick look at the free resources first spares
    the wait where they plainly do not fit."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from rlsr_ray.plan.resources import bundle

    want = bundle(cfg.pools.learner)
    free = ray.available_resources()
    if any(free.get(k, 0.0) < v * extra - 1e-9 for k, v in want.items() if not k.startswith("accelerator_type:")):
        return False
    pg = placement_group([want] * extra, strategy="PACK", name="rlsr-learner-room")
    try:
        return bool(ray.wait([pg.ready()], timeout=wait_s)[0])
    finally:
        remove_placement_group(pg)


SETUP = "joining the learner group and building the DeepSpeed engine"


def start_setup(learner):
    """Start the learners' DeepSpeed setup in one group, once every learner has loaded the policy;
    returns the pending setup (finish_setup waits for it)."""
    learner.wait_started()
    meet = learner.get(learner.broadcast("rendezvous"), "rendezvous", doing="naming where the group meets",
                       startup=True)[0]  # rank 0's choice, for every rank
    return learner.broadcast("setup", meet)


def finish_setup(learner, pending) -> None:
    """Wait for the setup start_setup began, at most ray.startup_timeout_s; logs what rank 0 did
    about DeepSpeed's CPU comm op (actors/comm_op.py)."""
    import logging

    said = learner.get(pending, "setup", doing=SETUP, startup=True)
    if said and said[0]:
        logging.getLogger("rlsr_ray").info("pool learner: %s", said[0])


def _temperature(cfg: Config) -> float:
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def _timeouts(cfg: Config) -> dict[str, float]:
    return dict(placement_timeout_s=cfg.ray.placement_timeout_s, call_timeout_s=cfg.ray.call_timeout_s,
                startup_timeout_s=cfg.ray.startup_timeout_s)


def rollout_pool(cfg: Config, policy_path: str, adapters: bool = True):
    """`adapters`: under train.lora the actors hold adapters the learners' syncs replace; False
    (evaluation) generates from the policy as it is."""
    from actors.pool import Pool
    from actors.rollout import RolloutActor
    from rlsr_ray.modeling.lora import LoraSpec

    p, r = cfg.pools.rollout, cfg.rollout
    return Pool("rollout", RolloutActor, p, dict(
        policy_path=policy_path, backend=r.backend, compute_dtype=cfg.model.compute_dtype,
        device=pool_device(p), torch_threads=p.torch_threads, generate_batch_size=r.generate_batch_size,
        vllm_gpu_memory_utilization=r.vllm_gpu_memory_utilization, seed=cfg.run.seed,
        vllm_tensor_parallel_size=r.vllm_tensor_parallel_size,
        max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens,
        lora=LoraSpec.from_config(cfg.train.lora) if adapters else None),
        loads=f"loading the policy {policy_path} ({r.backend})", **_timeouts(cfg))


def reward_pool(cfg: Config, terms: list):
    """The reward pool scoring the given reward terms (models.resolve_reward_terms), or the shared reward
    service when reward_service.enabled."""
    from actors.pool import Pool
    from actors.reward import RewardActor

    p = cfg.pools.reward
    if cfg.reward_service.enabled:
        from rlsr_ray.serving import reward_service

        return reward_service.connect(cfg, pool_device(p), terms)
    return Pool("reward", RewardActor, p, dict(terms=terms, device=pool_device(p), torch_threads=p.torch_threads),
                loads="loading the reward models", **_timeouts(cfg))


def build_pools(cfg: Config, policy_path: str, terms: list):
    from actors.pool import Pool
    from actors.reference import ReferenceActor
    from rlsr_ray.driver.step import Pools
    from rlsr_ray.plan.resources import step_plan

    p, t = cfg.pools, cfg.train
    # Every pool's actors are created before the first call to any of them, so all load at once;
    # the learners' setup then proceeds while the others finish loading. Whatever was built is
    # shut down if any start-up step fails or times out: no actor outlives a failed start.
    built: list = []
    try:
        learner = _built(built, learner_pool(cfg, policy_path))
        rollout = _built(built, rollout_pool(cfg, policy_path))
        reward = _built(built, reward_pool(cfg, terms))
        reference = None if reference_in_learner(cfg) else _built(built, Pool(
            "reference", ReferenceActor, p.reference, dict(
                policy_path=policy_path, compute_dtype=cfg.model.compute_dtype, device=pool_device(p.reference),
                torch_threads=p.reference.torch_threads, micro_batch_size=t.micro_batch_size,
                temperature=_temperature(cfg), logprob_chunk_tokens=t.logprob_chunk_tokens,
                attn_implementation=cfg.model.attn_implementation),
            loads=f"loading the policy {policy_path}", **_timeouts(cfg)))
        # The other pools go on loading meanwhile: their first calls wait on their constructors,
        # bounded by ray.startup_timeout_s from placement (Pool._check_started).
        finish_setup(learner, start_setup(learner))
    except BaseException:
        for pool in reversed(built):
            pool.shutdown()
        raise
    pools = Pools(rollout, reward, reference, learner, route=weight_route(cfg),
                  defer_loads=cfg.algo.max_staleness >= 2)
    if pools.route is not None and pools.route.usable(learner, rollout):
        pools.route.open(learner, rollout)  # both start from the same policy: nothing to send yet
    return pools, step_plan(cfg)


def _built(built: list, pool):
    built.append(pool)
    return pool


def weight_route(cfg: Config):
    from rlsr_ray.driver.weight_route import WeightRoute

    r, p = cfg.rollout, cfg.pools
    if not uses_weight_route(cfg):
        return None
    backend = r.weight_sync_backend
    if backend == "auto":
        backend = "nccl" if pool_device(p.learner) == "cuda" and pool_device(p.rollout) == "cuda" else "gloo"
    shards = r.vllm_tensor_parallel_size if r.backend == "vllm" else 1
    return WeightRoute(backend, int(r.weight_bucket_mb * 1e6), r.weight_sync_timeout_s, shards)
