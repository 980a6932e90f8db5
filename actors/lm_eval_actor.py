"""One checkpoint at a time through the LM Evaluation Harness (rlsr_ray/evaluation/lm_eval_tasks.py)."""
from __future__ import annotations

import os
from typing import Any

# What torchrun (and DeepSpeed's launcher, MPI's) set for each rank of a distributed launch.
LAUNCH_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE")


class LmEvalActor:
    def __init__(self, device: str, torch_threads: int, include_path: str | None, rank: int = 0):
        import torch

        from rlsr_ray.evaluation.harness import task_manager

        torch.set_num_threads(torch_threads)
        # Datasets come from the user's task files or a local cache: never fetched at run time.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        # One process, one model: the harness's Accelerator would read a torchrun-style rank left in
        # the environment this actor inherited (a driver started beside an in-process learner, or
        # under torchrun) as a distributed launch, and wait for a rendezvous that never comes.
        for key in LAUNCH_ENV:
            os.environ.pop(key, None)
        self.device = device
        self.tasks = task_manager(include_path)  # indexing the harness's task files once

    def evaluate(self, model_args: dict[str, str], tasks: list[str], num_fewshot: int | None, limit: float | None,
                 batch_size: int, seed: int) -> dict[str, Any]:
        import lm_eval

        from rlsr_ray.evaluation.harness import condense

        result = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
                                         limit=limit, batch_size=batch_size, device=self.device,
                                         task_manager=self.tasks, log_samples=True, random_seed=seed,
                                         numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        return condense(result)
