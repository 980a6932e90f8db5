"""Policy-model helpers shared by the rollout, reference and learner roles (plain torch).

Batches are laid out the way `generate` lays them out: prompts left-padded to a common width P,
responses right-padded after them. Response token j of every row then sits at column P + j and is
predicted by the logits at column P + j - 1, so one slice serves the whole batch, and rollout,
reference and learner compute the same numbers for the same weights.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rlsr_ray.algo.chunked_logprobs import chunked_token_logprobs
from rlsr_ray.algo.loss import token_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_attention(requested: str, device: str) -> str:
    """`auto` -> flash_attention_2 on CUDA where the flash-attn package is installed, else sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str, device: str = "cpu", weights_dtype: str = "float32", attn_implementation: str = "auto"):
    """An HF model folder (or hub id), or a PEFT adapter folder: then its base with the adapter
    folded in (rlsr_ray/modeling/lora.py), a plain transformers model either way."""
    from transformers import AutoModelForCausalLM

    from rlsr_ray.modeling import lora

    if lora.is_adapter(path):
        model = lora.load_merged(path, lambda base: load_causal_lm(base, "cpu", weights_dtype, attn_implementation))
        return model.to(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[weights_dtype],
                                                 attn_implementation=resolve_attention(attn_implementation, device))
    return model.to(device)


def transformers_model(model):
    """The transformers model inside a DeepSpeed engine (.module) and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant: it works with inputs that need no
    grad and under ZeRO-3's parameter hooks). transformers 5.21 renamed the call; the vllm set
    pins 5.20, which has only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively. On AVX2-only CPUs torch emulates them, about
    20x slower than float32 (measured on a 2-core AVX2 EPYC)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())


def resolve_compute_dtype(requested: str, device: str) -> str:
    """`auto` -> bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere. Each actor
    resolves it on its own hardware: a cluster's pools may sit on different CPU and GPU types."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" or cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def describe_compute_dtype(requested: str) -> str:
    """One log line: what `auto` means on this machine's CPU and on GPUs."""
    if requested != "auto":
        return f"compute dtype {requested} (model.compute_dtype)"
    capability = torch.backends.cpu.get_cpu_capability()
    native = "AMX/AVX512-BF16" if cpu_has_fast_bf16() else "no native bf16"
    return (f"compute dtype auto: {resolve_compute_dtype('auto', 'cpu')} on CPU actors of this machine's "
            f"class ({capability}, {native}), bfloat16 on CUDA actors")


def autocast(device: str, compute_dtype: str):
    """bfloat16 autocast where asked (AMX/AVX512-bf16 CPUs and GPUs run it ~2x faster)."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[compute_dtype])


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, P + T] left-padded prompt, then response, then right padding
    attention_mask: torch.Tensor  # [B, P + T] 1 on real tokens
    position_ids: torch.Tensor  # [B, P + T] 0-based positions of real tokens (pads get 0)
    response_ids: torch.Tensor  # [B, T] response tokens, pad where masked
    response_mask: torch.Tensor  # [B, T] 1 on real response tokens
    prompt_width: int  # P


def pad_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
              device: str = "cpu") -> PaddedBatch:
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have one length")
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    B = len(prompts)
    ids = np.full((B, P + T), pad_id, dtype=np.int64)
    mask = np.zeros((B, P + T), dtype=np.int64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = p
        ids[i, P:P + len(r)] = r
        mask[i, P - len(p):P + len(r)] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return PaddedBatch(t(ids), t(mask), t(pos), t(ids[:, P:]), t(mask[:, P:]), P)


def forward_logprobs(model, batch: PaddedBatch, temperature: float, compute_dtype: str,
                     vocab_size: int | None = None, chunk_tokens: int = 0) -> torch.Tensor:
    """log pi(response token) for every response position -> [B, T] float32 (graph kept).

    `model`: a transformers causal LM, or a DeepSpeed engine around one (called through the
    engine, so its ZeRO-3 gathering and autocast apply).
    `vocab_size`: the tokenizer's; logits beyond it (a vocabulary padded for the kernels, e.g.
    Qwen2.5's 151,936 logits for 151,665 tokens) are no token and out of pi's support, as they
    are out of the rollout's sampling.
    `chunk_tokens` > 0: the LM head runs on that many response tokens at a time, each chunk
    recomputed in backward (algo/chunked_logprobs.py), so no [B, T, V] tensor is ever whole."""
    device = batch.input_ids.device
    T = batch.response_ids.shape[1]
    if chunk_tokens > 0:
        return _chunked_forward_logprobs(model, batch, temperature, compute_dtype, vocab_size, chunk_tokens)
    with autocast(str(device), compute_dtype):
        # Only the last T + 1 positions reach the LM head (49k-wide for SmolLM2): prompt positions
        # predict nothing we score, and skipping them saves a fifth of the forward pass.
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :T, :vocab_size]  # positions P-1 .. P+T-2 predict response tokens 0 .. T-1
    return token_logprobs(logits, batch.response_ids, temperature) * batch.response_mask


def _chunked_forward_logprobs(model, batch: PaddedBatch, temperature: float, compute_dtype: str,
                              vocab_size: int | None, chunk_tokens: int) -> torch.Tensor:
    """forward_logprobs with the LM head in chunks: the model's own forward runs (through the
    engine, if any) with one position's logits, the decoder's final hidden states are taken with
    a forward hook, and the head is applied to them chunk by chunk."""
    hf = transformers_model(model)  # the decoder and head inside an engine and a LoRA wrapper
    P, T = batch.prompt_width, batch.response_ids.shape[1]
    seen: list[torch.Tensor] = []
    hook = hf.base_model.register_forward_hook(lambda _m, _args, out: seen.append(out[0]))
    try:
        with autocast(str(batch.input_ids.device), compute_dtype):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, logits_to_keep=1)
            hidden = seen[-1][:, P - 1:P + T - 1]  # [B, T, H]: position P-1+j predicts response token j
            head = hf.get_output_embeddings()
            args = (batch.response_ids, batch.response_mask, temperature, chunk_tokens, vocab_size,
                    getattr(hf.config, "final_logit_softcapping", None))
            if hasattr(head.weight, "ds_id"):  # partitioned by ZeRO-3
                return _zero3_chunked(hidden, head, args)
            return chunked_token_logprobs(hidden, head, *args)
    finally:
        hook.remove()


def _zero3_chunked(hidden: torch.Tensor, head, args: tuple) -> torch.Tensor:
    """chunked_token_logprobs with a ZeRO-3 head, whole once in forward and once in backward.

    Through the module, each chunk (and each recompute of it in backward) would gather the head and
    release it again: one collective per chunk, whose count differs between ranks with different
    token counts, and a frozen (LoRA) head is not gathered at all when a chunk is recomputed in
    backward. Here the head's weight is gathered around the forward's chunks, and again from the
    first chunk's backward (the log-probs' gradient arrives) to the last (the hidden states' is
    whole), by identity autograd functions on both ends; the chunks apply it as a plain linear map."""
    import deepspeed

    params = [p for p in head.parameters()]
    window = _Gathered(params)
    hidden = _OnBackward.apply(hidden, window.close)  # runs after every chunk's backward
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        out = chunked_token_logprobs(hidden, lambda x: torch.nn.functional.linear(x, head.weight, head.bias), *args)
    return _OnBackward.apply(out, window.open)  # runs before any chunk's backward


class _Gathered:
    """ZeRO-3 parameters gathered from open() to close() (a GatheredParameters context held open)."""

    def __init__(self, params: list):
        self.params, self.context = params, None

    def open(self) -> None:
        import deepspeed

        self.context = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
        self.context.__enter__()

    def close(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None


class _OnBackward(torch.autograd.Function):
    """Identity whose backward first calls `action` (no gradient of its own)."""

    @staticmethod
    def forward(ctx, x, action):
        ctx.action = action
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.action()
        return grad, None


@torch.no_grad()
def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_id: int, temperature: float, compute_dtype: str, micro_batch: int,
                      device: str = "cpu", vocab_size: int | None = None,
                      chunk_tokens: int = 0) -> list[np.ndarray]:
    """Per-row float32 arrays of response-token log-probs, computed in micro-batches."""
    out: list[np.ndarray] = []
    for s in range(0, len(prompts), micro_batch):
        b = pad_batch(prompts[s:s + micro_batch], responses[s:s + micro_batch], pad_id, device)
        lp = forward_logprobs(model, b, temperature, compute_dtype, vocab_size, chunk_tokens).float().cpu().numpy()
        out.extend(lp[i, :len(r)].astype(np.float32) for i, r in enumerate(responses[s:s + micro_batch]))
    return out


def state_dict_to_torch(weights: dict) -> dict[str, torch.Tensor]:
    """numpy arrays from the object store (read-only, zero-copy) -> tensors sharing their memory.

    The callers copy them straight into parameters, so the read-only buffers are never written.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in weights.items()}


def set_threads(n: int) -> None:
    """One actor, `n` intra-op threads: several actors share a small box without oversubscribing."""
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # may only be set before the first parallel op
        torch.set_num_interop_threads(1)
