"""A pool of one actor role: a placement group, N Ray actors, per-actor calls with timeouts.

With `num_actors: 0` the role runs inside the driver process through the same interface, so tests
and clusters exercise the same loop code (as RLlib's LearnerGroup does).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from actors import placement_watch
from actors.waiting import Reports, waited
from actors.membership import Membership, PoolEvent
from rlsr_ray.cli import first_line
from rlsr_ray.config import PoolConfig
from rlsr_ray.plan.resources import bundle, bundles
from rlsr_ray.config.pool_sizes import bounds, elastic

log = logging.getLogger("rlsr_ray")

# Quiet, offline workers: no hub calls, no tokenizer thread pools fighting the torch threads.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


class PoolTimeout(TimeoutError):
    pass


class ActorFailure(RuntimeError):
    """An actor of a pool died during a call (and Ray did not, or could not, recover it)."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role


class InputLost(ActorFailure):
    """A call's input was lost: an object another actor made, on a node that is gone since. The
    caller makes it again (a generation) or, for learners, goes back to a checkpoint."""


def _lost_object(error: BaseException):
    """The ObjectLostError behind a failed call, if that is why it failed (Ray raises it as it is,
    or wrapped in the task's error when the actor could not fetch an argument)."""
    import ray

    for e in (error, getattr(error, "cause", None)):
        if isinstance(e, ray.exceptions.ObjectLostError):
            return e
    return None


def _resolved(args: tuple) -> tuple:
    """What Ray does for a remote call's top-level ObjectRef arguments, for a pool in the driver:
    tables another (remote) pool left in the object store are fetched here."""
    if not any(type(a).__name__ == "ObjectRef" for a in args):
        return args
    import ray

    return tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)


@dataclass
class _Call:
    actor: Any
    method: str
    args: tuple
    num_returns: int
    outs: tuple  # every result ref of the call
    resend: bool  # whether another actor may run it (its result does not depend on the actor)
    at: float  # time.monotonic() at submission


_DROPPED = object()  # a lost actor's value of a call that is not sent again


class Pool:
    def __init__(self, role: str, cls: type, cfg: PoolConfig, kwargs: dict[str, Any],
                 placement_timeout_s: float = 600.0, call_timeout_s: float = 3600.0, ray_restarts: bool = True,
                 startup_timeout_s: float = 1800.0, loads: str = "loading its model"):
        """ray_restarts=False: a dead actor stays dead and the driver rebuilds the pool itself
        (learners: their process group and optimizer state cannot be restored by a bare restart).
        loads: what an actor's constructor does, for the start-up wait's lines (wait_started)."""
        self.role, self.cfg, self.loads = role, cfg, loads
        self.startup_timeout_s = startup_timeout_s
        self._answered: set[str] = set()  # methods every actor has answered once: no longer start-up
        self._starting: dict[int, Any] = {}  # rank -> ref of its constructor, until it has returned
        self.created_at = time.monotonic()
        self.members: Membership | None = None
        self._calls: dict[Any, _Call] = {}  # elastic pools: what each pending call was, to send it again
        self._moved: dict[Any, Any] = {}  # a re-sent call's old result refs -> the new ones
        self._turn = 0  # which survivor takes the next re-sent call
        self._losses: dict[Any, PoolEvent] = {}  # lost actor -> its event, which counts its re-sent calls
        own = cfg.call_timeout_s is not None  # the role's own bound, else the run's
        self.call_timeout_s = cfg.call_timeout_s if own else call_timeout_s
        self.timeout_key = f"pools.{role}.call_timeout_s" if own else "ray.call_timeout_s"
        self.remote = cfg.num_actors > 0
        if not self.remote:
            self.actors = [cls(**kwargs, rank=0)]
            self.pg = None
            return
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote_cls = ray.remote(cls)
        env = {**WORKER_ENV, "OMP_NUM_THREADS": str(cfg.torch_threads)}
        b = bundle(cfg)

        def options(pg, index: int, restarts: int) -> dict[str, Any]:
            return dict(
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                resources={k: v for k, v in b.items() if k not in ("CPU", "GPU")},
                # A restarted actor re-runs __init__ and Ray re-sends the interrupted call to it;
                # the driver re-syncs weights where a restart lost them (pipeline.finish_generation).
                # Ray also re-sends on a dropped connection to a live actor ("temporarily
                # unavailable", frequent on a loaded machine), and each re-send spends a retry: as
                # many retries as restarts failed runs whose actors never restarted. So no bound
                # here: restarts are bounded by max_restarts, a call's wait by the call timeout.
                max_restarts=restarts, max_task_retries=-1 if restarts else 0, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
                name=None,
            )

        if ray_restarts and elastic(cfg):
            # Each actor on its own, replaced by the pool rather than restarted by Ray (membership.py).
            lo, hi = bounds(cfg)
            self.members = Membership(role, lambda pg, rank: remote_cls.options(**options(pg, 0, 0)).remote(
                **kwargs, rank=rank), b, lo, hi)
            self.members.start(cfg.num_actors, lambda pgs: self._wait_placement(pgs, placement_timeout_s))
            self.actors = self.members.actors  # the same list: it changes as actors leave and join
            self.pg = None
            return
        self.pg = placement_group(bundles(cfg), strategy="PACK", name=f"rlsr-{role}")
        self._wait_placement([self.pg], placement_timeout_s)
        restarts = cfg.max_restarts if ray_restarts else 0
        if not ray_restarts:
            placement_watch.watch(self.pg, f"pool {role}")  # rebuilt by the driver, never restarted in place
        self.actors = [remote_cls.options(**options(self.pg, rank, restarts)).remote(**kwargs, rank=rank)
                       for rank in range(cfg.num_actors)]
        self.created_at = time.monotonic()  # placed: the constructors' start-up time counts from here
        # Calls queue behind the constructors; these say when each has returned, so a first call's
        # wait can tell loading from working, and a constructor outlasting ray.startup_timeout_s
        # ends the run whatever call waits on it.
        self._starting = {rank: a.__ray_ready__.remote() for rank, a in enumerate(self.actors)}

    @property
    def size(self) -> int:
        return len(self.actors)

    def _wait_placement(self, pgs: list[Any], timeout_s: float) -> None:
        """Wait for the autoscaler rather than fail: a cluster may be scaling up from zero."""
        import ray

        start = time.monotonic()
        reports = Reports(start, first_s=1.0)  # a pool not placed at once says so early
        need = bundles(self.cfg)
        pending = [pg.ready() for pg in pgs]
        while True:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, max(timeout_s, 0.1)))
            if not pending:
                return
            so_far = time.monotonic() - start
            if so_far >= timeout_s:
                from ray.util.placement_group import remove_placement_group

                for pg in pgs:  # withdraw the request so the autoscaler stops on it
                    remove_placement_group(pg)
                if self.members is not None:
                    self.members.shutdown()
                raise PoolTimeout(
                    f"pool {self.role}: gave up after {so_far:.0f}s waiting for {len(need)} x {need[0]} "
                    f"(cluster total {ray.cluster_resources()}); raise ray.placement_timeout_s or add nodes")
            if time.monotonic() >= reports.due:
                log.info("pool %s: waiting %.0fs for %d x %s; available now %s (ray.placement_timeout_s=%.0f)",
                         self.role, so_far, len(need), need[0], ray.available_resources(), timeout_s)
                reports.advance()

    def submit(self, method: str, per_actor_args: list[tuple], num_returns: int = 1,
               resend: bool = False) -> list[Any]:
        """Call `method` on each actor with its own args; returns refs (remote) or values (local).
        num_returns > 1: the method returns a tuple, and each actor's entry is a tuple of refs, so
        the caller can fetch one part (a summary) and pass another (a table) on unfetched.
        resend: in an elastic pool, a lost actor's call goes to another actor (the call's result
        must not depend on which actor runs it); otherwise its value is left out of get()'s."""
        if len(per_actor_args) != len(self.actors):
            raise ValueError(f"pool {self.role}: {len(per_actor_args)} arg sets for {len(self.actors)} actors")
        if not self.remote:
            return [getattr(a, method)(*_resolved(args)) for a, args in zip(self.actors, per_actor_args)]
        return [self._submit_one(a, method, args, num_returns, resend) for a, args in zip(self.actors, per_actor_args)]

    def _submit_one(self, actor: Any, method: str, args: tuple, num_returns: int, resend: bool) -> Any:
        fn = getattr(actor, method)
        out = tuple(fn.options(num_returns=num_returns).remote(*args)) if num_returns != 1 else fn.remote(*args)
        if self.members is not None:
            call = _Call(actor, method, args, num_returns, out if num_returns != 1 else (out,), resend,
                         time.monotonic())
            for ref in call.outs:
                self._calls[ref] = call
        return out

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        return self.submit(method, [args] * len(self.actors))

    def get(self, results: list[Any], what: str = "", submitted_at: float | None = None, doing: str = "",
            startup: bool = False) -> list[Any]:
        """Values of one call on every actor. Fails as soon as any actor fails, rather than when
        the slowest finishes: survivors of a group whose peer died may sit in a collective.
        `submitted_at` (time.monotonic()) starts the call's timeout where the call started.
        A start-up wait (`startup`, a `doing` given, or a method's first call) says what it still
        waits on at growing intervals; `startup` bounds it by ray.startup_timeout_s instead of the
        call timeout. `doing`: what the actors are doing, for those lines and the timeout's.
        In an elastic pool a lost actor's call is sent again (submit's `resend`) or its value left
        out; current() then gives the new refs of the call's other results."""
        if not self.remote:
            return results
        import ray

        start = time.monotonic() if submitted_at is None else submitted_at
        bound, key = (self.startup_timeout_s, "ray.startup_timeout_s") if startup else \
            (self.call_timeout_s, self.timeout_key)
        deadline = start + bound
        reports = Reports(start, enabled=bool(doing) or what not in self._answered)
        values: list[Any] = [None] * len(results)
        index = {ref: i for i, ref in enumerate(results)}
        pending = list(results)
        while pending:
            ready, pending = self._next_ready(pending, index, what, doing, deadline, (bound, key), reports)
            rank = index[ready[0]]
            try:
                values[rank] = ray.get(ready[0])  # kept: rollout tables are not fetched twice
                self._done(ready[0])
            except (ray.exceptions.ObjectLostError, ray.exceptions.RayTaskError) as e:
                lost = _lost_object(e)
                if lost is None:
                    if isinstance(e, ray.exceptions.RayTaskError):
                        self._task_error(results, ready[0], what, e)
                    raise
                self._settle(pending)
                raise InputLost(self.role, f"pool {self.role}: an input of actor rank {rank}'s {what} was lost with "
                                           f"its node: {first_line(lost)}") from e
            except ray.exceptions.RayActorError as e:
                if self.members is None or ready[0] not in self._calls:
                    self._settle(pending)
                    raise self._failure(rank, what, e) from e
                again = self._lost(ready[0], e, what)
                if again is None:
                    values[rank] = _DROPPED
                else:
                    index[again] = rank
                    pending.append(again)
                    deadline = max(deadline, time.monotonic() + bound)
        self._answered.add(what)
        return [v for v in values if v is not _DROPPED]

    def _next_ready(self, pending: list[Any], index: dict, what: str, doing: str, deadline: float,
                    bound: tuple[float, str], reports: Reports) -> tuple[list[Any], list[Any]]:
        """Wait for one of `pending`, writing the 'still waiting' lines as they fall due. PoolTimeout
        at the call's deadline, or as soon as a constructor has outlasted ray.startup_timeout_s."""
        while True:
            now = time.monotonic()
            self._check_started(now)
            ranks = sorted(index[r] for r in pending)
            if now >= reports.due:
                label = doing or (f"{self.loads}, then its first {what}" if any(r in self._starting for r in ranks)
                                  else f"its first {what}")
                log.info("pool %s: waiting %s on %s for %s (%s)", self.role, waited(now - reports.start),
                         self._where(ranks), what, label)
                reports.advance()
            until = min(deadline, reports.due, self.created_at + self.startup_timeout_s if self._starting
                        else float("inf"))
            ready, rest = placement_watch.wait(pending, timeout=max(0.0, until - now))
            if ready:
                return ready, rest
            if time.monotonic() >= deadline:
                raise PoolTimeout(f"pool {self.role}: {self._where(ranks)} did not finish {what}"
                                  f"{f' ({doing})' if doing else ''} within {bound[0]:.0f}s ({bound[1]})")

    def _check_started(self, now: float) -> None:
        """Forget the constructors that have returned; PoolTimeout when one is late."""
        if not self._starting:
            return
        import ray

        refs = list(self._starting.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(ready)
        self._starting = {r: ref for r, ref in self._starting.items() if ref not in done}
        if self._starting and now >= self.created_at + self.startup_timeout_s:
            raise PoolTimeout(f"pool {self.role}: {self._where(sorted(self._starting))} did not finish start "
                              f"({self.loads}) within {self.startup_timeout_s:.0f}s (ray.startup_timeout_s)")

    def _where(self, ranks: list[int]) -> str:
        """'actor rank(s) [0, 1] on node(s) 10.0.0.5', for a wait's lines (nodes as far as known)."""
        where = f"actor rank(s) {ranks}"
        try:
            import ray

            address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
            placed = self.nodes()
            names = sorted({address.get(placed[r], "?") for r in ranks if r < len(placed) and placed[r]})
        except Exception:  # the line goes out without nodes rather than not at all
            names = []
        return f"{where} on node(s) {', '.join(names)}" if names else where

    def wait_started(self) -> None:
        """Until every actor's constructor has returned (it loads models), at most
        ray.startup_timeout_s from the pool's placement; a constructor's error fails it at once.
        An elastic pool's actors join as they come (membership.py) and are not waited for here."""
        if self._starting:
            self.get(list(self._starting.values()), "start", self.created_at, self.loads, startup=True)

    def _task_error(self, results: list[Any], failed: Any, what: str, error: BaseException) -> None:
        """A collective torn by a peer's death reaches the survivors as a task error, often before
        the death itself is reported: that death is the failure, if there is one (raised here)."""
        dead = self._dead_peer(results, failed)
        if dead is not None:
            raise self._failure(dead[0], what, dead[1]) from error

    def _done(self, ref: Any) -> None:
        call = self._calls.get(ref)
        if call is not None:
            for r in call.outs:
                self._calls.pop(r, None)

    def _lost(self, ref: Any, error: BaseException, what: str) -> Any:
        """An elastic pool's actor died during a call: out of the pool (once), and the call sent to
        another actor if it may be; returns the new ref in `ref`'s place, or None."""
        call = self._calls.pop(ref)
        for r in call.outs:
            self._calls.pop(r, None)
        assert self.members is not None
        if call.actor in self.actors:
            try:
                self._losses[call.actor] = self.members.lost(call.actor, error)
            except RuntimeError as e:
                raise ActorFailure(self.role, f"{e} (during {what})") from error
        if not call.resend:
            return None
        actor = self.actors[self._turn % len(self.actors)]
        self._turn += 1
        event = self._losses[call.actor]
        event.resent += 1
        event.lost_s += time.monotonic() - call.at
        out = self._submit_one(actor, call.method, call.args, call.num_returns, True)
        new = out if call.num_returns != 1 else (out,)
        for old, fresh in zip(call.outs, new):
            self._moved[old] = fresh
        return new[call.outs.index(ref)]

    def current(self, ref: Any) -> Any:
        """The ref standing for `ref` now: a result of the call sent again in its place, if it was."""
        if self.members is None:
            return ref  # (a local pool's "refs" are the tables themselves)
        while ref in self._moved:
            ref = self._moved[ref]
        return ref

    def admit(self) -> int:
        """Actors asked for earlier that are placed and ready join the pool; returns how many."""
        if self.members is None:
            return 0
        ready = self.members.ready_to_join()
        for j in ready:
            self.members.join(j)
        return len(ready)

    def take_events(self) -> list[PoolEvent]:
        return [] if self.members is None else self.members.take_events()

    def nodes(self) -> list[str | None]:
        """Per actor: the hex id of the node its placement-group bundle is on (None: not known)."""
        if not self.remote:
            return [None] * len(self.actors)
        from ray.util.placement_group import placement_group_table

        if self.members is not None:
            return [placement_group_table(self.members.pgs[a])["bundles_to_node_id"].get(0) for a in self.actors]
        placed = placement_group_table(self.pg)["bundles_to_node_id"]
        return [placed.get(i) for i in range(len(self.actors))]

    def retire(self, nodes: set[str]) -> int:
        """An elastic pool's actors on these (draining) nodes leave before the nodes do: no new work
        goes to them, and calls they still hold are sent again when read. Returns how many left."""
        if self.members is None or not nodes:
            return 0
        leaving = [a for a, n in zip(list(self.actors), self.nodes()) if n in nodes]
        for a in leaving:
            if len(self.actors) <= max(self.members.lo, 1):
                break  # the pool's floor: these go on until the node does
            self._losses[a] = self.members.lost(a, RuntimeError("its node is draining"), kind="drained")
        return len([a for a in leaving if a not in self.actors])

    @staticmethod
    def _settle(refs: list[Any], grace_s: float = 5.0) -> None:
        """Collect what the other actors of a failed call return soon (a survivor's torn-collective
        error), so Ray does not print it later as an unhandled error; they are about to be replaced."""
        import ray

        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=grace_s) if refs else ([], [])
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass

    def _failure(self, rank: int, what: str, error: BaseException) -> ActorFailure:
        first = first_line(error)
        return ActorFailure(self.role, f"pool {self.role}: actor rank {rank} died during {what}: {first}")

    def _dead_peer(self, results: list[Any], failed: Any, grace_s: float = 30.0):
        """(rank, error) of an actor in this call that died, waiting up to grace_s for Ray to say so."""
        import ray

        others = [r for r in results if r is not failed]
        deadline = time.monotonic() + grace_s
        while others:
            ready, others = ray.wait(others, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self._settle(others)
                return results.index(ready[0]), e
            except ray.exceptions.RayTaskError:
                continue
        return None

    def call(self, method: str, per_actor_args: list[tuple]) -> list[Any]:
        return self.get(self.submit(method, per_actor_args), method)

    def shutdown(self) -> None:
        if not self.remote:
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.members is not None:
            self.members.shutdown()
            return
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
