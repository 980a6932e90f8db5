"""The driver's side of weight sync: learners -> rollout actors, with the driver out of the data path.

Two paths. The weight route (rlsr_ray/modeling/weight_group.py) broadcasts buckets from learner rank 0 to
every rollout actor over a process group of their own; the driver only opens it and sends the
version. The object store is the fallback and the path for pools that run inside the driver:
learner rank 0 puts its export into Ray's object store itself and the rollout actors read that
reference, so the full state dict still never reaches the driver.

A route is opened for one learner pool and one set of rollout actors. When a member dies (a
rollout actor Ray restarted, a rebuilt learner group), the sync that finds out reports it instead
of failing, the weights go through the object store for that sync, and the route is opened
anew with the actors as they are now. `weight_sync_path` in metrics.jsonl says which path ran.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from actors.pool import ActorFailure, Pool
from rlsr_ray.cli import first_line
from rlsr_ray.modeling.weight_group import RouteSettings

log = logging.getLogger("rlsr_ray")


@dataclass
class WeightRoute:
    backend: str  # "gloo" or "nccl"
    bucket_bytes: int
    timeout_s: float
    shards: int = 1  # route ranks per rollout actor: its engine's tensor-parallel workers
    opened_for: Any = None  # (learner pool, rollout actors) the open route connects
    failed_for: Any = None  # the members an opening failed for: not tried again for the same ones

    def usable(self, learner: Pool, rollout: Pool) -> bool:
        """Both ends in Ray actors of their own (a pool in the driver takes the object store)."""
        return learner.remote and rollout.remote

    def is_open(self, learner: Pool, rollout: Pool) -> bool:
        return self.opened_for == (learner, tuple(rollout.actors))

    def open(self, learner: Pool, rollout: Pool) -> None:
        """Learner rank 0 and every rollout actor form the group (each drops any older one). If the
        group cannot form, the weights go through the object store meanwhile; a failure with no
        actor lost would recur, so it costs one wait, not one per step."""
        self.opened_for = None
        members = (learner, tuple(rollout.actors))
        if members == self.failed_for:
            return
        address = learner.call("rendezvous", [()] * learner.size)[0]
        specs = learner.call("weight_specs", [()] * learner.size)[0]
        dtypes = set(rollout.call("weight_dtype", [()] * rollout.size))
        if len(dtypes) != 1:
            raise RuntimeError(f"pool rollout: actors hold weights in different dtypes {sorted(dtypes)}")
        settings = RouteSettings(1 + rollout.size * self.shards, self.backend, dtypes.pop(), self.bucket_bytes,
                                 self.timeout_s)
        opening = learner.submit("open_weight_route", [(address, settings)] * learner.size)
        failure = None
        try:
            rollout.call("join_weight_route", [(address, settings, specs, 1 + i * self.shards)
                                               for i in range(rollout.size)])
        except Exception as e:  # noqa: BLE001 - a rollout actor died or timed out while the group formed
            failure = e
        try:  # rank 0 waits for the whole group: without one member it times out (timeout_s)
            learner.get(opening, "open_weight_route")
        except ActorFailure as e:
            if e.role == learner.role:
                raise  # a learner died: the caller rebuilds the group, whose sync opens the route
            failure = failure or e
        except Exception as e:  # noqa: BLE001
            failure = failure or e
        if failure is not None:
            # An actor that died during the opening (an elastic pool's, with its node) leaves the
            # others waiting for it: the group forms at the next sync without it (or with Ray's
            # restart of it). A failure with every member alive would recur: not tried again for them.
            died = isinstance(failure, ActorFailure) or tuple(rollout.actors) != members[1]
            self.failed_for = None if died else members
            log.warning("weight route not opened (%s): weights go through the object store; the route is opened "
                        "again %s", first_line(failure), "at the next sync" if died else "when the pools' actors change")
            self.close(learner, rollout)
            return
        self.opened_for = members
        log.info("weight route open: learner rank 0 -> %d rollout actor(s) over %s, %s, buckets of %.0f MB",
                 rollout.size, self.backend, settings.dtype, self.bucket_bytes / 1e6)

    def sync(self, learner: Pool, rollout: Pool, version: int) -> dict[str, Any] | None:
        """Broadcast the weights; None if the route is not open or tore (the caller falls back)."""
        if not self.is_open(learner, rollout):
            return None
        # An actor Ray restarted since the route opened has no end of it: find out before rank 0
        # broadcasts to a dead peer and the live ones wait out the timeout.
        joined = rollout.call("in_weight_route", [()] * rollout.size)
        if not all(joined):
            log.warning("rollout actor(s) %s restarted since the weight route opened: this sync goes through the "
                        "object store and the route is opened again", [i for i, j in enumerate(joined) if not j])
            self.close(learner, rollout)
            return None
        sending = learner.submit("send_weights", [()] * learner.size)
        try:
            received = rollout.call("receive_weights", [(version,)] * rollout.size)
        except ActorFailure as e:  # a rollout actor died for good: the route is gone with it
            received = [{"ok": False, "error": str(e)}]
        try:
            sent = learner.get(sending, "send_weights")
        except ActorFailure:
            self.opened_for = None  # a learner died: the caller rebuilds the group, then reopens
            raise
        errors = [r["error"] for r in [*sent, *received] if not r["ok"]]
        if errors:
            log.warning("weight route broken (%s): this sync goes through the object store and the route is "
                        "opened again", errors[0])
            self.close(learner, rollout)
            return None
        return {"weight_sync_path": "group", "weight_sync_mb": sum(r["bytes"] for r in sent) / 1e6}

    def close(self, learner: Pool, rollout: Pool) -> None:
        """Every member drops its end; a dead member's call fails and is ignored (it has no end)."""
        self.opened_for = None
        for pool in (learner, rollout):
            try:
                pool.call("close_weight_route", [()] * pool.size)
            except Exception as e:  # noqa: BLE001 - best effort: the route is abandoned either way
                log.debug("pool %s: close_weight_route failed while closing the route: %s", pool.role, e)
