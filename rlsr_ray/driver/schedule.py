"""Which generations are in flight, and the prompts they were drawn from.

On-policy (algo.max_staleness = 0) a step's rollouts are generated when the step starts. With
k > 0 the generations of the next k steps are queued on the rollout actors ahead of time, each
behind the weight syncs submitted before it, so they overlap the current step's scoring and
training; a checkpoint saves the queued ones' rollouts (rlsr_ray/checkpoint.py, pending_rollouts).
"""
from __future__ import annotations

from typing import Any

from rlsr_ray import data
from rlsr_ray.config import Config
from rlsr_ray.driver.step import sampling_spec
from rlsr_ray.driver.pipeline import (Generation, Pools, fetch_rollouts, finish_generation, loaded_generation,
                               start_generation)


class Schedule:
    """Which generations are in flight: on-policy (algo.max_staleness = 0) a step's rollouts are
    started when the step starts; with k > 0 those of steps t+1..t+k are already queued on the
    rollout actors when step t trains, each behind the weight syncs before it, so the rollouts a
    step trains on are at most k versions old. Prompts are drawn in submission order, so the data
    cursor saved with a checkpoint sits just after the prompts of the generations saved with it."""

    def __init__(self, cfg: Config, pools: Pools, train_tok, cursor: data.PromptCursor,
                 pending: dict[int, Any] | None = None):
        self.cfg, self.pools, self.tok, self.cursor = cfg, pools, train_tok, cursor
        self.queue: dict[int, Generation] = {}
        for step, table in sorted((pending or {}).items()):
            self.queue[step] = loaded_generation(pools, table, sampling_spec(cfg, step), step)
        a = cfg.algo
        # Group ids of a step: its prompts, then any refills; unique across the run.
        self.ids_per_step = cfg.train.prompts_per_step * (1 + (a.max_refill_rounds if a.dynamic_sampling else 0))

    def take(self, step: int) -> Generation:
        """The generation step `step` trains on, after queueing those of the steps that follow."""
        last = min(step + self.cfg.algo.max_staleness, self.cfg.run.steps - 1)
        for s in range(step, last + 1):
            if s not in self.queue:
                prompts = data.prompts_table(self.tok, self.cursor.next_indices(self.cfg.train.prompts_per_step),
                                             first_group_id=s * self.ids_per_step)
                self.queue[s] = start_generation(self.pools, prompts, sampling_spec(self.cfg, s), s)
        return self.queue.pop(step)

    def refills(self, step: int):
        """draw(k, round) for rlsr_step: k more prompts, with group ids after the step's own."""
        drawn = [self.cfg.train.prompts_per_step]

        def draw(k: int, _round: int):
            table = data.prompts_table(self.tok, self.cursor.next_indices(k),
                                       first_group_id=step * self.ids_per_step + drawn[0])
            drawn[0] += k
            return table
        return draw

    def pending_tables(self) -> dict[int, Any]:
        """The queued generations' rollouts (waited for, and made again if a rollout actor lost
        its weights meanwhile), to be saved with a checkpoint."""
        for s, g in sorted(self.queue.items()):
            self.queue[s] = finish_generation(self.pools, g)
        return {s: fetch_rollouts(self.pools, g) for s, g in sorted(self.queue.items())}
