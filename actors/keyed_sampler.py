"""Sampling in transformers.generate from one random stream per sample, keyed by what the sample
is (the step's seed, its group, its index in the group), not by the actor or batch that draws it.

transformers samples a whole batch from one generator, so a prompt's samples change with what else
is in its batch and which actor holds it. Here each row gets its own generator and a token is
drawn by the Gumbel-max trick: argmax(logits / T + Gumbel noise) is a draw from
softmax(logits / T) (after top-p), with the noise from the row's generator; generate() then
decodes greedily. A sample re-drawn on another actor, alone or in another batch, is the same
sample as long as its logits are: batching can move them in the last bits (other matmul shapes,
padding), which changes a token only where two perturbed scores tie to that precision.
"""
from __future__ import annotations

from typing import Sequence

import torch

from actors.sampling import mixed_seed


class KeyedGumbel:
    """A logits processor for generate(do_sample=False): temperature, top-p, then each row's own
    Gumbel noise. Rows are (seed, key, index) triples, in the order of the batch."""

    def __init__(self, rows: Sequence[tuple[int, int, int]], temperature: float, top_p: float, device: str):
        from transformers.generation.logits_process import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.generators = [torch.Generator(device=device).manual_seed(mixed_seed(*row)) for row in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        return scores + gumbel(self.generators, scores.shape[-1], scores.device)


def gumbel(generators: Sequence[torch.Generator], width: int, device) -> torch.Tensor:
    """[rows, width] standard Gumbel noise, row r from generators[r] (its next `width` draws)."""
    u = torch.stack([torch.rand(width, generator=g, device=device, dtype=torch.float64) for g in generators])
    # u is in [0, 1): lifted off 0, the noise is finite (float64: a float32 u rounds to 1 too often).
    return (-torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float64).tiny)))).float()
