"""Log-probs of the sampled tokens over the vocabulary, a chunk of tokens at a time.

The full computation (`loss.token_logprobs` on the model's logits) holds [B, T, V] logits, their
float32 copy and logsumexp's exp() for backward: for a 150k vocabulary, over 2 MB per token, more
than the rest of a small model's activations. Here only the hidden states that predict a real
response token are taken (padding costs nothing), the LM head runs on `chunk_tokens` of them at a
time, and each chunk sits under activation checkpointing: the forward keeps only its [chunk]
log-probs, and backward recomputes the chunk's logits. The logits' working set is then
chunk_tokens x V whatever T is, and the arithmetic per token is the same as the full path's (same
head, same float32 logsumexp), so the results agree to rounding (tests/test_chunked_logprobs.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _chunk(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
           temperature: float, vocab_size: int | None, softcap: float | None) -> torch.Tensor:
    """hidden [N, H], targets [N] -> log pi(target) [N] in float32 (the full path's arithmetic)."""
    logits = head(hidden)[:, :vocab_size].float()
    if softcap:  # Gemma-2's final logit soft-capping, applied by its CausalLM forward
        logits = torch.tanh(logits / softcap) * softcap
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                           targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                           chunk_tokens: int = 1024, vocab_size: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """hidden [B, T, H] (position t predicts targets[:, t]), targets [B, T], mask [B, T] ->
    log pi(target) [B, T] float32, 0 where mask is 0. `head` maps [N, H] to [N, V'] logits (the
    policy's LM head); columns from `vocab_size` on are cut, as the full path cuts them."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    where = mask.bool()
    h, y = hidden[where], targets[where]  # [N, H], [N]: real tokens only
    grad = torch.is_grad_enabled() and (h.requires_grad or any(
        p.requires_grad for p in getattr(head, "parameters", lambda: [])()))
    parts = []
    for a in range(0, h.shape[0], chunk_tokens):
        args = (head, h[a:a + chunk_tokens], y[a:a + chunk_tokens], temperature, vocab_size, softcap)
        # Non-reentrant checkpointing: it recomputes under the autocast state of the forward, and
        # gradients reach the head's parameters though its input may not need them.
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        out = out.masked_scatter(where, torch.cat(parts))
    return out
