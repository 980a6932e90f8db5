"""A vLLM logits processor: no id beyond the tokenizer's vocabulary is ever sampled.

Models pad their output layer for the kernels (Qwen2.5: 151,936 logits for 151,665 tokens). The
learner and the reference drop those logits (rlsr_ray/policy.forward_logprobs), so the rollout
must too, or vLLM's processed log-probs would be normalised over a larger support than the
learner's. vLLM's own `allowed_token_ids` cannot say it: its V2 model runner holds at most 1,024
ids per request (vllm/v1/worker/gpu/sample/logit_bias.py) and raises inside execute_model, which
ends the engine. This processor masks a suffix of any length instead.

It implements vLLM's V2 interface (vllm/v1/worker/gpu/sample/logits_processor/interface.py) and
is named in `LLM(logits_processors=[...])`, so vLLM imports this module in its own processes. Each
request asks for the mask through `SamplingParams.extra_args[EXTRA_ARG]`; `apply` runs before
temperature and top-p, so the processed log-probs vLLM returns already exclude the masked ids.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

EXTRA_ARG = "rlsr_token_limit"
QUALNAME = "actors.vllm_logits:TokenizerVocabMask"


def token_limit(sampling_params: Any) -> int:
    """The request's limit: ids >= it are masked; 0 when the request asks for no mask."""
    extra = sampling_params.extra_args or {}
    limit = extra.get(EXTRA_ARG, 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"extra_args[{EXTRA_ARG!r}] must be a non-negative integer, got {limit!r}")
    return limit


class TokenizerVocabMask(LogitsProcessor):
    def __init__(self, vllm_config: Any, req_states: Any):
        import torch

        # One limit per request slot, 0 = not masked. Slots are recycled: add_request overwrites.
        self.limits = np.zeros(req_states.max_num_reqs, dtype=np.int64)
        self.limits_device = torch.zeros(req_states.max_num_reqs, dtype=torch.int64, device=req_states.device)
        self.dirty = False

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        token_limit(sampling_params)  # vLLM turns the ValueError into a failed request, not a dead engine

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        limit = token_limit(sampling_params)
        self.limits[req_idx] = limit
        self.dirty = True
        return limit > 0

    def apply_staged_writes(self) -> None:
        if self.dirty:  # one small host-to-device copy per step that admitted requests, none otherwise
            import torch

            self.limits_device.copy_(torch.from_numpy(self.limits), non_blocking=False)
            self.dirty = False

    def apply(self, logits: Any, ctx: Any) -> Any:
        active = self.limits[ctx.idx_mapping_np]
        # Rows of one limit at a time: the masked block is [rows, vocab - limit], not [rows, vocab].
        for limit in np.unique(active[active > 0]).tolist():
            if limit >= logits.shape[-1]:
                continue
            rows = self.limits_device[ctx.expanded_idx_mapping] == limit  # [num_logits_rows]
            logits[:, limit:].masked_fill_(rows[:, None], float("-inf"))
        return logits
