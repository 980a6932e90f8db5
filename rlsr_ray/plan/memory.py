"""Bytes a pool's actor holds, from first principles: the model's shape, bytes per element, and
which tensors autograd keeps for backward. Pure arithmetic, fitted to no measurement; checked
against the real code path's peak memory (benchmarks/learner_memory.py, tests/test_memory.py).

Activations follow transformers' Llama-family decoder (Llama, Qwen2, Mistral) as it runs here: per
layer and token, autograd keeps for backward
- each RMSNorm: its float32 input (the input itself in float32, a float32 copy otherwise), the
  normalised value in the activation dtype and the weighted output the next matmuls read, plus one
  float32 rsqrt;
- attention: q, k and v after RoPE (k and v repeated to every query head for sdpa and eager, which
  take no grouped heads), the output, and for sdpa/flash the float32 logsumexp per head; sdpa with
  padding also keeps its attention mask, one value per (query, key) pair, per layer (float32 on
  CPU, the activation dtype on CUDA); eager keeps the float32 softmax and its cast;
- the SwiGLU MLP: gate and up outputs, silu(gate) and the product (the down projection's input).
With gradient checkpointing a layer keeps only its input, and backward recomputes one layer at a
time. Backward also holds gradient buffers for the widest op alive at once (3 x intermediate +
2 x hidden per token), and at the LM head the logits' gradient path: the float32 logits, their
exp() and the gradient, three [tokens, V] float32 tensors (the logsumexp backward); chunked
log-probs hold those for one chunk only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Attention = Literal["sdpa", "eager", "flash_attention_2"]
GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # rows of the LM head (may exceed the tokenizer's vocabulary)
    tied: bool  # LM head shares the embedding matrix

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        """From a transformers config.json (its text config for multimodal ones)."""
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.q_width, self.kv_width
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """Adapter parameters: rank x (in + out) per adapted layer, by the Llama family's names."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise KeyError(f"no Llama-family layer {unknown[0]!r}")
        return self.layers * sum(rank * sum(dims[t]) for t in targets)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """vLLM's paged KV cache: a key and a value per layer and KV head."""
        return 2 * self.layers * self.kv_width * dtype_bytes


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the learner or reference pads it: rows x width tokens."""
    rows: int
    width: int  # prompt + response columns (the longest of each, padded)
    response: int  # response columns
    padded: bool = True  # rows differ in length, so sdpa takes a mask

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    @property
    def response_tokens(self) -> int:
        return self.rows * self.response


def _norm_bytes(s: ModelShape, b: int) -> int:
    return 4 * s.hidden + 2 * b * s.hidden + 4  # float32 input, normalised, weighted output, rsqrt


def layer_bytes_per_token(s: ModelShape, b: int, attention: Attention, width: int, padded: bool,
                          device: str) -> int:
    """Bytes one decoder layer keeps per token for backward (activations in b-byte elements)."""
    kv = s.kv_width if attention == "flash_attention_2" else s.q_width  # repeated for sdpa/eager
    attn = b * (2 * s.q_width + 2 * kv)  # q, k, v, output
    if attention == "eager":
        attn += s.heads * width * (4 + b)  # float32 softmax and its cast, every key of every query
    else:
        attn += 4 * s.heads  # logsumexp
    if attention == "sdpa" and padded:
        attn += width * (4 if device == "cpu" else b)  # the mask, one value per key
    return 2 * _norm_bytes(s, b) + attn + 4 * b * s.intermediate


def _head_working(s: ModelShape, b: int, tokens: int) -> int:
    """The logits' gradient path over `tokens` rows of the head: logits in b bytes (where not
    float32), then three float32 [tokens, V] tensors."""
    return tokens * s.vocab * ((b if b != 4 else 0) + 3 * 4)


def learner_activation_bytes(s: ModelShape, m: Batch, dtype_bytes: int, attention: Attention = "sdpa",
                             checkpointing: bool = False, chunk_tokens: int = 0, device: str = "cpu") -> dict:
    """Peak bytes of one forward + backward above the model states, by component."""
    b = dtype_bytes
    per_layer = layer_bytes_per_token(s, b, attention, m.width, m.padded, device)
    grads = m.tokens * b * (3 * s.intermediate + 2 * s.hidden)
    rope = m.tokens * 2 * s.head_dim * b + m.tokens * 8  # cos, sin; token ids
    out = {"rope_and_ids": rope, "final_norm": m.tokens * _norm_bytes(s, b)}
    if checkpointing:
        out["layers_kept"] = s.layers * m.tokens * b * s.hidden  # each layer's input
        layer_working = m.tokens * per_layer + grads  # one layer recomputed, and its gradients
    else:
        out["layers_kept"] = s.layers * m.tokens * per_layer
        layer_working = grads
    if chunk_tokens > 0:
        out["head_kept"] = m.response_tokens * (b * s.hidden + 4)  # gathered hidden rows, log-probs
        head_working = _head_working(s, b, min(chunk_tokens, m.response_tokens))
    else:
        out["head_kept"] = m.rows * (m.response + 1) * b * s.hidden + m.response_tokens * 4 * s.vocab
        head_working = _head_working(s, b, m.response_tokens) - m.response_tokens * 4 * s.vocab
    out["working"] = max(layer_working, head_working)  # backward meets the head first, then each layer
    out["total"] = sum(out.values())
    return out


def reference_activation_bytes(s: ModelShape, m: Batch, dtype_bytes: int, attention: Attention = "sdpa",
                               chunk_tokens: int = 0, device: str = "cpu") -> dict:
    """Peak bytes of one no-grad scoring pass: nothing is kept, so the largest working set counts,
    a layer's (its MLP's three intermediates and the mask) or the head's (logits, their float32
    copy where they are not float32, and the logsumexp's exp())."""
    b = dtype_bytes
    mask = m.tokens * m.width * (4 if device == "cpu" else b) if attention == "sdpa" and m.padded else 0
    layer = m.tokens * b * (3 * s.intermediate + 2 * s.hidden) + mask
    rows = min(chunk_tokens, m.response_tokens) if chunk_tokens > 0 else m.rows * (m.response + 1)
    head = rows * s.vocab * (b + (4 if b != 4 else 0) + 4)
    out = {"hidden": m.tokens * b * s.hidden, "working": max(layer, head)}
    out["total"] = sum(out.values())
    return out


def state_bytes(s: ModelShape, zero_stage: int, world: int, weights_bytes: int, optimizer: str = "adamw",
                offload_optimizer: bool = False, offload_params: bool = False, trained: int | None = None) -> dict:
    """Model states on one learner device (ZeRO paper accounting). float32 weights: weights,
    gradients and (AdamW) two moments; bf16 weights add float32 master weights to the optimizer's
    share (DeepSpeed's bf16 mode). ZeRO-1 partitions the optimizer's share over the world, ZeRO-2
    the gradients too, ZeRO-3 the weights too; offload moves those shares to host memory.
    `trained`: the parameters that train (LoRA: the adapters, held beside the whole frozen base);
    only they have gradients and optimizer states. None: all of them."""
    n = s.params if trained is None else trained
    moments = 8 if optimizer == "adamw" else 0
    master = 4 if weights_bytes != 4 else 0
    opt = n * (moments + master)
    grads = n * (4 if weights_bytes == 4 else weights_bytes)
    weights = (s.params + (0 if trained is None else trained)) * weights_bytes
    out = {
        "weights": weights / (world if zero_stage >= 3 else 1),
        "gradients": grads / (world if zero_stage >= 2 else 1),
        "optimizer": opt / (world if zero_stage >= 1 else 1),
    }
    if offload_optimizer:
        out["optimizer"] = 0.0
    if offload_params and zero_stage >= 3:
        out["weights"] = 0.0
    out["total"] = sum(out.values())
    return out
