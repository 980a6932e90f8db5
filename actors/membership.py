"""Who is in an elastic pool: each actor in a placement group of its own, so one can leave or join
without the others.

An actor that dies (its process, or its node with every process on it) leaves at once: its
placement group is removed (Ray would otherwise reserve it again on the next node that fits,
competing with the replacement) and a replacement is asked for, up to max_actors. Ray does not
restart these actors itself (max_restarts 0): a restart waits for room on the cluster, and the
calls queued on it would wait too; the pool instead sends them to the actors it still has.
Actors asked for (replacements, or the ones above num_actors) join when placed and constructed,
at a point the pool's user chooses (pipeline.py: a rollout actor at a weight sync, so it starts
from the current weights).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from actors import placement_watch
from rlsr_ray.cli import first_line

log = logging.getLogger("rlsr_ray")


@dataclass
class PoolEvent:
    """One change of membership, for the log and metrics.jsonl."""
    role: str
    kind: str  # "lost", "drained" (taken out ahead of its node's loss) or "joined"
    rank: int
    at: float  # time.monotonic()
    actors: int  # the pool's size after it
    detail: str = ""  # why it left
    resent: int = 0  # calls of the lost actor sent again to others
    lost_s: float = 0.0  # seconds those calls had run when the loss was noticed: work done again


@dataclass
class _Joining:
    actor: Any
    pg: Any
    ready: Any  # ObjectRef of the actor's construction
    rank: int
    since: float


# An actor that fails to construct (no room for its model on the node it got, a path that node
# lacks) is asked for again after a wait that doubles with each failure in a row: a constructor
# that always fails costs a start every few minutes, not one per step.
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0


class Membership:
    def __init__(self, role: str, make: Callable[[Any, int], Any], bundle: dict[str, float], lo: int, hi: int):
        """make(placement_group, rank) -> actor handle, placed in that group's only bundle."""
        self.role, self.make, self.bundle, self.lo, self.hi = role, make, bundle, lo, hi
        self.actors: list[Any] = []
        self.pgs: dict[Any, Any] = {}  # actor -> its placement group
        self.ranks: dict[Any, int] = {}
        self.joining: list[_Joining] = []
        self.events: list[PoolEvent] = []
        self._next_rank = 0
        self.failed_starts = 0  # constructions failed in a row
        self.retry_at = 0.0  # time.monotonic() before which none is asked for

    def _ask(self) -> _Joining:
        from ray.util.placement_group import placement_group

        rank, self._next_rank = self._next_rank, self._next_rank + 1
        pg = placement_group([self.bundle], name=f"rlsr-{self.role}-{rank}")
        placement_watch.watch(pg, f"pool {self.role}: actor {rank}")
        actor = self.make(pg, rank)
        j = _Joining(actor, pg, actor.__ray_ready__.remote(), rank, time.monotonic())
        self.joining.append(j)
        return j

    def start(self, n: int, wait_placed: Callable[[list[Any]], None]) -> None:
        """n actors placed (wait_placed waits for their groups, or raises), the rest up to
        max_actors asked for; those join when the cluster has room."""
        first = [self._ask() for _ in range(n)]
        wait_placed([j.pg for j in first])
        for j in first:
            self.joining.remove(j)
            self._add(j)
        self._top_up()

    def _add(self, j: _Joining) -> None:
        self.actors.append(j.actor)
        self.pgs[j.actor], self.ranks[j.actor] = j.pg, j.rank

    def _top_up(self) -> None:
        if time.monotonic() < self.retry_at:
            return
        while len(self.actors) + len(self.joining) < self.hi:
            self._ask()

    def lost(self, actor: Any, error: BaseException, kind: str = "lost") -> PoolEvent:
        """The actor is gone: out of the pool, its group removed, a replacement asked for. Raises
        RuntimeError when fewer than min_actors remain. The caller counts the calls it sends again."""
        import ray
        from ray.util.placement_group import remove_placement_group

        self.actors.remove(actor)
        rank = self.ranks.pop(actor)
        ray.kill(actor, no_restart=True)  # where it is only unreachable, it must not come back
        remove_placement_group(self.pgs.pop(actor))
        event = PoolEvent(self.role, kind, rank, time.monotonic(), len(self.actors), detail=first_line(error)[:200])
        self.events.append(event)
        log.warning("pool %s: actor %d %s (%s); %d actor(s) go on", self.role, rank, kind, event.detail,
                    len(self.actors))
        if len(self.actors) < self.lo:
            raise RuntimeError(f"pool {self.role}: {len(self.actors)} actor(s) left, fewer than "
                               f"pools.{self.role}.min_actors={self.lo}")
        self._top_up()
        return event

    def ready_to_join(self) -> list[Any]:
        """Actors asked for that are now placed and constructed (not yet in the pool); one that
        failed to construct is dropped and asked for again after a wait (RETRY_FIRST_S, doubling)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if not self.joining:
            self._top_up()  # the wait after a failed start may be over
            return []
        ready, _ = ray.wait([j.ready for j in self.joining], num_returns=len(self.joining), timeout=0)
        out = []
        for j in [j for j in self.joining if j.ready in ready]:
            self.joining.remove(j)
            try:
                ray.get(j.ready)
            except ray.exceptions.RayError as e:
                self.failed_starts += 1
                wait_s = min(RETRY_FIRST_S * 2 ** (self.failed_starts - 1), RETRY_MAX_S)
                self.retry_at = time.monotonic() + wait_s
                log.warning("pool %s: actor %d failed to start (%s); asking for another in %.0fs (%d failed in a row)",
                            self.role, j.rank, first_line(e)[:200], wait_s, self.failed_starts)
                ray.kill(j.actor, no_restart=True)
                remove_placement_group(j.pg)
                continue
            self.failed_starts = 0
            out.append(j)
        self._top_up()
        return out

    def join(self, j: _Joining) -> PoolEvent:
        self._add(j)
        event = PoolEvent(self.role, "joined", j.rank, time.monotonic(), len(self.actors))
        self.events.append(event)
        log.warning("pool %s: actor %d joined after %.0fs waiting for room; %d actor(s) now", self.role, j.rank,
                    event.at - j.since, len(self.actors))
        return event

    def take_events(self) -> list[PoolEvent]:
        out, self.events = self.events, []
        return out

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors + [j.actor for j in self.joining]:
            ray.kill(a, no_restart=True)
        for pg in list(self.pgs.values()) + [j.pg for j in self.joining]:
            remove_placement_group(pg)
        self.actors.clear()
        self.joining.clear()
