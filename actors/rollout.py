"""Rollout role: PROMPTS -> ROLLOUTS with the current policy weights, tagged with their version."""
from __future__ import annotations

import os

import pyarrow as pa

from actors.sampling import RolloutBackend, SamplingSpec, mixed_seed
from rlsr_ray.contract import batch
from rlsr_ray.contract.selection import rollout_summary
from rlsr_ray.modeling.policy import load_tokenizer, resolve_compute_dtype, set_threads


class RolloutActor:
    def __init__(self, policy_path: str, backend: str = "transformers", compute_dtype: str = "float32",
                 device: str = "cpu", torch_threads: int = 1, generate_batch_size: int = 16,
                 vllm_gpu_memory_utilization: float = 0.85, rank: int = 0, seed: int = 0,
                 vllm_tensor_parallel_size: int = 1, max_model_len: int | None = None, lora=None):
        set_threads(torch_threads)
        self.rank = rank
        compute_dtype = resolve_compute_dtype(compute_dtype, device)
        self.tok = load_tokenizer(policy_path)
        self.policy_version = 0
        self.backend: RolloutBackend
        if backend == "vllm":
            from actors.vllm_backend import VLLMBackend

            # An engine seed of its own per actor: with one shared seed every engine would draw the
            # same numbers for its i-th unseeded request (vLLM's default seed is 0 on every engine).
            self.backend = VLLMBackend(policy_path, {self.tok.eos_token_id}, compute_dtype,
                                       vllm_gpu_memory_utilization, vocab_size=len(self.tok),
                                       seed=mixed_seed(seed, rank), tensor_parallel_size=vllm_tensor_parallel_size,
                                       max_model_len=max_model_len, lora=lora)
        else:
            from actors.hf_backend import TransformersBackend

            # Under LoRA (lora: rlsr_ray.modeling.lora.LoraSpec) it holds the base with adapters, and a sync
            # sends the adapters alone.
            self.backend = TransformersBackend(policy_path, self.tok, compute_dtype, device, generate_batch_size,
                                               lora)
        # Printed to the driver's log: a second line for one rank means Ray restarted this actor.
        print(f"rollout actor {rank} ready (pid {os.getpid()}, policy version 0)", flush=True)

    def generate(self, prompts: pa.Table, spec: SamplingSpec) -> pa.Table:
        prompts = batch.check(prompts, batch.PROMPTS, f"rollout[{self.rank}] input")
        prompt_ids = prompts.column("prompt_ids").to_pylist()
        group_ids = prompts.column("group_id").to_pylist()
        groups = self.backend.generate(prompt_ids, spec, keys=group_ids)
        cols: dict[str, list] = {f.name: [] for f in batch.ROLLOUTS}
        texts = zip(*(prompts.column(c).to_pylist() for c in ("reference_text", "prompt_text", "data_json")))
        for gid, pids, (ref, text, extra), samples in zip(group_ids, prompt_ids, texts, groups):
            for k, s in enumerate(samples):
                cols["group_id"].append(gid)
                cols["sample_idx"].append(k)
                cols["prompt_ids"].append(pids)
                cols["reference_text"].append(ref)
                cols["prompt_text"].append(text)
                cols["data_json"].append(extra)
                cols["response_ids"].append(s.response_ids)
                cols["response_text"].append(self.tok.decode(s.response_ids, skip_special_tokens=True))
                cols["rollout_logprobs"].append(s.logprobs)
                cols["finish_reason"].append(s.finish_reason)
                cols["policy_version"].append(self.policy_version)
        table = pa.Table.from_pydict(cols, schema=batch.ROLLOUTS)
        return batch.check(table, batch.ROLLOUTS, f"rollout[{self.rank}] output")

    def generate_summarised(self, prompts: pa.Table, spec: SamplingSpec) -> tuple[pa.Table, dict]:
        """generate() and its summary: called with two returns, so the driver fetches only the
        summary and hands the table on to the reward, reference and learner actors by reference."""
        table = self.generate(prompts, spec)
        return table, rollout_summary(table)

    def load_weights(self, state_dict: dict, version: int) -> int:
        self.backend.load_weights(state_dict)
        self.policy_version = version
        return version

    # The weight route (rlsr_ray/modeling/weight_group.py): learner rank 0 sends, the rollout actors receive.
    def weight_dtype(self) -> str:
        return self.backend.weight_dtype

    def join_weight_route(self, address: str, settings, specs: list, route_rank: int) -> None:
        """route_rank: this actor's first rank in the route (WeightRoute.open: an actor takes one
        rank per tensor-parallel shard of its engine)."""
        self.backend.join_route(address, route_rank, settings, specs)

    def in_weight_route(self) -> bool:
        return self.backend.in_route()

    def receive_weights(self, version: int) -> dict:
        """One broadcast of the weights. A torn route, or an actor Ray restarted since it joined,
        is reported rather than raised: the driver then falls back to the object store."""
        try:
            self.backend.receive_weights()
        # Any exception: torch raises RuntimeError (or DistBackendError, a RuntimeError) in this
        # process, but vLLM's multiprocess client re-raises a worker's failure as a bare
        # Exception(message) (vllm/v1/engine/core_client.py). If the engine itself is gone, the
        # object-store fallback fails next and says so.
        except Exception as e:  # noqa: BLE001
            self.backend.close_route()
            return {"ok": False, "error": f"rollout[{self.rank}]: {str(e).strip().splitlines()[0]}"}
        self.policy_version = version
        return {"ok": True, "version": version}

    def close_weight_route(self) -> None:
        self.backend.close_route()
