"""Reference role: ROLLOUTS -> REF_LOGPROBS under the frozen initial policy."""
from __future__ import annotations

import os

import pyarrow as pa

from rlsr_ray.contract import batch
from rlsr_ray.modeling.policy import load_causal_lm, load_tokenizer, resolve_compute_dtype, response_logprobs, set_threads
from rlsr_ray.contract.selection import Piece, gather


class ReferenceActor:
    def __init__(self, policy_path: str, compute_dtype: str = "float32", device: str = "cpu",
                 torch_threads: int = 1, micro_batch_size: int = 8, temperature: float = 1.0, rank: int = 0,
                 logprob_chunk_tokens: int = 0, attn_implementation: str = "auto"):
        set_threads(torch_threads)
        self.rank, self.device, self.compute_dtype = rank, device, resolve_compute_dtype(compute_dtype, device)
        self.micro_batch_size, self.temperature = micro_batch_size, temperature
        self.chunk_tokens = logprob_chunk_tokens
        # A frozen policy needs no float32 master weights: bf16 on CUDA where it computes in bf16
        # (a 32B reference is 65 GB so, 131 GB in float32). CPU keeps float32 weights under autocast.
        weights = "bfloat16" if device.startswith("cuda") and self.compute_dtype == "bfloat16" else "float32"
        self.model = load_causal_lm(policy_path, device, weights, attn_implementation=attn_implementation).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        tok = load_tokenizer(policy_path)
        self.pad_id, self.vocab_size = tok.pad_token_id, len(tok)
        # Printed to the driver's log: a second line for one rank means Ray restarted this actor.
        print(f"reference actor {rank} ready (pid {os.getpid()})", flush=True)

    def logprobs(self, rollouts: pa.Table) -> pa.Table:
        rollouts = batch.check(rollouts, batch.ROLLOUTS, f"reference[{self.rank}] input")
        lps = response_logprobs(
            self.model, rollouts.column("prompt_ids").to_pylist(), rollouts.column("response_ids").to_pylist(),
            self.pad_id, self.temperature, self.compute_dtype, self.micro_batch_size, self.device, self.vocab_size,
            self.chunk_tokens,
        )
        table = pa.table({
            "group_id": rollouts.column("group_id"), "sample_idx": rollouts.column("sample_idx"),
            "ref_logprobs": pa.array([x.tolist() for x in lps], pa.list_(pa.float32())),
        })
        return batch.check(table, batch.REF_LOGPROBS, f"reference[{self.rank}] output")

    def logprobs_counted(self, selection: list[Piece], *rollouts: pa.Table) -> tuple[pa.Table, int]:
        """logprobs() of the rows a selection names in rollout tables passed by reference, and its
        row count: called with two returns, so the driver waits on the count and the learners
        read the table."""
        table = self.logprobs(gather(rollouts, selection, batch.ROLLOUTS))
        return table, len(table)
