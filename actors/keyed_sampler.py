"""Sampling in transformers.generate from one random stream per sample, keyed by what the sample
is (the step's seed, its group, its index in the group), not by the actor or batch that draws it.

transformers samples a whole batch from one generator, so a prompt's samples change with what else
is in its batch and which actor holds it. Here each row gets its own generator and a token is
drawn by inverting the row's CDF (softmax(logits / T) after top-p, summed in float64) at one
uniform number from that generator; the processor leaves only that token and generate() decodes
greedily. A sample re-drawn on another actor, alone or in another batch, is the same sample as
long as its logits are: batching can move them in the last bits (other matmul shapes, padding),
which changes a token only where the uniform falls that close to a step of the CDF. One number
per row and token: cheaper than torch.multinomial over the batch (35 vs 73 ms for 64 rows of a
49,152-token vocabulary on one CPU thread).
"""
from __future__ import annotations

from typing import Sequence

import torch

from actors.sampling import mixed_seed


class KeyedSampler:
    """A logits processor for generate(do_sample=False): temperature, top-p, then a draw with the
    row's own generator; every other token's score becomes -inf. Rows are (seed, key, index)
    triples, in the order of the batch."""

    def __init__(self, rows: Sequence[tuple[int, int, int]], temperature: float, top_p: float, device: str):
        from transformers.generation.logits_process import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.generators = [torch.Generator(device=device).manual_seed(mixed_seed(*row)) for row in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        chosen = draw(torch.softmax(scores, -1, dtype=torch.float64), self.generators)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[rows, 1] token indices, row r drawn from probs[r] with generators[r]'s next uniform: the
    first index whose cumulative probability exceeds it (a token of probability 0 never is)."""
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=probs.device, dtype=torch.float64) for g in generators])
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
    return chosen.clamp_(max=probs.shape[-1] - 1)  # u * total can round up to the last step
