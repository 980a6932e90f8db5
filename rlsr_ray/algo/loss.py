"""Clipped policy-gradient loss with KL to the reference policy, pure torch.

All per-token tensors are [B, T] over response positions, with `mask` [B, T] marking real tokens.
Aggregation divides by a normaliser computed over the whole mini-batch (all micro-batches, all
learners) rather than per micro-batch, so the gradient does not depend on how a mini-batch is
split: token_mean divides by the mini-batch's token count, seq_mean by its sequence count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token_mean", "seq_mean"]


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k1 = log r is unbiased but high-variance and can be negative; k2 = (log r)^2 / 2 is biased
    but low-variance; k3 = (1/r - 1) + log r is unbiased and non-negative (r = pi / pi_ref).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # Clamp so one wildly off token cannot overflow exp() and poison the whole step.
        lr = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(-lr) - 1.0 + lr
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def clipped_pg_per_token(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, per token -> (loss [B, T], clipped [B, T] as 0/1 float)."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    adv = advantages.unsqueeze(-1)  # [B, 1]: one advantage per sequence, broadcast over tokens
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation, normaliser: float) -> torch.Tensor:
    """Sum this micro-batch's share of a mini-batch mean.

    token_mean: sum(values * mask) / normaliser, normaliser = tokens in the mini-batch.
    seq_mean:   sum_b mean_t(values_b) / normaliser, normaliser = sequences in the mini-batch.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / normaliser
    if mode == "seq_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / normaliser
    raise ValueError(f"unknown aggregation {mode!r}; choose token_mean or seq_mean")


@dataclass(frozen=True)
class LossSettings:
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    kl_estimator: KLEstimator = "k3"
    aggregation: Aggregation = "token_mean"


def rlsr_loss(
    logp: torch.Tensor,  # [B, T] log-probs of the sampled tokens under the current policy
    old_logp: torch.Tensor,  # [B, T] same under the policy that generated them
    ref_logp: torch.Tensor,  # [B, T] same under the frozen reference policy
    advantages: torch.Tensor,  # [B] group-relative advantage per sequence
    mask: torch.Tensor,  # [B, T] 1 for response tokens, 0 for padding
    settings: LossSettings,
    normaliser: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-> (loss for backward, stats as sums over this micro-batch's tokens)."""
    pg, clipped = clipped_pg_per_token(logp, old_logp, advantages, settings.clip_eps)
    kl = kl_per_token(logp, ref_logp, settings.kl_estimator)
    per_token = pg + settings.kl_coef * kl if settings.kl_coef > 0 else pg
    loss = aggregate(per_token, mask, settings.aggregation, normaliser)
    m = mask.to(pg.dtype)
    with torch.no_grad():
        stats = {
            "tokens": float(m.sum()),
            "pg_sum": float((pg * m).sum()),
            "kl_sum": float((kl * m).sum()),
            "clipped_sum": float((clipped * m).sum()),
        }
    return loss, stats


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning: summed negative log-likelihood of the response tokens ([B, T]
    log-probs, [B, T] mask) over `normaliser` (the mini-batch's response tokens on every rank)."""
    m = mask.to(logp.dtype)
    nll = -(logp * m).sum()
    return nll / normaliser, {"tokens": float(m.sum()), "nll_sum": float(nll.detach())}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> log pi(target) [B, T] in float32.

    Logits are divided by the sampling temperature so the learner scores the same distribution
    the rollout sampled from.
    """
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    # logsumexp + gather avoids materialising a second [B, T, V] log_softmax tensor.
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
