"""Which rows of a learner's mini-batch go through one forward/backward together. Pure.

A micro-batch is padded to its longest prompt plus its longest response (policy.pad_batch), so
its cost is rows x (max prompt + max response) tokens. With a token budget, rows are taken
longest first and packed while that padded size stays within the budget: long answers travel a
few at a time, short ones many, and rows of like length share a micro-batch, which is what keeps
the padding small. The loss of each micro-batch is already divided by the mini-batch's global
normaliser (algo/loss.py), so how rows are grouped does not change the update.
"""
from __future__ import annotations

from typing import Sequence


def padded_tokens(prompt_lengths: Sequence[int], response_lengths: Sequence[int], rows: Sequence[int]) -> int:
    """Tokens of the padded [rows, max prompt + max response] batch these rows make."""
    if not rows:
        return 0
    return len(rows) * (max(prompt_lengths[i] for i in rows) + max(max(response_lengths[i] for i in rows), 1))


def micro_batches(prompt_lengths: Sequence[int], response_lengths: Sequence[int], max_rows: int,
                  max_tokens: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch. max_tokens 0: runs of max_rows consecutive rows, in order.
    Otherwise rows longest first, each micro-batch at most max_rows rows and max_tokens padded
    tokens; a row longer than the budget goes alone."""
    n = len(prompt_lengths)
    if max_tokens <= 0:
        return [list(range(a, min(a + max_rows, n))) for a in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: -(prompt_lengths[i] + response_lengths[i]))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) == max_rows or
                        padded_tokens(prompt_lengths, response_lengths, current + [i]) > max_tokens):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out
