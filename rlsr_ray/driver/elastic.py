"""What changed in the pools' membership during a step: per-pool sizes, nodes, and each event
(an actor lost or joined) as a line in the log and as counts in metrics.jsonl."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rlsr_ray")


def membership_metrics(pools, step: int) -> dict[str, Any]:
    """actors_<role> (rollout, reward, reference) now, nodes alive, and this step's membership
    events: how many, calls sent again, and seconds of work those calls had done when lost."""
    row: dict[str, Any] = {f"actors_{p.role}": p.size for p in (pools.rollout, pools.reward, pools.reference)}
    events = [e for p in (pools.rollout, pools.reward, pools.reference) for e in p.take_events()]
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
