"""The RLSR reward as a Ray Serve deployment that several training runs on one cluster can share.

Same scoring code as the reward pool (actors/reward.py: embedding cosine + LCS penalty, each
reference embedded once per replica). A run sends its ROLLOUTS in requests of at most
`request_rows` rows, all at once, so one run's step keeps several requests in flight: Serve's
router spreads them over the replicas there are, and the autoscaler, which counts ongoing
requests per replica (`target_ongoing_requests` = a batch's worth), adds replicas for a single
run's load, not only for many runs'. `@serve.batch` gathers the requests that arrive within
`batch_wait_timeout_s` (up to `max_batch_size` of them, from any run) into one embedding pass and
hands each caller back its own REWARDS table.
"""
import asyncio

import pyarrow as pa
from ray import serve

from rlsr_ray.contract import batch


@serve.deployment
class RewardService:
    def __init__(self, terms: list, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, device: str = "cpu", torch_threads: int = 1):
        from actors.reward import RewardActor
        from rlsr_ray.serving.loopback import replica_grpc_on_loopback

        replica_grpc_on_loopback()
        self.scorer = RewardActor(terms, device=device, torch_threads=torch_threads)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.counts = {"batches": 0, "tables": 0, "rows": 0}  # what this replica has scored
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def stats(self) -> dict:
        return {"replica": self.replica, **self.counts}

    async def score(self, rollouts: pa.Table) -> pa.Table:
        rollouts = batch.check(rollouts, batch.ROLLOUTS, "reward service input")
        return await self.score_batch(rollouts)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score_batch(self, tables: list[pa.Table]) -> list[pa.Table]:
        self.counts["batches"] += 1
        self.counts["tables"] += len(tables)
        self.counts["rows"] += sum(len(t) for t in tables)
        # The embedding forward pass blocks: off the event loop, so requests keep queueing.
        return await asyncio.to_thread(self.scorer.score_checked, tables)


def deployment(terms: list, *, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
               min_replicas: int = 1, max_replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               accelerator_type: str | None = None, device: str = "cpu", torch_threads: int = 1):
    """The bound application scoring `terms` (algo.terms.TermSpec): batching, autoscaling bounds and
    placement as given."""
    actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if accelerator_type:
        actor_options["accelerator_type"] = accelerator_type
    autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                   "target_ongoing_requests": max_batch_size}
    return RewardService.options(
        # A batch can only fill if that many requests may wait on one replica.
        max_ongoing_requests=max(2 * max_batch_size, 5), ray_actor_options=actor_options,
        autoscaling_config=autoscaling,
    ).bind(terms, max_batch_size, batch_wait_timeout_s, device, torch_threads)


class ServicePool:
    """The reward service behind the interface the step loop uses for a pool: one shard per call,
    tables sent as they are (Serve serialises them), the same timeout and one-line errors."""

    remote = False  # tables go straight into the request, not through ray.put
    size = 1
    deferred = True  # submit() returns before the work is done: time it at get()

    def __init__(self, handle, call_timeout_s: float, owned: bool, app_name: str, request_rows: int = 64):
        self.role, self.handle, self.call_timeout_s = "reward", handle, call_timeout_s
        self.owned, self.app_name, self.request_rows = owned, app_name, request_rows

    def submit(self, method: str, per_actor_args: list[tuple], resend: bool = True) -> list:
        """resend: Serve routes each request to a live replica (and retries one that died) itself."""
        if method not in ("score", "score_parts") or len(per_actor_args) != 1:
            raise ValueError(f"reward service: no {method} for {len(per_actor_args)} shard(s)")
        args = per_actor_args[0]
        if method == "score_parts":
            # A request carries its table: rollout tables in the object store are fetched here
            # (the service is shared by runs and takes no references into one run's actors).
            import ray

            from rlsr_ray.contract.selection import gather

            tables = [ray.get(t) if isinstance(t, ray.ObjectRef) else t for t in args[1:]]
            args = (gather(tables, args[0], batch.ROLLOUTS),)
        (table,) = args
        # One shard, sent as several requests: (a REWARDS row depends on its own ROLLOUTS row only).
        starts = range(0, max(len(table), 1), self.request_rows)
        return [[self.handle.score.remote(table.slice(i, self.request_rows)) for i in starts]]

    def get(self, results: list, what: str = "", submitted_at: float | None = None) -> list:
        import time

        from ray.serve.exceptions import RayServeException

        from actors.pool import ActorFailure, PoolTimeout
        from rlsr_ray.cli import first_line

        start = time.monotonic() if submitted_at is None else submitted_at
        values = []
        for parts in results:
            try:
                tables = [r.result(timeout_s=max(0.0, start + self.call_timeout_s - time.monotonic())) for r in parts]
                values.append(pa.concat_tables(tables))
            except TimeoutError:
                raise PoolTimeout(f"reward service {self.app_name!r}: no answer to {what} within "
                                  f"{self.call_timeout_s:.0f}s (ray.call_timeout_s)") from None
            except RayServeException as e:
                first = first_line(e)
                raise ActorFailure("reward", f"reward service {self.app_name!r}: {what} failed: {first}") from e
        return values

    def call(self, method: str, per_actor_args: list[tuple]) -> list:
        return self.get(self.submit(method, per_actor_args), method)

    # The pool interface for membership: Serve places and replaces replicas itself.
    def admit(self) -> int:
        return 0

    def take_events(self) -> list:
        return []

    def retire(self, nodes: set) -> int:
        return 0  # Serve moves replicas off draining nodes itself

    def shutdown(self) -> None:
        """Delete the app only if this run deployed it; a shared one stays for its other users."""
        if self.owned:
            from ray import serve

            serve.delete(self.app_name)


def connect(cfg, device: str, terms: list) -> ServicePool:
    """The running app named in cfg.reward_service (as it is, whatever terms it scores), or a new
    one deployed with its settings, scoring `terms`."""
    from ray import serve

    rs, p = cfg.reward_service, cfg.pools.reward
    try:
        return ServicePool(serve.get_app_handle(rs.app_name), cfg.ray.call_timeout_s, False, rs.app_name,
                           rs.request_rows)
    except (serve.exceptions.RayServeException, KeyError, ValueError):
        pass  # not running: deploy it
    serve.start(http_options={"location": "NoServer"})  # handles only: no HTTP port
    app = deployment(terms, max_batch_size=rs.max_batch_size, batch_wait_timeout_s=rs.batch_wait_timeout_s,
                     min_replicas=rs.min_replicas, max_replicas=rs.max_replicas, num_cpus=p.num_cpus,
                     num_gpus=p.num_gpus, accelerator_type=p.accelerator_type,
                     device=device, torch_threads=p.torch_threads)
    handle = serve.run(app, name=rs.app_name, route_prefix=None)
    return ServicePool(handle, cfg.ray.call_timeout_s, True, rs.app_name, rs.request_rows)
