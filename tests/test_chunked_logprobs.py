"""Chunked log-probs (algo/chunked_logprobs.py) equal the full computation in value and gradient.

The two differ only in how the head's matmul and logsumexp's sums are blocked, so they agree to
floating-point rounding. The bounds below are derived from the unit roundoff u of the dtype, not
fitted: a logit is a dot product of H terms (error <= H u A, A = max sum_i |h_i| |W_vi|), the
logsumexp a sum of V exponentials (error <= V u) plus a log; each computation is within
e = (2H + V + 2) u (A + L + 1) of the exact log-prob (L = max |logsumexp|), so two of them within 2e.
A gradient is a sum of such terms weighted by p_v (sum 1) or by the upstream coefficients c_n, so
its error is e times that weight's scale, plus the sums' own rounding.
"""
from __future__ import annotations

import pytest
import torch

from rlsr_ray.algo.chunked_logprobs import chunked_token_logprobs
from rlsr_ray.algo.loss import token_logprobs

B, T, H, V = 3, 7, 16, 50


def _case(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    head = torch.nn.Linear(H, V + 3, bias=False).to(dtype)  # 3 padded logits beyond the vocabulary
    with torch.no_grad():
        head.weight.copy_(torch.randn(V + 3, H, generator=g, dtype=dtype))
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    coef = torch.randn(B, T, generator=g, dtype=dtype)  # upstream gradient: a weighted sum of log-probs
    return hidden, head, targets, mask, coef


def _run(hidden, head, targets, mask, coef, temperature, chunk):
    h = hidden.clone().requires_grad_(True)
    head.zero_grad()
    if chunk is None:
        lp = token_logprobs(head(h)[..., :V], targets, temperature).to(h.dtype) * mask
    else:
        lp = chunked_token_logprobs(h, head, targets, mask, temperature, chunk, vocab_size=V).to(h.dtype)
    (lp * coef).sum().backward()
    return lp.detach(), h.grad.clone(), head.weight.grad.clone()


def _bounds(hidden, head, targets, mask, coef, temperature):
    u = torch.finfo(hidden.dtype).eps / 2
    w = head.weight.detach()[:V] / (temperature if temperature not in (0.0, 1.0) else 1.0)
    a = float((hidden.abs() @ w.abs().T).max())
    lse = float(torch.logsumexp(hidden @ w.T, -1).abs().max())
    e = (2 * H + V + 2) * u * (a + lse + 1)
    n = int(mask.sum())
    c = coef.abs() * mask
    value = 2 * e
    grad_h = 2 * (e + (V + 1) * u) * float(c.max()) * 2 * float(w.abs().max())
    grad_w = 2 * (e + (n + V) * u) * 2 * float((c.reshape(-1, 1) * hidden.abs().reshape(-1, H)).sum(0).max())
    return value, grad_h, grad_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 12, 1000])
def test_chunked_logprobs_equal_the_full_computation_in_value_and_gradient(dtype, temperature, chunk):
    case = _case(dtype)
    full = _run(*case, temperature, None)
    ours = _run(*case, temperature, chunk)
    for name, a, b, bound in zip(("value", "grad hidden", "grad head"), full, ours, _bounds(*case, temperature)):
        worst = float((a - b).abs().max())
        assert worst <= bound, (name, worst, bound)
    # Masked positions are exactly zero, and nothing flows back to them.
    assert bool((ours[0][case[3] == 0] == 0).all()) and bool((ours[1][case[3] == 0] == 0).all())


def test_a_chunk_of_every_token_at_once_is_the_same_arithmetic():
    """One chunk of all real tokens is the full path's operations on the same rows: equal bits."""
    hidden, head, targets, mask, coef = _case(torch.float32)
    with torch.no_grad():
        rows = hidden[mask.bool()]
        want = token_logprobs(head(rows)[:, :V], targets[mask.bool()])
        got = chunked_token_logprobs(hidden, head, targets, mask, chunk_tokens=10**6, vocab_size=V)[mask.bool()]
    assert torch.equal(got, want)


def test_no_logits_are_kept_for_backward_beyond_one_chunk():
    """Under grad, the forward keeps only per-token outputs: the tensors saved for backward hold
    no [N, V] logits (checkpointing recomputes them), unlike the full path's."""
    hidden, head, targets, mask, _ = _case(torch.float32)
    h = hidden.clone().requires_grad_(True)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logprobs(h, head, targets, mask, chunk_tokens=4, vocab_size=V)
    assert saved and all(V not in s and V + 3 not in s for s in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(head(h)[..., :V], targets)
    assert any(V in s or V + 3 in s for s in saved)


def test_chunk_tokens_must_be_positive():
    hidden, head, targets, mask, _ = _case(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_token_logprobs(hidden, head, targets, mask, chunk_tokens=0)
