"""One RLSR step across the four pools:

    prompts -> rollout -> (reward || reference) -> advantages -> learners -> weights -> rollout

The driver slices data per actor before it enters the object store, checks every table that comes
back against the Arrow contract, joins by key, and times each phase for metrics.jsonl.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.pool import Pool
from actors.sampling import SamplingSpec
from rlsr_ray import batch
from rlsr_ray.config import Config
from rlsr_ray.grpo import group_advantages
from rlsr_ray.plan import StepPlan
from rlsr_ray.weight_route import WeightRoute

log = logging.getLogger("rlsr_ray")


@dataclass
class Pools:
    rollout: Pool
    reward: Pool
    reference: Pool
    learner: Pool

    route: WeightRoute | None = None  # learner rank 0 -> rollout actors; None: object store only
    policy_version: int = 0  # the version every rollout actor should hold (set by sync_weights)

    def all(self) -> list[Pool]:
        return [self.rollout, self.reward, self.reference, self.learner]


def _put(pool: Pool, tables: list[pa.Table]) -> list[Any]:
    """Object refs for remote pools (one put per shard), the tables themselves for local ones."""
    if not pool.remote:
        return tables
    import ray

    return [ray.put(t) for t in tables]


def generate(pools: Pools, prompts: pa.Table, spec: SamplingSpec) -> pa.Table:
    shards = _put(pools.rollout, batch.split(prompts, pools.rollout.size))
    outs = pools.rollout.call("generate", [(s, spec) for s in shards])
    table = pa.concat_tables([batch.check(t, batch.ROLLOUTS, "rollouts") for t in outs])
    stale = pc.min(table.column("policy_version")).as_py() if len(table) else pools.policy_version
    if stale != pools.policy_version:
        # A rollout actor restarted (Ray re-ran __init__: initial weights) and Ray retried the
        # call on it. Give every actor the current weights, then generate this step again.
        log.warning("rollout actor came back with policy version %s instead of %d: re-syncing weights and "
                    "regenerating", stale, pools.policy_version)
        sync_weights(pools, pools.policy_version)
        outs = pools.rollout.call("generate", [(s, spec) for s in shards])
        table = pa.concat_tables([batch.check(t, batch.ROLLOUTS, "rollouts") for t in outs])
    if len(table) != len(prompts) * spec.n:
        raise batch.BatchError(f"rollouts: expected {len(prompts) * spec.n} rows, got {len(table)}")
    return table


def score_and_reference(pools: Pools, rollouts: pa.Table, with_reference: bool = True
                        ) -> tuple[pa.Table, pa.Table | None, dict[str, float]]:
    """Reward and reference pools score the same rollouts concurrently.

    Timing: `reward_s` and `reference_s` are each from the shared start until that pool's last
    result was ready, whichever finished first, so their overlap shows (the phase's wall time is
    the larger). Pools running in the driver run one after the other and are timed on their own.
    """
    t0, submitted = time.perf_counter(), time.monotonic()
    reward_shards = batch.split(rollouts, pools.reward.size)
    reward_refs = _put(pools.reward, reward_shards)
    pending_reward = pools.reward.submit("score", [(r,) for r in reward_refs])
    timing = {"reward_s": time.perf_counter() - t0}  # local pools: already done
    pending_ref = None
    if with_reference:
        t_ref = time.perf_counter()
        same = pools.reference.size == pools.reward.size and pools.reference.remote == pools.reward.remote
        ref_refs = reward_refs if same else _put(pools.reference, batch.split(rollouts, pools.reference.size))
        pending_ref = pools.reference.submit("logprobs", [(r,) for r in ref_refs])
        timing["reference_s"] = time.perf_counter() - t_ref
    remote = {"reward_s": pending_reward if pools.reward.remote else [],
              "reference_s": pending_ref if pending_ref is not None and pools.reference.remote else []}
    timing.update(_ready_after(remote, t0, pools.reward.call_timeout_s))
    rewards = pa.concat_tables([batch.check(t, batch.REWARDS, "rewards")
                                for t in pools.reward.get(pending_reward, "score", submitted)])
    if getattr(pools.reward, "deferred", False):  # a service: done when its answer is in
        timing["reward_s"] = time.perf_counter() - t0
    ref = None
    if pending_ref is not None:
        ref = pa.concat_tables([batch.check(t, batch.REF_LOGPROBS, "ref_logprobs")
                                for t in pools.reference.get(pending_ref, "logprobs", submitted)])
    return rewards, ref, timing


def _ready_after(pending: dict[str, list[Any]], t0: float, timeout_s: float) -> dict[str, float]:
    """Seconds from t0 until all of each named list of ObjectRefs were ready (a failure counts as
    ready: Pool.get reports it). Stops at the timeout and leaves that to Pool.get to report."""
    if not any(pending.values()):
        return {}
    import ray

    owner = {ref: name for name, refs in pending.items() for ref in refs}
    left = {name: len(refs) for name, refs in pending.items() if refs}
    out: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while owner:
        ready, _ = ray.wait(list(owner), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        name = owner.pop(ready[0])
        left[name] -= 1
        if left[name] == 0:
            out[name] = time.perf_counter() - t0
    return out


def build_train_table(rollouts: pa.Table, rewards: pa.Table, ref: pa.Table, std_norm: bool) -> pa.Table:
    joined = batch.join(batch.join(rollouts, rewards, "rollouts+rewards"), ref, "rollouts+ref_logprobs")
    adv = group_advantages(joined.column("reward").to_numpy(), joined.column("group_id").to_numpy(), std_norm)
    joined = joined.append_column("advantage", pa.array(adv, pa.float32()))
    return batch.check(joined, batch.TRAIN, "train")


def minibatch_shards(train: pa.Table, plan: StepPlan, aggregation: str
                     ) -> tuple[list[list[pa.Table]], list[float]]:
    """Per learner, its slice of each mini-batch; plus each mini-batch's loss normaliser."""
    # Shuffle-free and deterministic: mini-batches are consecutive groups in prompt order.
    per_learner: list[list[pa.Table]] = [[] for _ in range(plan.learner_world_size)]
    norms = []
    for m in range(plan.minibatches_per_step):
        mb = train.slice(m * plan.rows_per_minibatch, plan.rows_per_minibatch)
        if aggregation == "token_mean":
            norms.append(float(max(1, pc.sum(pc.list_value_length(mb.column("response_ids"))).as_py() or 0)))
        else:
            norms.append(float(len(mb)))
        for rank, shard in enumerate(batch.split(mb, plan.learner_world_size)):
            per_learner[rank].append(shard)
    return per_learner, norms


def train(pools: Pools, train_table: pa.Table, plan: StepPlan, aggregation: str) -> dict[str, float]:
    shards, norms = minibatch_shards(train_table, plan, aggregation)
    stats = pools.learner.call("train_step", [(s, norms) for s in shards])
    tot = {k: sum(s[k] for s in stats) for k in ("tokens", "pg_sum", "kl_sum", "clipped_sum")}
    tokens = max(tot["tokens"], 1.0)
    skipped = int(stats[0]["skipped"])  # every rank skips the same mini-batches
    if skipped:
        log.warning("%d of %d mini-batches not applied: %s", skipped, plan.minibatches_per_step,
                    ", ".join(stats[0]["skip_reasons"]))
    applied = max(plan.minibatches_per_step - skipped, 1)
    out = {
        "pg_loss": tot["pg_sum"] / tokens,
        "kl": tot["kl_sum"] / tokens,
        "clip_fraction": tot["clipped_sum"] / tokens,
        "grad_norm": stats[0]["grad_norm"] / applied,
        "skipped_minibatches": skipped,
        "train_sequence_tokens": sum(s["sequence_tokens"] for s in stats),
    }
    if "peak_memory_mb" in stats[0]:  # CUDA learners
        out["learner_peak_memory_mb"] = max(s["peak_memory_mb"] for s in stats)
    return out


def sync_weights(pools: Pools, version: int) -> dict[str, Any]:
    """Learner weights to every rollout actor: over the weight route when it is open, else through
    the object store, after which the route is opened (again) for the next sync."""
    route = pools.route
    stats = route.sync(pools.learner, pools.rollout, version) if route is not None else None
    if stats is None:
        stats = _sync_through_object_store(pools, version)
        if route is not None and route.usable(pools.learner, pools.rollout):
            route.open(pools.learner, pools.rollout)
    pools.policy_version = version
    return stats


def _sync_through_object_store(pools: Pools, version: int) -> dict[str, Any]:
    if pools.learner.remote:  # rank 0 puts its export itself: the driver holds a reference only
        ref, nbytes = pools.learner.call("publish_weights", [()] * pools.learner.size)[0]  # all ranks: ZeRO-3
        weights = ref if pools.rollout.remote else _fetch(ref)
    else:
        state = pools.learner.call("export_weights", [()] * pools.learner.size)[0]
        nbytes = sum(v.nbytes for v in state.values())
        weights = _put(pools.rollout, [state])[0]  # put once, not once per rollout actor
    pools.rollout.get(pools.rollout.broadcast("load_weights", weights, version), "load_weights")
    return {"weight_sync_path": "object_store", "weight_sync_mb": nbytes / 1e6}


def _fetch(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def nonfinite_reason(rewards: pa.Table) -> str | None:
    """Why a step must be skipped (NaN/inf rewards or similarities), or None."""
    for col in ("reward", "similarity"):
        bad = int(np.sum(~np.isfinite(rewards.column(col).to_numpy())))
        if bad:
            return f"{bad} non-finite value(s) in {col}"
    return None


def rollout_summary(rollouts: pa.Table, rewards: pa.Table) -> dict[str, float]:
    # nan-aware: a skipped step still reports what its finite samples looked like
    r = rewards.column("reward").to_numpy()
    lengths = pc.list_value_length(rollouts.column("response_ids")).to_numpy()
    return {
        "reward_mean": float(np.nanmean(r)),
        "reward_std": float(np.nanstd(r)),
        "similarity_mean": float(np.nanmean(rewards.column("similarity").to_numpy())),
        "lcs_penalty_rate": float(np.mean(rewards.column("lcs_penalized").to_numpy(zero_copy_only=False))),
        "response_length_mean": float(np.mean(lengths)),
        "stop_rate": float(np.mean(np.array(rollouts.column("finish_reason").to_pylist()) == "stop")),
        "policy_version": int(pc.min(rollouts.column("policy_version")).as_py()),
    }


def rlsr_step(cfg: Config, pools: Pools, plan: StepPlan, prompts: pa.Table, step: int) -> dict[str, Any]:
    """Run one full step; returns its metrics row. The policy version after it is step + 1."""
    t0 = time.perf_counter()
    r = cfg.rollout
    spec = SamplingSpec(r.samples_per_prompt, r.max_new_tokens, r.temperature, r.top_p,
                        seed=cfg.run.seed * 1_000_003 + step)
    rollouts = generate(pools, prompts, spec)
    t_gen = time.perf_counter()
    rewards, ref, timing = score_and_reference(pools, rollouts)
    t_score = time.perf_counter()
    reason = nonfinite_reason(rewards)
    if reason:  # skipped, never applied: no training, no weight sync, the policy version stays
        log.warning("step %d skipped: %s", step + 1, reason)
        row = {"step": step + 1, "skipped": reason, **rollout_summary(rollouts, rewards),
               "rollout_s": t_gen - t0, "step_s": time.perf_counter() - t0, "samples": len(rollouts)}
        return row
    train_table = build_train_table(rollouts, rewards, ref, cfg.algo.advantage_std_norm)
    train_stats = train(pools, train_table, plan, cfg.algo.loss_aggregation)
    t_train = time.perf_counter()
    sync_stats = sync_weights(pools, step + 1)
    t_sync = time.perf_counter()
    row: dict[str, Any] = {"step": step + 1}
    row.update(rollout_summary(rollouts, rewards))
    row.update(train_stats)
    row["loss"] = train_stats["pg_loss"] + cfg.algo.kl_coef * train_stats["kl"]
    row.update(sync_stats)
    row.update({
        "rollout_s": t_gen - t0, "reward_s": timing["reward_s"], "reference_s": timing["reference_s"],
        "score_wall_s": t_score - t_gen, "train_s": t_train - t_score, "weight_sync_s": t_sync - t_train,
        "step_s": t_sync - t0, "samples": len(rollouts), "samples_per_s": len(rollouts) / (t_sync - t0),
    })
    return row
