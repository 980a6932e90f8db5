"""A pool of one actor role: a placement group, N Ray actors, per-actor calls with timeouts.

With `num_actors: 0` the role runs inside the driver process through the same interface, so tests
and clusters exercise the same loop code (as RLlib's LearnerGroup does).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from rlsr_ray.config import PoolConfig
from rlsr_ray.plan import bundles

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


def _resolved(args: tuple) -> tuple:
    """What Ray does for a remote call's top-level ObjectRef arguments, for a pool in the driver:
    tables another (remote) pool left in the object store are fetched here."""
    if not any(type(a).__name__ == "ObjectRef" for a in args):
        return args
    import ray

    return tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)


class Pool:
    def __init__(self, role: str, cls: type, cfg: PoolConfig, kwargs: dict[str, Any],
                 placement_timeout_s: float = 600.0, call_timeout_s: float = 3600.0, ray_restarts: bool = True):
        """ray_restarts=False: a dead actor stays dead and the driver rebuilds the pool itself
        (learners: their process group and optimizer state cannot be restored by a bare restart)."""
        self.role, self.cfg = role, cfg
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

        self.pg = placement_group(bundles(cfg), strategy="PACK", name=f"rlsr-{role}")
        self._wait_placement(placement_timeout_s)
        remote_cls = ray.remote(cls)
        env = {**WORKER_ENV, "OMP_NUM_THREADS": str(cfg.torch_threads)}
        restarts = cfg.max_restarts if ray_restarts else 0
        self.actors = []
        for rank in range(cfg.num_actors):
            b = bundles(cfg)[rank]
            opts = dict(
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                resources={k: v for k, v in b.items() if k not in ("CPU", "GPU")},
                # A restarted actor re-runs __init__ and Ray re-sends the interrupted call to it;
                # the driver re-syncs weights where a restart lost them (pipeline.finish_generation).
                max_restarts=restarts, max_task_retries=restarts, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                name=None,
            )
            self.actors.append(remote_cls.options(**opts).remote(**kwargs, rank=rank))

    @property
    def size(self) -> int:
        return len(self.actors)

    def _wait_placement(self, timeout_s: float) -> None:
        """Wait for the autoscaler rather than fail: a cluster may be scaling up from zero."""
        import ray

        start = time.monotonic()
        next_log = 0.0
        need = bundles(self.cfg)
        while True:
            # A short first wait: a pool that is not placed at once gets its "waiting" line early.
            poll = 1.0 if next_log == 0.0 else 5.0
            ready, _ = ray.wait([self.pg.ready()], timeout=min(poll, max(timeout_s, 0.1)))
            if ready:
                return
            waited = time.monotonic() - start
            if waited >= timeout_s:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)  # withdraw the request so the autoscaler stops on it
                raise PoolTimeout(
                    f"pool {self.role}: gave up after {waited:.0f}s waiting for {len(need)} x {need[0]} "
                    f"(cluster total {ray.cluster_resources()}); raise ray.placement_timeout_s or add nodes")
            if waited >= next_log:
                log.info("pool %s: waiting %.0fs for %d x %s; available now %s", self.role, waited, len(need),
                         need[0], ray.available_resources())
                next_log = waited + 30.0

    def submit(self, method: str, per_actor_args: list[tuple], num_returns: int = 1) -> list[Any]:
        """Call `method` on each actor with its own args; returns refs (remote) or values (local).
        num_returns > 1: the method returns a tuple, and each actor's entry is a tuple of refs, so
        the caller can fetch one part (a summary) and pass another (a table) on unfetched."""
        if len(per_actor_args) != len(self.actors):
            raise ValueError(f"pool {self.role}: {len(per_actor_args)} arg sets for {len(self.actors)} actors")
        if not self.remote:
            return [getattr(a, method)(*_resolved(args)) for a, args in zip(self.actors, per_actor_args)]
        if num_returns != 1:
            return [tuple(getattr(a, method).options(num_returns=num_returns).remote(*args))
                    for a, args in zip(self.actors, per_actor_args)]
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor_args)]

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        return self.submit(method, [args] * len(self.actors))

    def get(self, results: list[Any], what: str = "", submitted_at: float | None = None) -> list[Any]:
        """Values of one call on every actor. Fails as soon as any actor fails, rather than when
        the slowest finishes: survivors of a group whose peer died may sit in a collective.
        `submitted_at` (time.monotonic()) starts the call's timeout where the call started."""
        if not self.remote:
            return results
        import ray

        deadline = (time.monotonic() if submitted_at is None else submitted_at) + self.call_timeout_s
        values: list[Any] = [None] * len(results)
        pending = list(results)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = [i for i, r in enumerate(results) if r in pending]
                raise PoolTimeout(f"pool {self.role}: actor rank(s) {ranks} did not finish {what} within "
                                  f"{self.call_timeout_s:.0f}s ({self.timeout_key})")
            rank = results.index(ready[0])
            try:
                values[rank] = ray.get(ready[0])  # kept: rollout tables are not fetched twice
            except ray.exceptions.RayActorError as e:
                self._settle(pending)
                raise self._failure(rank, what, e) from e
            except ray.exceptions.RayTaskError as e:
                # A collective torn by a peer's death reaches the survivors as a task error, often
                # before the death itself is reported: that death is the failure, if there is one.
                dead = self._dead_peer(results, ready[0])
                if dead is None:
                    raise
                raise self._failure(dead[0], what, dead[1]) from e
        return values

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
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
