"""Pools on a real Ray. Elastic: an actor killed during a call has the call sent to another, the
pool goes on smaller, a replacement joins when placed, and fewer than min_actors is an error.
Restarted in place by Ray: a call outlasts any number of dropped connections to its live actor."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest

pytestmark = pytest.mark.slow


class Worker:
    """Stands in for a rollout/reward/reference actor: the pool's mechanics do not depend on the role."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def work(self, x: int, hold_s: float) -> int:
        time.sleep(hold_s)
        return 2 * x

    def pair(self, x: int, hold_s: float) -> tuple[int, int]:
        time.sleep(hold_s)
        return x, x + 1


@contextlib.contextmanager
def _pool(cls, **settings):
    """A reward pool of `cls` actors (PoolConfig `settings`, a quarter CPU each), shut down after."""
    from ray import cloudpickle

    from actors.pool import Pool
    from rlsr_ray.config import PoolConfig

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    p = Pool("reward", cls, PoolConfig(num_cpus=0.25, **settings), {}, placement_timeout_s=60, call_timeout_s=60)
    try:
        yield p
    finally:
        p.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    with _pool(Worker, num_actors=2, min_actors=1, max_actors=2) as p:
        yield p


def _rejoin(pool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.admit() == 0:
        assert time.monotonic() < deadline, "the replacement never joined"
        time.sleep(0.2)


def test_a_lost_actors_call_goes_to_another_actor_and_a_replacement_joins(pool, local_ray):
    ray = local_ray
    assert pool.size == 2
    refs = pool.submit("work", [(1, 3.0), (2, 0.0)], resend=True)
    lost = pool.actors[0]
    ray.kill(lost, no_restart=True)
    assert pool.get(refs, "work") == [2, 4]  # rank 0's share, done by the other actor
    assert pool.size == 1 and lost not in pool.actors
    (event,) = pool.take_events()
    assert (event.kind, event.rank, event.actors, event.resent) == ("lost", 0, 1, 1)
    _rejoin(pool)
    (event,) = pool.take_events()
    assert (event.kind, event.rank, event.actors) == ("joined", 2, 2)
    assert pool.get(pool.submit("work", [(5, 0.0), (6, 0.0)]), "work") == [10, 12]


def test_a_resent_calls_other_results_are_found_by_current(pool, local_ray):
    ray = local_ray
    outs = pool.submit("pair", [(10, 3.0), (20, 0.0)], num_returns=2, resend=True)
    ray.kill(pool.actors[0], no_restart=True)
    assert pool.get([o[1] for o in outs], "pair") == [11, 21]
    firsts = [pool.current(o[0]) for o in outs]
    assert firsts[0] is not outs[0][0] and firsts[1] is outs[1][0]
    assert ray.get(firsts) == [10, 20]
    pool.take_events()
    _rejoin(pool)
    pool.take_events()


def test_a_call_not_to_be_sent_again_leaves_the_lost_actors_value_out(pool, local_ray):
    ray = local_ray
    refs = pool.submit("work", [(1, 3.0), (2, 0.0)])
    ray.kill(pool.actors[0], no_restart=True)
    assert pool.get(refs, "work") == [4]
    pool.take_events()
    _rejoin(pool)
    pool.take_events()


def test_fewer_than_min_actors_is_an_error_naming_the_bound(pool, local_ray):
    from actors.pool import ActorFailure

    ray = local_ray
    refs = pool.submit("work", [(1, 3.0), (2, 3.0)], resend=True)
    for a in list(pool.actors):
        ray.kill(a, no_restart=True)
    with pytest.raises(ActorFailure, match=r"pool reward: 0 actor\(s\) left, fewer than pools.reward.min_actors=1"):
        pool.get(refs, "work")


class FailsAboveRankZero:
    """Constructs as rank 0 only, as an actor would whose model does not fit the nodes it gets next."""

    def __init__(self, rank: int = 0):
        if rank > 0:
            raise RuntimeError("no room for the model")

    def work(self, x: int, hold_s: float) -> int:
        return 2 * x


def test_an_actor_that_cannot_start_is_asked_for_again_after_a_growing_wait(local_ray, caplog):
    """A constructor that always fails costs one start per wait (doubling), not one per admit: in
    the first wait, however often the pool looks for actors to join, none is asked for."""
    from actors import membership

    with _pool(FailsAboveRankZero, num_actors=1, min_actors=1, max_actors=2) as p:
        members = p.members
        deadline = time.monotonic() + 60
        while members.failed_starts == 0:  # rank 1, asked for at the start, fails
            assert time.monotonic() < deadline, "rank 1 never failed"
            assert p.admit() == 0
            time.sleep(0.05)
        failed_at = time.monotonic()
        while time.monotonic() - failed_at < 0.8 * membership.RETRY_FIRST_S:
            assert p.admit() == 0
            time.sleep(0.05)
        assert members._next_rank == 2 and not members.joining  # rank 1 failed; nothing asked for since
        assert members.retry_at - failed_at == pytest.approx(membership.RETRY_FIRST_S, abs=0.5)
        assert "actor 1 failed to start (" in caplog.text and "asking for another in 5s (1 failed in a row)" in caplog.text
        while members.failed_starts < 2:  # the next ask, after the wait: rank 2 fails too, the wait doubles
            assert time.monotonic() < deadline, "no second ask"
            assert p.admit() == 0
            time.sleep(0.05)
        assert members._next_rank == 3 and "asking for another in 10s (2 failed in a row)" in caplog.text
        assert p.get(p.submit("work", [(4, 0.0)]), "work") == [8]  # rank 0 worked on throughout


class Attempts:
    """Counts the attempts of its calls that reach it."""

    def __init__(self, rank: int = 0):
        self.attempts = 0

    def pid(self) -> int:
        return os.getpid()

    def work(self, x: int, hold_s: float) -> int:
        self.attempts += 1
        time.sleep(hold_s)
        return 2 * x

    def count(self) -> int:
        return self.attempts


def _drop_connections_to(pid: int) -> int:
    """Shut down this process's end of every TCP connection to process `pid`, as a broken link or
    an overloaded peer does: Ray reports the call in flight on it as unavailable."""
    import socket

    import psutil  # Ray's own copy, on the path once ray is imported

    theirs = {(c.laddr, c.raddr) for c in psutil.Process(pid).net_connections(kind="inet") if c.raddr}
    ours = [c.fd for c in psutil.Process().net_connections(kind="inet") if (c.raddr, c.laddr) in theirs]
    for fd in ours:
        # On a duplicate, so that gRPC's own descriptor stays valid and sees the connection end.
        with socket.socket(fileno=os.dup(fd)) as end:
            end.shutdown(socket.SHUT_RDWR)
    return len(ours)


def test_a_call_outlasts_more_dropped_connections_than_its_actor_has_restarts(local_ray):
    """A restartable actor's call is sent again whenever its connection drops, not only as many
    times as the actor may restart: on a loaded machine Ray sees a live actor as "temporarily
    unavailable" now and then without it ever restarting. Restarts stay bounded by max_restarts,
    a hung call by the pool's call timeout."""
    ray = local_ray
    with _pool(Attempts, num_actors=1, max_restarts=1) as p:
        pid = ray.get(p.actors[0].pid.remote())
        refs = p.submit("work", [(21, 1.0)])
        drops, deadline = 0, time.monotonic() + 30
        # More drops than the actor's one restart, each while the call is in flight (no longer in
        # flight: it ended, and p.get says how).
        while drops < 3 and not ray.wait(refs, timeout=0)[0]:
            assert time.monotonic() < deadline, f"{drops} connections dropped in 30 s"
            time.sleep(0.2)
            drops += _drop_connections_to(pid) > 0  # none while Ray reconnects
        assert p.get(refs, "work") == [42]
        assert ray.get(p.actors[0].pid.remote()) == pid  # the same process throughout: never restarted
        assert 2 <= ray.get(p.actors[0].count.remote()) <= 4  # the call ran again after drops


class SlowStart(Worker):
    """An actor whose constructor does not return within the test (a model load that hangs)."""

    def __init__(self, rank: int = 0):
        super().__init__(rank)
        time.sleep(120)


def test_a_pool_that_does_not_start_says_what_it_waits_on_then_gives_up_at_its_deadline(local_ray, caplog):
    """wait_started: a 'still waiting' line naming pool, rank, node and what the actor does after
    5 s (waiting.FIRST_S), then one error at ray.startup_timeout_s (here 7 s) from placement."""
    import logging
    import sys

    from ray import cloudpickle

    from actors.pool import Pool, PoolTimeout
    from rlsr_ray.config import PoolConfig

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    p = Pool("reward", SlowStart, PoolConfig(num_cpus=0.25, num_actors=1), {}, startup_timeout_s=7,
             loads="loading a model that never loads")
    try:
        with caplog.at_level(logging.INFO, logger="rlsr_ray"), pytest.raises(PoolTimeout) as e:
            p.wait_started()
        waited = time.monotonic() - p.created_at
    finally:
        p.shutdown()
    assert str(e.value) == ("pool reward: actor rank(s) [0] on node(s) 127.0.0.1 did not finish start (loading a "
                            "model that never loads) within 7s (ray.startup_timeout_s)")
    assert 7 <= waited < 7 + 3, waited
    assert [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()] == [
        "pool reward: waiting 5s on actor rank(s) [0] on node(s) 127.0.0.1 for start (loading a model that never loads)"]
