"""The step's data path as ObjectRefs: pools hand each other tables, the driver holds references.

    rollout --tables--> reward      --rewards (small)--> driver: advantages, dynamic sampling
            --tables--> reference   --tables---------------------------+
            --tables---------------------------------------------------+--> learners (join)

A rollout actor returns its table and a summary as two objects; the driver fetches summaries and
rewards (a few numbers per sample) and sends each consumer only the tables its rows are in, with
pieces naming the rows (rlsr_ray/contract/selection.py). Each table is checked by the actor that makes it
and by the actor that reads it. Pools run in the driver (num_actors: 0) go through the same code
with the tables themselves in place of references.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors import placement_watch
from actors.pool import Pool
from actors.sampling import SamplingSpec
from rlsr_ray.contract import batch
from rlsr_ray.contract.selection import contiguous, pieces, used
from rlsr_ray.driver.weight_route import WeightRoute

log = logging.getLogger("rlsr_ray")


@dataclass
class Pools:
    rollout: Pool
    reward: Pool
    reference: Pool | None  # None: the learners compute the reference themselves (LoRA, adapters off)
    learner: Pool

    route: WeightRoute | None = None  # learner rank 0 -> rollout actors; None: object store only
    policy_version: int = 0  # the version every rollout actor should hold (set by sync_weights)
    in_flight: list[Any] = field(default_factory=list)  # summary refs of generations submitted
    # Off-policy with k >= 2: an object-store sync is queued behind the generations already on
    # the rollout actors and not waited for, so the learners train the next step meanwhile.
    # Its calls are checked at the next sync (or settle_loads), by when they have long finished.
    defer_loads: bool = False
    pending_loads: list[Any] = field(default_factory=list)

    def all(self) -> list[Pool]:
        return [*self.elastic(), self.learner]

    def elastic(self) -> list[Pool]:
        """The pools whose actors come and go one at a time (the learners are rebuilt whole)."""
        return [p for p in (self.rollout, self.reward, self.reference) if p is not None]


def put(pool: Pool, tables: list[Any]) -> list[Any]:
    """Object refs for remote pools (one put per shard), the values themselves for local ones."""
    if not pool.remote:
        return tables
    import ray

    return [ray.put(t) for t in tables]


@dataclass
class Generation:
    """One rollout call across the pool; its tables stay where they were made."""
    step: int  # the step its prompts were drawn for
    prompts: pa.Table  # kept (small) to generate again if a restarted actor lost its weights
    spec: SamplingSpec
    version: int  # the policy version the rollout actors hold when it runs
    tables: list[Any]  # per rollout actor: its ROLLOUTS table (a reference when remote)
    summaries: list[Any]  # per rollout actor: selection.rollout_summary of its table (refs until done)
    done: bool = False
    wait_s: float = 0.0  # how long the driver waited for it to finish

    @property
    def sizes(self) -> list[int]:
        return [s["rows"] for s in self.summaries]

    @property
    def rows(self) -> int:
        return sum(self.sizes)


def start_generation(pools: Pools, prompts: pa.Table, spec: SamplingSpec, step: int) -> Generation:
    """Submit generation and return at once: it queues behind the actors' earlier calls, so it
    runs on the weights they hold by then (the version recorded here)."""
    shards = put(pools.rollout, batch.split(prompts, pools.rollout.size))
    outs = pools.rollout.submit("generate_summarised", [(s, spec) for s in shards], num_returns=2, resend=True)
    if pools.rollout.remote and pools.route is not None:
        pools.in_flight.extend(o[1] for o in outs)
    return Generation(step, prompts, spec, pools.policy_version, [o[0] for o in outs], [o[1] for o in outs])


def finish_generation(pools: Pools, gen: Generation) -> Generation:
    """Wait for a generation's summaries. A rollout actor that Ray restarted (back to the initial
    weights) shows as a version other than the one the generation was queued for: every actor
    then gets the current weights and the prompts are generated again."""
    if gen.done:
        return gen
    t0 = time.perf_counter()
    summaries = pools.rollout.get(gen.summaries, "generate")
    gen.tables = [pools.rollout.current(t) for t in gen.tables]  # a lost actor's share, generated again
    pools.in_flight = [r for r in pools.in_flight if all(r is not g for g in gen.summaries)]
    wrong = sorted({s["min_version"] for s in summaries if s["rows"]} - {gen.version})
    if wrong:
        log.warning("rollout actor came back with policy version %s instead of %d: re-syncing weights and "
                    "regenerating", wrong[0], gen.version)
        sync_weights(pools, pools.policy_version)
        return finish_generation(pools, start_generation(pools, gen.prompts, gen.spec, gen.step))
    gen.summaries, gen.done, gen.wait_s = summaries, True, time.perf_counter() - t0
    want = len(gen.prompts) * gen.spec.n
    if gen.rows != want:
        raise batch.BatchError(f"rollouts: expected {want} rows, got {gen.rows}")
    return gen


def loaded_generation(pools: Pools, table: pa.Table, spec: SamplingSpec, step: int) -> Generation:
    """A finished generation from a ROLLOUTS table read back from a checkpoint."""
    from rlsr_ray.contract.selection import rollout_summary

    prompts = table.filter(pc.equal(table.column("sample_idx"), 0)).select(batch.PROMPTS.names)
    summary = rollout_summary(table)
    return Generation(step, batch.check(prompts, batch.PROMPTS, "pending prompts"), spec, summary["min_version"],
                      put(pools.rollout, [table]), [summary], done=True)


def fetch_rollouts(pools: Pools, gen: Generation) -> pa.Table:
    """The whole ROLLOUTS table in the driver: for evaluation and checkpoints, not the step."""
    tables = pools.rollout.get(gen.tables, "generate") if pools.rollout.remote else gen.tables
    return pa.concat_tables([batch.check(t, batch.ROLLOUTS, "rollouts") for t in tables])


@dataclass
class Scored:
    """A generation's rewards (in the driver, row order of the generation) and its reference
    log-probs (left with the reference actors: tables or references, and their row counts)."""
    rewards: pa.Table
    ref_tables: list[Any] = field(default_factory=list)
    ref_sizes: list[int] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


def _slices(gen: Generation, consumers: int) -> list[tuple[list[Any], list]]:
    """Per consumer: the rollout tables it reads and the pieces of them (contiguous row ranges)."""
    out = []
    for start, rows in contiguous(gen.rows, consumers):
        tables, (sel,) = used([pieces(gen.sizes, [(start, rows)])])
        out.append(([gen.tables[t] for t in tables], sel))
    return out


def score(pools: Pools, gen: Generation, with_reference: bool = True) -> Scored:
    """Reward and reference pools read the same rollout tables concurrently (without a reference
    pool, the learners compute the reference log-probs when they train).

    Timing: `reward_s` and `reference_s` are each from the shared start until that pool's last
    result was ready, so their overlap shows; pools running in the driver run one after the other.
    """
    with_reference = with_reference and pools.reference is not None
    pools.reward.admit()  # actors placed since the last step join (an elastic pool)
    if with_reference:
        pools.reference.admit()
    t0, submitted = time.perf_counter(), time.monotonic()
    reward_args = [(sel, *tables) for tables, sel in _slices(gen, pools.reward.size)]
    pending_reward = pools.reward.submit("score_parts", reward_args, resend=True)
    timing = {"reward_s": time.perf_counter() - t0}  # local pools: already done
    ref_tables, ref_counts = [], []
    if with_reference:
        t_ref = time.perf_counter()
        ref_args = [(sel, *tables) for tables, sel in _slices(gen, pools.reference.size)]
        outs = pools.reference.submit("logprobs_counted", ref_args, num_returns=2, resend=True)
        ref_tables, ref_counts = [o[0] for o in outs], [o[1] for o in outs]
        timing["reference_s"] = time.perf_counter() - t_ref
    remote = {"reward_s": pending_reward if pools.reward.remote else [],
              "reference_s": ref_counts if with_reference and pools.reference.remote else []}
    timing.update(_ready_after(remote, t0, pools.reward.call_timeout_s))
    rewards = pa.concat_tables([batch.check_rewards(t, "rewards")
                                for t in pools.reward.get(pending_reward, "score", submitted)])
    if getattr(pools.reward, "deferred", False):  # a service: done when its answer is in
        timing["reward_s"] = time.perf_counter() - t0
    # The row counts, not the tables: a failed or late reference actor is reported here, in the
    # pool's words, while its tables stay in the object store for the learners.
    ref_sizes = pools.reference.get(ref_counts, "logprobs", submitted) if with_reference else []
    ref_tables = [pools.reference.current(t) for t in ref_tables]
    if with_reference and sum(ref_sizes) != gen.rows:
        raise batch.BatchError(f"ref_logprobs: expected {gen.rows} rows, got {sum(ref_sizes)}")
    if len(rewards) != gen.rows:
        raise batch.BatchError(f"rewards: expected {gen.rows} rows, got {len(rewards)}")
    return Scored(rewards, ref_tables, ref_sizes, timing)


def _ready_after(pending: dict[str, list[Any]], t0: float, timeout_s: float) -> dict[str, float]:
    """Seconds from t0 until all of each named list of ObjectRefs were ready (a failure counts as
    ready: Pool.get reports it). Stops at the timeout and leaves that to Pool.get to report."""
    if not any(pending.values()):
        return {}
    owner = {ref: name for name, refs in pending.items() for ref in refs}
    left = {name: len(refs) for name, refs in pending.items() if refs}
    out: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while owner:
        ready, _ = placement_watch.wait(list(owner), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        name = owner.pop(ready[0])
        left[name] -= 1
        if left[name] == 0:
            out[name] = time.perf_counter() - t0
    return out


def sync_weights(pools: Pools, version: int) -> dict[str, Any]:
    """Learner weights to every rollout actor: over the weight route when it is open, else through
    the object store, after which the route is opened (again) for the next sync."""
    route = pools.route
    settle_loads(pools)
    # Rollout actors placed since the last sync join here, so that they start from these weights
    # (the route, opened for the actors before, is not open for the new set: this sync takes the
    # object store and opens the route again).
    pools.rollout.admit()
    if route is not None:
        _drain(pools)
    stats = route.sync(pools.learner, pools.rollout, version) if route is not None else None
    if stats is None:
        stats = _sync_through_object_store(pools, version)
        if route is not None and route.usable(pools.learner, pools.rollout):
            route.open(pools.learner, pools.rollout)
    pools.policy_version = version
    return stats


def _drain(pools: Pools) -> None:
    """Wait until the rollout actors have finished every generation queued on them. A broadcast
    over the route holds learner rank 0 in a collective until each rollout actor reaches its
    receiving call, which queues behind those generations; off-policy, one may still be running,
    and a wait inside the collective would count against rollout.weight_sync_timeout_s."""
    if not pools.in_flight:
        return
    placement_watch.wait(pools.in_flight, num_returns=len(pools.in_flight), timeout=pools.rollout.call_timeout_s,
                         fetch_local=False)
    pools.in_flight.clear()  # failures are reported by finish_generation, which reads them


def settle_loads(pools: Pools) -> None:
    """Wait for (and check) the object-store loads a sync left queued on the rollout actors."""
    if pools.pending_loads:
        loads, pools.pending_loads = pools.pending_loads, []
        pools.rollout.get(loads, "load_weights")


def _sync_through_object_store(pools: Pools, version: int) -> dict[str, Any]:
    if pools.learner.remote:  # rank 0 puts its export itself: the driver holds a reference only
        ref, nbytes = pools.learner.call("publish_weights", [()] * pools.learner.size)[0]  # all ranks: ZeRO-3
        weights = ref if pools.rollout.remote else _fetch(ref)
    else:
        state = pools.learner.call("export_weights", [()] * pools.learner.size)[0]
        nbytes = sum(v.nbytes for v in state.values())
        weights = put(pools.rollout, [state])[0]  # put once, not once per rollout actor
    loads = pools.rollout.broadcast("load_weights", weights, version)
    if pools.defer_loads and pools.rollout.remote:  # generations queued after these run on the new weights
        pools.pending_loads = loads
    else:
        pools.rollout.get(loads, "load_weights")
    return {"weight_sync_path": "object_store", "weight_sync_mb": nbytes / 1e6}


def _fetch(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def nonfinite_reason(rewards: pa.Table) -> str | None:
    """Why a step must be skipped (NaN/inf in the reward or any of its terms), or None."""
    for col in rewards.column_names[len(batch.KEY):]:
        bad = int(np.sum(~np.isfinite(rewards.column(col).to_numpy())))
        if bad:
            return f"{bad} non-finite value(s) in {col}"
    return None
