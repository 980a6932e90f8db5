"""One RLSR step across the four pools:

    prompts -> rollout -> (reward || reference) -> advantages -> learners -> weights -> rollout

The generation a step trains on may have been started earlier (algo.max_staleness > 0 overlaps it
with the previous step's training). With dynamic sampling, groups whose rewards barely differ are
dropped and further prompts are generated until the step has train.prompts_per_step groups or
algo.max_refill_rounds is spent. Data moves as references (driver/pipeline.py); the driver
reads rewards and summaries only, and times each phase for metrics.jsonl.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from actors.pool import InputLost
from actors.sampling import SamplingSpec
from rlsr_ray.contract import batch
from rlsr_ray.config import Config
from rlsr_ray.algo.grpo import group_advantages, informative_groups
from rlsr_ray.driver.pipeline import (Generation, Pools, Scored, finish_generation, nonfinite_reason, score,
                               start_generation, sync_weights)
from rlsr_ray.plan.resources import StepPlan, minibatch_rows
from rlsr_ray.contract.selection import MinibatchParts, pieces, runs, used

log = logging.getLogger("rlsr_ray")

__all__ = ["Pools", "rlsr_step", "sampling_spec", "sync_weights", "build_train_table", "nonfinite_reason"]


def sampling_spec(cfg: Config, step: int, refill_round: int = 0) -> SamplingSpec:
    r = cfg.rollout
    return SamplingSpec(r.samples_per_prompt, r.max_new_tokens, r.temperature, r.top_p,
                        seed=cfg.run.seed * 1_000_003 + step + 7919 * refill_round)


def build_train_table(rollouts: pa.Table, rewards: pa.Table, ref: pa.Table, std_norm: bool) -> pa.Table:
    """TRAIN rows from whole tables in one process (the learners build theirs from pieces)."""
    rewards = rewards.select(batch.REWARDS.names)  # the learners need the sum, not its terms
    joined = batch.join(batch.join(rollouts, rewards, "rollouts+rewards"), ref, "rollouts+ref_logprobs")
    adv = group_advantages(joined.column("reward").to_numpy(), joined.column("group_id").to_numpy(), std_norm)
    joined = joined.append_column("advantage", pa.array(adv, pa.float32()))
    return batch.check(joined, batch.TRAIN, "train")


@dataclass
class Rounds:
    """Every generation a step made (the first, then refills), and which of their rows it trains on."""
    gens: list[Generation]
    scored: list[Scored]
    kept_rows: np.ndarray  # [K] indices into the rounds' rows, all rounds concatenated in order
    groups_dropped: int = 0
    refill_prompts: int = 0

    @property
    def rewards(self) -> pa.Table:
        return pa.concat_tables([s.rewards for s in self.scored])


def _kept_groups(cfg: Config, rewards: pa.Table) -> np.ndarray:
    """Per group of one generation (in row order): train on it?"""
    a = cfg.algo
    gids = rewards.column("group_id").to_numpy()
    if not a.dynamic_sampling:
        return np.ones(len(np.unique(gids)), bool)
    return informative_groups(rewards.column("reward").to_numpy(), gids, a.group_spread_rtol)


def _scored(pools: Pools, gen: Generation, attempts: int = 3) -> tuple[Generation, Scored]:
    """The generation finished and scored. Rollout tables lost with a node before they were read
    (a node gone after generating) are generated again from the same prompts and seeds."""
    for attempt in range(attempts):
        gen = finish_generation(pools, gen)
        try:
            return gen, score(pools, gen)
        except InputLost as e:
            if attempt == attempts - 1:
                raise
            log.warning("%s; generating those rollouts again", e)
            gen = start_generation(pools, gen.prompts, gen.spec, gen.step)
    raise AssertionError("unreachable")


def collect(cfg: Config, pools: Pools, gen: Generation, step: int,
            draw: Callable[[int, int], pa.Table]) -> tuple[Rounds, str | None]:
    """Generate (refilling dropped groups) and score; returns the rounds and, if the step must be
    skipped for non-finite rewards, why."""
    n, want = cfg.rollout.samples_per_prompt, cfg.train.prompts_per_step
    gens, scored, kept, offset, dropped, refill = [], [], [], 0, 0, 0
    while True:
        gen, s = _scored(pools, gen)
        gens.append(gen)
        scored.append(s)
        reason = nonfinite_reason(s.rewards)
        if reason:
            return Rounds(gens, scored, np.zeros(0, np.int64)), reason
        keep = _kept_groups(cfg, s.rewards)
        dropped += int((~keep).sum())
        kept += [offset + g * n + np.arange(n) for g in np.nonzero(keep)[0]]
        offset += gen.rows
        missing = want - len(kept)
        if missing <= 0 or len(gens) > cfg.algo.max_refill_rounds:
            break
        refill += missing
        gen = start_generation(pools, draw(missing, len(gens)), sampling_spec(cfg, step, len(gens)), step)
    kept = kept[:want]  # a refill may bring more informative groups than were missing
    rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return Rounds(gens, scored, rows, dropped, refill), None


def scores_table(rounds: Rounds, std_norm: bool) -> pa.Table:
    """SCORES of the kept rows, in their order: rewards plus group advantages."""
    kept = rounds.rewards.select(batch.REWARDS.names).take(pa.array(rounds.kept_rows, pa.int64()))
    adv = group_advantages(kept.column("reward").to_numpy(), kept.column("group_id").to_numpy(), std_norm)
    return batch.check(kept.append_column("advantage", pa.array(adv, pa.float32())), batch.SCORES, "scores")


def learner_parts(rounds: Rounds, scores: pa.Table, plan: StepPlan, cfg: Config) -> list[tuple]:
    """Per learner: the call arguments of train_parts (its mini-batch pieces, then the tables)."""
    roll_tables = [t for g in rounds.gens for t in g.tables]
    roll_sizes = [k for g in rounds.gens for k in g.sizes]
    ref_tables = [t for s in rounds.scored for t in s.ref_tables]
    ref_sizes = [k for s in rounds.scored for k in s.ref_sizes]
    lengths = np.concatenate([s["response_lengths"] for g in rounds.gens for s in g.summaries])[rounds.kept_rows]
    world, n, mbs = plan.learner_world_size, cfg.rollout.samples_per_prompt, cfg.train.micro_batch_size
    per_rank: list[list[tuple]] = [[] for _ in range(world)]  # (rollout sel, ref sel, scores, norm, passes)
    for first, rows in minibatch_rows(len(rounds.kept_rows) // n, n, cfg.train.mini_batch_prompts, world):
        norm = float(max(1, lengths[first:first + rows].sum())) if cfg.algo.loss_aggregation == "token_mean" \
            else float(rows)
        shares = batch.split(scores.slice(first, rows), world)
        passes = max(-(-len(sh) // mbs) for sh in shares)
        at = first
        for rank, share in enumerate(shares):
            ranges = runs(rounds.kept_rows[at:at + len(share)])
            at += len(share)
            # No reference pool (LoRA): the learner scores its rows under its base itself.
            ref = pieces(ref_sizes, ranges) if ref_tables else []
            per_rank[rank].append((pieces(roll_sizes, ranges), ref, share, norm, passes))
    args = []
    for mbs_of_rank in per_rank:
        r_idx, r_sel = used([m[0] for m in mbs_of_rank])
        f_idx, f_sel = used([m[1] for m in mbs_of_rank])
        parts = [MinibatchParts(rs, fs, m[2], m[3], m[4]) for m, rs, fs in zip(mbs_of_rank, r_sel, f_sel)]
        args.append((parts, len(r_idx), *[roll_tables[i] for i in r_idx], *[ref_tables[i] for i in f_idx]))
    return args


def train(pools: Pools, args: list[tuple]) -> dict[str, float]:
    stats = pools.learner.call("train_parts", args)
    tot = {k: sum(s[k] for s in stats) for k in ("tokens", "pg_sum", "kl_sum", "clipped_sum")}
    tokens = max(tot["tokens"], 1.0)
    minibatches = len(args[0][0])
    skipped = int(stats[0]["skipped"])  # every rank skips the same mini-batches
    if skipped:
        log.warning("%d of %d mini-batches not applied: %s", skipped, minibatches,
                    ", ".join(stats[0]["skip_reasons"]))
    applied = max(minibatches - skipped, 1)
    out = {
        "pg_loss": tot["pg_sum"] / tokens,
        "kl": tot["kl_sum"] / tokens,
        "clip_fraction": tot["clipped_sum"] / tokens,
        "grad_norm": stats[0]["grad_norm"] / applied,
        "skipped_minibatches": skipped,
        "minibatches": minibatches,
        "train_sequence_tokens": sum(s["sequence_tokens"] for s in stats),
        # Padding the learners computed on (rows padded to their micro-batch's longest prompt and
        # response), as a fraction of all the tokens they computed on.
        "train_padding_fraction": sum(s["padding_tokens"] for s in stats) / max(
            1.0, sum(s["padding_tokens"] + s["sequence_tokens"] for s in stats)),
    }
    if "reference_s" in stats[0]:  # no reference pool: the learners scored their rows under the base first
        out["learner_reference_s"] = max(s["reference_s"] for s in stats)
    if "peak_memory_mb" in stats[0]:  # CUDA learners
        out["learner_peak_memory_mb"] = max(s["peak_memory_mb"] for s in stats)
    return out


def term_means(rewards: pa.Table) -> dict[str, float]:
    """reward_<term>_mean of each reward term's column (copy_penalty's: the share of copies)."""
    return {f"reward_{n}_mean": float(np.nanmean(rewards.column(n).to_numpy()))
            for n in rewards.column_names if n not in batch.REWARDS.names}


def rollout_metrics(rounds: Rounds, version: int) -> dict[str, float]:
    # nan-aware: a skipped step still reports what its finite samples looked like
    rewards = rounds.rewards
    r = rewards.column("reward").to_numpy()
    summaries = [s for g in rounds.gens for s in g.summaries]
    lengths = np.concatenate([s["response_lengths"] for s in summaries])
    versions = [s["min_version"] for s in summaries if s["rows"]]
    return {
        "reward_mean": float(np.nanmean(r)),
        "reward_std": float(np.nanstd(r)),
        **term_means(rewards),
        "response_length_mean": float(np.mean(lengths)),
        "stop_rate": sum(s["stops"] for s in summaries) / max(1, len(lengths)),
        "policy_version": int(min(versions)),
        # Updates between the weights that generated the rollouts and the weights they train.
        "policy_staleness": version - int(min(versions)),
    }


def rlsr_step(cfg: Config, pools: Pools, plan: StepPlan, gen: Generation, step: int,
              draw: Callable[[int, int], pa.Table]) -> dict[str, Any]:
    """Run one full step on `gen` (started by the caller, maybe a step ago); returns its metrics
    row. `draw(k, round)` gives k further prompts for a refill. The policy version (updates
    applied) goes up by one, unless the step is skipped."""
    t0, version = time.perf_counter(), pools.policy_version
    rounds, reason = collect(cfg, pools, gen, step, draw)
    t_score = time.perf_counter()
    timing = rounds.scored[0].timing
    base = {"step": step + 1, **rollout_metrics(rounds, version), "samples": sum(g.rows for g in rounds.gens),
            "groups_dropped": rounds.groups_dropped, "refill_prompts": rounds.refill_prompts,
            "refill_rounds": len(rounds.gens) - 1}
    if reason:  # skipped, never applied: no training, no weight sync, the policy version stays
        log.warning("step %d skipped: %s", step + 1, reason)
        return {**base, "skipped": reason, "step_s": time.perf_counter() - t0}
    if base["policy_staleness"] > cfg.algo.max_staleness:  # the schedule in trainer.py prevents it
        raise RuntimeError(f"step {step + 1}: rollouts {base['policy_staleness']} versions old, over "
                           f"algo.max_staleness={cfg.algo.max_staleness}")
    scores = scores_table(rounds, cfg.algo.advantage_std_norm)
    t_join = time.perf_counter()
    args = learner_parts(rounds, scores, plan, cfg)
    if not args[0][0]:
        log.warning("step %d: %d rows kept, fewer than the %d learners: nothing to train on", step + 1,
                    len(scores), plan.learner_world_size)
        return {**base, "skipped": "too few informative groups", "step_s": time.perf_counter() - t0}
    train_stats = train(pools, args)
    t_train = time.perf_counter()
    sync_stats = sync_weights(pools, version + 1)
    t_sync = time.perf_counter()
    row: dict[str, Any] = {**base, **train_stats, **sync_stats}
    row["loss"] = train_stats["pg_loss"] + cfg.algo.kl_coef * train_stats["kl"]
    row["train_groups"] = len(scores) // cfg.rollout.samples_per_prompt
    row.update({
        # rollout_s: waiting for the first generation (0 when it finished during the last step).
        "rollout_s": rounds.gens[0].wait_s, "reward_s": timing["reward_s"], "reference_s": timing.get("reference_s", 0.0),
        "score_wall_s": t_score - t0 - rounds.gens[0].wait_s, "advantage_s": t_join - t_score,
        "train_s": t_train - t_join, "weight_sync_s": t_sync - t_train,
        "step_s": t_sync - t0, "samples_per_s": base["samples"] / (t_sync - t0),
    })
    return row
