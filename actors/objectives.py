"""What a learner minimises, one class per objective.

The DeepSpeed engine, micro-batching, the skip-on-non-finite protocol, checkpoints and export stay
in actors/learner.py; an objective only turns one micro-batch into a loss and its statistics.
GRPO's clipped policy loss with KL is one; supervised fine-tuning's cross-entropy on the response
is another, so SFT and RLSR train the same engine through the same code.
"""
from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa
import torch

from rlsr_ray.contract import batch
from rlsr_ray.algo.loss import rlsr_loss, sft_loss
from rlsr_ray.modeling.policy import forward_logprobs, pad_batch


class Objective(Protocol):
    schema: pa.Schema  # what a mini-batch table must hold
    stat_keys: tuple[str, ...]  # sums over tokens that loss() reports

    def prepare(self, learner: Any, minibatches: list[pa.Table]) -> list[list]:
        """Per mini-batch, per row: what loss() needs besides the table (before any update)."""

    def loss(self, learner: Any, t: pa.Table, context: list, normaliser: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss of this micro-batch, already divided by its mini-batch's normaliser; stats)."""


def _forward(learner: Any, t: pa.Table, temperature: float):
    pb = pad_batch(t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist(),
                   learner.tok.pad_token_id, learner.device)
    logp = forward_logprobs(learner.engine, pb, temperature, learner.s.compute_dtype, len(learner.tok),
                            learner.s.logprob_chunk_tokens)
    return pb, logp


class GRPO:
    schema = batch.TRAIN
    stat_keys = ("tokens", "pg_sum", "kl_sum", "clipped_sum")

    def prepare(self, learner: Any, minibatches: list[pa.Table]) -> list[list]:
        # The PPO anchor is the policy that generated the step: every mini-batch's old log-probs
        # are computed before the first update, or mini-batches 2..k would be anchored to weights
        # already moved by 1..k-1 (ratio back at 1, the clip never bounding the drift).
        return [learner.old_logprobs(t) for t in minibatches]

    def loss(self, learner: Any, t: pa.Table, context: list, normaliser: float):
        pb, logp = _forward(learner, t, learner.s.temperature)
        T, d = pb.response_ids.shape[1], learner.device

        def padded(rows: list) -> torch.Tensor:
            out = torch.zeros(len(rows), T, dtype=torch.float32)
            for i, r in enumerate(rows):
                out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
            return out.to(d)

        adv = torch.tensor(t.column("advantage").to_numpy(), dtype=torch.float32, device=d)
        return rlsr_loss(logp, padded(context), padded(t.column("ref_logprobs").to_pylist()), adv,
                         pb.response_mask, learner.s.loss, normaliser)


class SFT:
    """Cross-entropy of the reference answer given the prompt. Only response positions are ever
    scored (forward_logprobs slices them out), so the prompt is masked by construction."""
    schema = batch.SFT
    stat_keys = ("tokens", "nll_sum")

    def prepare(self, learner: Any, minibatches: list[pa.Table]) -> list[list]:
        return [[None] * len(t) for t in minibatches]

    def loss(self, learner: Any, t: pa.Table, context: list, normaliser: float):
        pb, logp = _forward(learner, t, 1.0)
        return sft_loss(logp, pb.response_mask, normaliser)
