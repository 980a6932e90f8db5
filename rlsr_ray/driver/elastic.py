"""What changed in the pools' membership during a step: per-pool sizes, nodes, and each event
(an actor lost or joined) as a line in the log and as counts in metrics.jsonl."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rlsr_ray")


def membership_metrics(pools, step: int) -> dict[str, Any]:
    """actors_<role> (rollout, reward, reference) now, nodes alive, and this step's membership
    events: how many, calls sent again, and seconds of work those calls had done when lost."""
    row: dict[str, Any] = {f"actors_{p.role}": p.size for p in pools.elastic()}
    events = [e for p in pools.elastic() for e in p.take_events()]
    for e in events:
        if e.kind in ("lost", "drained"):
            log.warning("step %d: pool %s %s actor %d (%s): %d call(s) sent again, %.1fs of work lost, %d "
                        "actor(s) left", step, e.role, "lost" if e.kind == "lost" else "took out", e.rank,
                        e.detail, e.resent, e.lost_s, e.actors)
        else:
            log.warning("step %d: pool %s gained actor %d: %d actor(s)", step, e.role, e.rank, e.actors)
    row.update(membership_events=len(events), calls_resent=sum(e.resent for e in events),
               seconds_lost=round(sum(e.lost_s for e in events), 3))
    if any(p.remote for p in pools.all()):
        import ray

        row["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
    return row


def draining_nodes() -> dict[str, float]:
    """Nodes Ray is draining (`ray drain-node`, an autoscaler's preemption notice) -> their
    deadline in Unix seconds (inf: none given). Ray Train's preemption watcher reads the same GCS
    table through the same (private) accessor; there is no public one in Ray 2.60."""
    import math

    import ray

    try:
        raw = ray._private.state.state.get_draining_nodes()
    except Exception as e:  # noqa: BLE001 - an older GCS, or a transient error: no notice this step
        log.debug("could not read draining nodes: %s", e)
        return {}
    return {node: (ms / 1000.0 if ms else math.inf) for node, ms in raw.items()}


def request_capacity(cfg) -> bool:
    """With an elastic pool, ask the autoscaler for every pool at its largest at once (the
    placement groups waiting for room ask one by one, at the autoscaler's upscaling speed); the
    request holds until release_capacity(). Returns whether it asked."""
    from rlsr_ray.plan.resources import ROLES, bundle
    from rlsr_ray.config.pool_sizes import bounds, elastic

    if not any(elastic(getattr(cfg.pools, r)) for r in ROLES if r != "learner"):
        return False
    shapes = []
    for role in ROLES:
        p = getattr(cfg.pools, role)
        if p.num_actors == 0 or (role == "reward" and cfg.reward_service.enabled):
            continue
        shapes += [bundle(p)] * (p.num_actors if role == "learner" else bounds(p)[1])
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=shapes)
    log.info("asked the autoscaler for room for %d actors (every pool at its max_actors)", len(shapes))
    return True


def release_capacity() -> None:
    """Withdraw request_capacity's request, so an autoscaling cluster can shrink after the run."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception as e:  # noqa: BLE001 - the cluster may be gone already; nothing is held then
        log.debug("could not withdraw the capacity request: %s", e)
