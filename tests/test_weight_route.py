"""The driver's opening of the weight route when the group cannot form. The two ends here are
in-driver stand-ins for a learner and rollout actors: what is tested is the driver's reaction, and
an actor leaving while the group forms needs a node to die at that moment (the end-to-end route,
with real actors and gloo, is in tests/test_learner_group.py)."""
from __future__ import annotations

import pytest

from actors.pool import ActorFailure, Pool, PoolConfig
from rlsr_ray.driver.weight_route import WeightRoute


class _Learner:
    def __init__(self, rank: int, log: list, fail: BaseException | None = None):
        self.log, self.fail = log, fail

    def rendezvous(self):
        self.log.append("rendezvous")
        return "tcp://127.0.0.1:1"

    def weight_specs(self):
        return []

    def open_weight_route(self, address, settings):
        if self.fail is not None:
            raise self.fail

    def close_weight_route(self):
        self.log.append("learner closed")


class _Rollout:
    def __init__(self, rank: int, log: list, fail: BaseException | None = None):
        self.log, self.fail = log, fail

    def weight_dtype(self):
        return "float32"

    def join_weight_route(self, address, settings, specs, route_rank):
        if self.fail is not None:
            raise self.fail

    def close_weight_route(self):
        self.log.append("rollout closed")


def _pools(learner_fail=None, rollout_fail=None):
    log: list = []
    local = PoolConfig(num_actors=0)
    return (Pool("learner", _Learner, local, dict(log=log, fail=learner_fail)),
            Pool("rollout", _Rollout, local, dict(log=log, fail=rollout_fail)), log)


def test_a_group_that_cannot_form_with_everyone_alive_is_not_tried_again_until_the_actors_change(caplog):
    learner, rollout, log = _pools(rollout_fail=RuntimeError("Timed out after 300 seconds waiting for clients"))
    route = WeightRoute("gloo", 1 << 20, 300.0)
    route.open(learner, rollout)  # no exception: the run goes on through the object store
    assert not route.is_open(learner, rollout)
    assert log == ["rendezvous", "learner closed", "rollout closed"]
    assert "weight route not opened (Timed out after 300 seconds" in caplog.text
    assert "when the pools' actors change" in caplog.text
    route.open(learner, rollout)  # the same members: not another wait
    assert log.count("rendezvous") == 1
    rollout.actors = [_Rollout(0, log)]  # a replacement joined
    route.open(learner, rollout)
    assert log.count("rendezvous") == 2 and route.is_open(learner, rollout)


def test_a_rollout_actor_lost_while_the_group_forms_is_retried_at_the_next_sync(caplog):
    learner, rollout, log = _pools(rollout_fail=ActorFailure("rollout", "pool rollout: actor rank 0 died"))
    route = WeightRoute("gloo", 1 << 20, 300.0)
    route.open(learner, rollout)
    assert not route.is_open(learner, rollout) and "at the next sync" in caplog.text
    rollout.actors[0].fail = None  # Ray restarted it: the same handle, working again
    route.open(learner, rollout)
    assert log.count("rendezvous") == 2 and route.is_open(learner, rollout)


def test_a_learner_lost_while_the_group_forms_is_the_callers_to_handle():
    learner, rollout, _ = _pools(learner_fail=ActorFailure("learner", "pool learner: actor rank 0 died"))
    with pytest.raises(ActorFailure, match="pool learner"):
        WeightRoute("gloo", 1 << 20, 300.0).open(learner, rollout)
