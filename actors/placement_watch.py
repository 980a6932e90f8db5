"""Placement groups that lost their node, given back at once.

When a node dies, Ray's GCS reschedules every placement group that had a bundle there. Where the
lost bundle has nowhere to go (a learner group's second `learner_slot`, a GPU type the cluster no
longer has), Ray 2.60's GCS retries it in a loop without backoff: the GCS and the head's metrics
agent then take a whole core each until the group is placed or removed (seen on a 2-core machine:
47 million scheduling attempts in two minutes, and the generation going on meanwhile 10x slower, so
the driver learned of the loss minutes late, when it next called the learners).

Groups whose actors the driver replaces itself, rather than Ray restarting them in place (learner
groups, which are rebuilt from a checkpoint; elastic pools' one-actor groups, which membership.py
replaces), are registered here; while the driver waits on any pool (Pool.get), a group of those that
is rescheduling is removed, which also ends its actors. Their calls then fail as a lost actor's do,
and the usual recovery takes over: nothing is lost that was not lost with the node.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("rlsr_ray")

POLL_S = 2.0  # how often a wait looks (one GCS call for every group)

_watched: dict[str, tuple[Any, str]] = {}  # group id (hex) -> (group, what it holds, for the log)
_last = 0.0


def watch(pg: Any, holds: str) -> None:
    _watched[pg.id.hex()] = (pg, holds)


def broken(table: dict[str, dict], watched: set[str]) -> tuple[list[str], list[str]]:
    """(watched groups being rescheduled after losing a node, watched groups no longer there) from
    Ray's placement group table."""
    lost = [g for g in watched if table.get(g, {}).get("state") == "RESCHEDULING"]
    gone = [g for g in watched if table.get(g, {}).get("state", "REMOVED") == "REMOVED"]
    return lost, gone


def wait(refs: list[Any], num_returns: int = 1, timeout: float | None = None, **kw: Any):
    """ray.wait, looking at the watched groups every POLL_S while it waits."""
    import ray

    end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if end is None else max(0.0, end - time.monotonic())
        ready, rest = ray.wait(refs, num_returns=num_returns, timeout=POLL_S if left is None else min(left, POLL_S),
                               **kw)
        if len(ready) >= num_returns or (left is not None and left <= POLL_S):
            return ready, rest
        poll()


def poll() -> int:
    """Remove the watched groups that lost a node; at most once per POLL_S. Returns how many."""
    global _last
    if not _watched or time.monotonic() - _last < POLL_S:
        return 0
    _last = time.monotonic()
    from ray.util.placement_group import placement_group_table, remove_placement_group

    lost, gone = broken(placement_group_table(), set(_watched))
    for g in gone:
        _watched.pop(g, None)
    for g in lost:
        pg, holds = _watched.pop(g)
        log.warning("%s lost a node: its placement group is given back now rather than waited on", holds)
        remove_placement_group(pg)
    return len(lost)
