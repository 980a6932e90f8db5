"""The RLSR reward as a Ray Serve deployment that several training runs on one cluster can share.

Same scoring code as the reward pool (actors/reward.py: embedding cosine + LCS penalty, each
reference embedded once per replica). Requests are whole ROLLOUTS tables; `@serve.batch` gathers
the tables that arrive within `batch_wait_timeout_s` (up to `max_batch_size` of them, from any
run) into one embedding pass and hands each caller back its own REWARDS table. Replicas
autoscale between the bounds given to `deployment()`.
"""
import asyncio

import pyarrow as pa
from ray import serve

from rlsr_ray import batch
from rlsr_ray.reward import PenaltyRule


@serve.deployment
class RewardService:
    def __init__(self, model_path: str, rule: PenaltyRule, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, device: str = "cpu", torch_threads: int = 1):
        from actors.reward import RewardActor

        self.scorer = RewardActor(model_path, rule, device=device, torch_threads=torch_threads)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.counts = {"batches": 0, "tables": 0, "rows": 0}  # what this replica has scored

    async def stats(self) -> dict:
        return dict(self.counts)

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


def deployment(model_path: str, rule: PenaltyRule, *, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
               min_replicas: int = 1, max_replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               accelerator_type: str | None = None, device: str = "cpu", torch_threads: int = 1):
    """The bound application: batching, autoscaling bounds and placement as given."""
    actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if accelerator_type:
        actor_options["accelerator_type"] = accelerator_type
    autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                   "target_ongoing_requests": max_batch_size}
    return RewardService.options(
        # A batch can only fill if that many requests may wait on one replica.
        max_ongoing_requests=max(2 * max_batch_size, 5), ray_actor_options=actor_options,
        autoscaling_config=autoscaling,
    ).bind(model_path, rule, max_batch_size, batch_wait_timeout_s, device, torch_threads)
