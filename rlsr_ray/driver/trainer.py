"""The training run around the step: resume, the step loop, checkpoints and their retention.

A resumed run continues exactly where its last complete checkpoint left off: the learners reload
weights, optimizer and RNG state, the rollout actors receive those weights under the saved policy
version, the data cursor continues from its saved position, step seeds derive from the step
number, and metrics.jsonl lines written after that checkpoint are dropped so every step appears
once.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from actors.pool import ActorFailure, PoolTimeout
from rlsr_ray import checkpoint
from rlsr_ray import data
from rlsr_ray.config import Config
from rlsr_ray.driver.elastic import draining_nodes, membership_metrics
from rlsr_ray.driver.step import Pools, rlsr_step, sync_weights
from rlsr_ray.driver.pipeline import settle_loads
from rlsr_ray.driver.schedule import Schedule
from rlsr_ray.tracking.metrics import MetricsWriter, truncate_metrics
from rlsr_ray.plan.resources import StepPlan

log = logging.getLogger("rlsr_ray")


@dataclass
class Resume:
    step: int = 0  # steps already done
    cursor: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "position": 0})
    pending: dict[int, Any] = field(default_factory=dict)  # step index -> ROLLOUTS generated ahead


def find_resume(cfg: Config, out: Path, policy_path: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint run.resume points to, checked before any actor starts (fail fast)."""
    folder = checkpoint.resolve_resume(cfg.run.resume, out)
    return None if folder is None else (folder, resumable(cfg, folder, policy_path))


def resumable(cfg: Config, folder: Path, policy_path: str) -> dict[str, Any]:
    """The checkpoint's trainer state, if training can go on from it exactly; else CheckpointError."""
    state = checkpoint.read_state(folder)
    if state["reference_policy"] != policy_path:
        raise checkpoint.CheckpointError(
            f"{folder}: trained against reference {state['reference_policy']!r}, but model.policy resolves to "
            f"{policy_path!r}")
    saved = state["optimizer"]
    if (saved["zero_stage"] == 0) != (cfg.train.zero_stage == 0):
        raise checkpoint.CheckpointError(
            f"{folder}: optimizer state is ZeRO-{saved['zero_stage']}, but this run has train.zero_stage="
            f"{cfg.train.zero_stage}; ZeRO-0 state resumes with ZeRO-0, ZeRO >= 1 state with any stage >= 1 "
            f"and any number of learners")
    from rlsr_ray.modeling.lora import LoraSpec

    spec = LoraSpec.from_config(cfg.train.lora)
    if state.get("lora") != (spec.to_dict() if spec else None):
        raise checkpoint.CheckpointError(
            f"{folder}: written with train.lora {_lora_line(state.get('lora'))}, this run has "
            f"{_lora_line(spec.to_dict() if spec else None)}; resume with the adapters that wrote it")
    if int(state.get("max_staleness", 0)) != cfg.algo.max_staleness:
        raise checkpoint.CheckpointError(
            f"{folder}: written with algo.max_staleness={state.get('max_staleness', 0)}, this run has "
            f"{cfg.algo.max_staleness}; resume with the setting that wrote it (its rollouts generated "
            f"ahead depend on it)")
    return state


def _lora_line(spec: dict | None) -> str:
    return "off" if spec is None else ", ".join(f"{k}={v}" for k, v in spec.items())


def restore(cfg: Config, pools: Pools, out: Path, found: tuple[Path, dict[str, Any]] | None) -> Resume:
    """Load a checkpoint found by find_resume into the pools; returns where to go on."""
    if found is None:
        if cfg.run.resume == "auto":
            log.info("run.resume=auto: no complete checkpoint in %s, starting fresh", out)
        elif checkpoint.complete_checkpoints(out):
            log.warning("%s holds checkpoints of an earlier run; --run.resume=auto continues it", out)
        # A fresh run owns its output dir: no metrics or baseline of an earlier run carry over.
        truncate_metrics(out, 0)
        (out / "heldout_before.json").unlink(missing_ok=True)
        return Resume()
    folder, state = found
    dropped = _load_into_pools(pools, out, folder, state)
    log.info("resumed from %s at step %d (%d metrics lines after it dropped)", folder, state["step"], dropped)
    return Resume(int(state["step"]), dict(state["cursor"]), _pending(folder, state))


def _pending(folder: Path | None, state: dict[str, Any]) -> dict[int, Any]:
    return checkpoint.load_pending(folder, list(state.get("pending_steps", []))) if folder else {}


def _load_into_pools(pools: Pools, out: Path, folder: Path | None, state: dict[str, Any]) -> int:
    """Learners load the checkpoint (None: keep their initial weights), rollout actors get those
    weights, and metrics lines after its step are dropped; returns how many were dropped."""
    if folder is not None:
        pools.learner.call("load_checkpoint", [(str(folder),)] * pools.learner.size)
    sync_weights(pools, int(state["policy_version"]))
    return truncate_metrics(out, int(state["step"]))


def baseline_eval(pools: Pools, heldout, max_new_tokens: int, out: Path) -> dict[str, Any]:
    """The 'before' evaluation, computed once per output dir so a resumed run compares with it."""
    from rlsr_ray.driver.heldout import heldout_similarity

    path = out / "heldout_before.json"
    if path.exists():
        return json.loads(path.read_text())
    before = heldout_similarity(pools, heldout, max_new_tokens)
    path.write_text(json.dumps(before))
    return before


def save_checkpoint(pools: Pools, out: Path, step: int, schedule: Schedule, policy_path: str,
                    keep: int, final: bool = False) -> str:
    """`final`: under LoRA the checkpoint also holds merged/, the plain HF folder of the result."""
    path = checkpoint.step_dir(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    pending = schedule.pending_tables()
    state = {"step": step, "policy_version": pools.policy_version, "cursor": schedule.cursor.state(),
             "reference_policy": policy_path, "max_staleness": schedule.cfg.algo.max_staleness}
    # Only rank 0 writes the rollouts generated ahead; the others get none.
    args = [(str(path), state, pending if rank == 0 else None, final) for rank in range(pools.learner.size)]
    saved = pools.learner.call("save_pretrained", args)[0]
    checkpoint.prune(out, keep)
    return saved


def train_loop(cfg: Config, pools: Pools, plan: StepPlan, train_tok, out: Path, resume: Resume,
               policy_path: str, rebuild_learners: Callable[..., tuple[Any, StepPlan]], trackers: Any = None
               ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Steps from resume.step to run.steps; returns their metrics rows and checkpoint timings.
    `trackers` (rlsr_ray.tracking.Trackers) get every row and each checkpoint's path."""
    from tqdm import tqdm

    cursor = data.PromptCursor(len(train_tok.prompt_ids), cfg.run.seed, **resume.cursor)
    schedule = Schedule(cfg, pools, train_tok, cursor, resume.pending)
    rows: list[dict[str, Any]] = []
    writer = MetricsWriter(out, trackers)
    bar = tqdm(desc="rlsr", unit="step", initial=resume.step, total=cfg.run.steps, disable=not cfg.run.progress,
               file=sys.stderr)
    step, rebuilds = resume.step, 0
    saving = {"checkpoint_s": 0.0, "checkpoints": 0}
    drained: set[str] = set()  # draining nodes already acted on
    watch = any(p.remote for p in pools.all())
    try:
        while step < cfg.run.steps:
            draining = {n: d for n, d in draining_nodes().items() if n not in drained} if watch else {}
            if draining:
                drained |= set(draining)
                moved = leave_draining_nodes(cfg, pools, out, train_tok, policy_path, rebuild_learners, step,
                                             schedule, draining)
                if moved is not None:
                    writer.close()
                    step, schedule, plan = moved
                    writer = MetricsWriter(out, trackers)
            grown = grow_learners(cfg, pools, out, train_tok, policy_path, rebuild_learners, step, plan) \
                if watch else None
            if grown is not None:
                writer.close()
                step, schedule, plan = grown
                writer = MetricsWriter(out, trackers)
            try:
                row = rlsr_step(cfg, pools, plan, schedule.take(step), step, schedule.refills(step))
                row["prompts_truncated"], row["prompts_dropped"] = train_tok.truncated, train_tok.dropped
                row["learners"] = plan.learner_world_size
                row.update(membership_metrics(pools, step + 1))
                # The row goes first: a checkpoint on disk never runs ahead of metrics.jsonl.
                writer.write(row)
                rows.append(row)
                if step + 1 == cfg.run.steps or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                    t0 = time.perf_counter()
                    path = save_checkpoint(pools, out, step + 1, schedule, policy_path, cfg.run.keep_checkpoints,
                                           final=step + 1 == cfg.run.steps)
                    took = time.perf_counter() - t0
                    saving["checkpoint_s"] += took
                    saving["checkpoints"] += 1
                    log.info("step %d: checkpoint %s written in %.1fs", step + 1, path, took)
                    if trackers is not None:
                        trackers.log_checkpoint(step + 1, str(path))
            except PoolTimeout as e:  # the pool and ranks are in the message; add the step
                raise PoolTimeout(f"step {step + 1}: {e}") from None
            except ActorFailure as e:
                if e.role != "learner" or rebuilds >= cfg.pools.learner.max_restarts:
                    raise
                rebuilds += 1
                writer.close()
                step, schedule, plan = recover_learners(cfg, pools, out, train_tok, policy_path, rebuild_learners,
                                                        step + 1, str(e))
                rows = [r for r in rows if r["step"] <= step]
                writer = MetricsWriter(out, trackers)
                bar.n = step
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row.get('kl', float('nan')):.4f}",
                            len=f"{row['response_length_mean']:.0f}")
        settle_loads(pools)  # the last sync's load, where it was left queued (algo.max_staleness >= 2)
    finally:
        writer.close()
        bar.close()
    return rows, saving


def leave_draining_nodes(cfg: Config, pools: Pools, out: Path, train_tok, policy_path: str,
                         rebuild: Callable[[], tuple[Any, StepPlan]], step: int, schedule: Schedule,
                         draining: dict[str, float]) -> tuple[int, Schedule, StepPlan] | None:
    """Before their nodes go: elastic pools take their actors there out, and a learner group with a
    rank there writes a checkpoint of the steps done and is rebuilt elsewhere from it, so the loss
    costs no step done again. Returns recover_learners' (step, schedule, plan) if the learners moved."""
    nodes = set(draining)
    left = {n: round(d - time.time(), 1) for n, d in draining.items()}
    log.warning("node(s) draining, seconds to their deadline: %s", left)
    for pool in pools.elastic():
        pool.retire(nodes)
    if not nodes & set(pools.learner.nodes()):
        return None
    if step > 0 and checkpoint.latest(out, at_most=step) != checkpoint.step_dir(out, step):
        t0 = time.perf_counter()
        save_checkpoint(pools, out, step, schedule, policy_path, cfg.run.keep_checkpoints)
        log.warning("step %d: checkpoint written in %.1fs ahead of a learner node's drain", step,
                    time.perf_counter() - t0)
    return recover_learners(cfg, pools, out, train_tok, policy_path, rebuild, step,
                            "a learner's node is draining")


def grow_learners(cfg: Config, pools: Pools, out: Path, train_tok, policy_path: str,
                  rebuild: Callable[..., tuple[Any, StepPlan]], step: int,
                  plan: StepPlan) -> tuple[int, Schedule, StepPlan] | None:
    """At a checkpoint boundary (the newest checkpoint is of the steps done), a learner group
    below pools.learner.max_actors (set: growth is opt-in) is rebuilt larger where the cluster has
    room now, from that checkpoint: nothing is done again. Returns recover_learners' result."""
    from rlsr_ray.driver.pools import room_for_learners
    from rlsr_ray.config.pool_sizes import learner_sizes

    now = plan.learner_world_size
    if cfg.pools.learner.max_actors is None or step == 0 or now >= max(learner_sizes(cfg)):
        return None
    if checkpoint.latest(out, at_most=step) != checkpoint.step_dir(out, step):
        return None
    size = next((s for s in learner_sizes(cfg) if s > now and room_for_learners(cfg, s - now)), None)
    if size is None:
        return None
    return recover_learners(cfg, pools, out, train_tok, policy_path, lambda: rebuild(at_most=size), step,
                            f"room for {size - now} more learner(s) at a checkpoint")


def recover_learners(cfg: Config, pools: Pools, out: Path, train_tok, policy_path: str,
                     rebuild: Callable[[], tuple[Any, StepPlan]], failed_step: int,
                     what: str) -> tuple[int, Schedule, StepPlan]:
    """Replace a learner group that lost an actor: new actors (fewer, down to
    pools.learner.min_actors, where the cluster cannot place them all: a node gone), the newest
    checkpoint (or the initial weights), those weights to the rollout pool. Steps after that
    checkpoint run again; their metrics lines are dropped, so each step is recorded once."""
    log.warning("step %d: %s; rebuilding the learner pool and restoring the newest checkpoint", failed_step, what)
    pools.learner.shutdown()
    pools.learner, plan = rebuild()
    log.warning("learner group rebuilt with %d learner(s)", plan.learner_world_size)
    # Never a checkpoint from beyond this run's progress (an earlier run may have left some).
    folder = checkpoint.latest(out, at_most=failed_step)
    state = resumable(cfg, folder, policy_path) if folder is not None else \
        {"step": 0, "policy_version": 0, "cursor": {"epoch": 0, "position": 0}}
    _load_into_pools(pools, out, folder, state)
    step, cursor_state = int(state["step"]), dict(state["cursor"])
    log.warning("learners restored to step %d from %s; training goes on from there", step,
                folder or "the initial weights")
    # Generations queued before the failure are abandoned: those saved with the checkpoint replace them.
    cursor = data.PromptCursor(len(train_tok.prompt_ids), cfg.run.seed, **cursor_state)
    return step, Schedule(cfg, pools, train_tok, cursor, _pending(folder, state)), plan


def throughput(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"steps": 0}
    keys = ["rollout_s", "reward_s", "reference_s", "score_wall_s", "train_s", "weight_sync_s", "step_s"]
    totals = {k: sum(r.get(k, 0.0) for r in rows) for k in keys}  # skipped steps time only rollout
    samples = sum(r["samples"] for r in rows)
    return {"steps": len(rows), "samples": samples, "samples_per_s": samples / totals["step_s"],
            "time_split_s": totals}
