"""The paper's reward pieces as pure functions: cosine similarity of embeddings and the copy rule.

reward = cos(embed(response), embed(reference)), except that a response sharing a longest common
substring with the reference longer than `min_chars` AND longer than `min_fraction` of the
reference gets `penalty` (-1): this stops the policy from copying or repeating the reference.
The terms built on them, and how they sum into a reward, are in terms.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays -> [N] (float64 math, float32 out)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cosine_rows needs two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.einsum("nd,nd->n", a64, b64)
    den = np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), eps)
    return (num / den).astype(np.float32)


def longest_common_substring(a: str, b: str) -> int:
    """Length of the longest common substring of a and b, in characters.

    A suffix automaton over `b` walked by `a`: O(len(a) + len(b)) time, so 4k-token responses
    against long references stay cheap (the O(n*m) table would take seconds in Python).
    """
    if not a or not b:
        return 0
    # Suffix automaton of b: per state, transitions, suffix link and longest length.
    nxt: list[dict[str, int]] = [{}]
    link = [-1]
    length = [0]
    last = 0
    for ch in b:
        cur = len(nxt)
        nxt.append({})
        length.append(length[last] + 1)
        link.append(0)
        p = last
        while p != -1 and ch not in nxt[p]:
            nxt[p][ch] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][ch]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(nxt)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                while p != -1 and nxt[p].get(ch) == q:
                    nxt[p][ch] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        last = cur
    best = state = cur_len = 0
    for ch in a:
        while state and ch not in nxt[state]:
            state = link[state]
            cur_len = length[state]
        if ch in nxt[state]:
            state = nxt[state][ch]
            cur_len += 1
        else:
            state, cur_len = 0, 0
        best = max(best, cur_len)
    return best


@dataclass(frozen=True)
class PenaltyRule:
    min_chars: int = 100
    min_fraction: float = 0.1
    penalty: float = -1.0

    def applies(self, lcs_chars: int, reference_chars: int) -> bool:
        return lcs_chars > self.min_chars and lcs_chars > self.min_fraction * reference_chars

