import pytest
import torch

from rlsr_ray.algo.loss import (LossSettings, aggregate, clipped_pg_per_token, kl_per_token, rlsr_loss, sft_loss,
                           token_logprobs)


def _dists(seed: int, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 2, -1)
    return p, q


@pytest.mark.parametrize("seed", range(5))
def test_kl_estimators_match_closed_forms(seed):
    """Exact expectations over the support of p, against KL(p||q) = sum p log(p/q)."""
    p, q = _dists(seed)
    kl = torch.sum(p * (p.log() - q.log()))
    e = {k: torch.sum(p * kl_per_token(p.log(), q.log(), k)) for k in ("k1", "k2", "k3")}
    assert e["k1"].item() == pytest.approx(kl.item(), rel=1e-10)  # unbiased
    assert e["k3"].item() == pytest.approx(kl.item(), rel=1e-10)  # unbiased
    log_r = p.log() - q.log()
    assert e["k2"].item() == pytest.approx(torch.sum(p * 0.5 * log_r**2).item(), rel=1e-10)
    assert torch.all(kl_per_token(p.log(), q.log(), "k3") >= 0)  # k3 never negative


def test_kl_zero_when_policies_equal():
    lp = torch.log_softmax(torch.randn(3, 5), -1)
    for k in ("k1", "k2", "k3"):
        assert torch.all(kl_per_token(lp, lp, k) == 0)


def test_clipping_only_limits_in_advantage_direction():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))  # ratios 0.5, 1.0, 1.5
    loss, clipped = clipped_pg_per_token(logp, old, torch.tensor([1.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.2]]))
    assert clipped.tolist() == [[0.0, 0.0, 1.0]]
    loss, clipped = clipped_pg_per_token(logp, old, torch.tensor([-1.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.8, 1.0, 1.5]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]


class TinyPolicy(torch.nn.Module):
    def __init__(self, v=13, t=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(v, 8)
        self.out = torch.nn.Linear(8, v)

    def forward(self, ids):
        return self.out(self.emb(ids))


def _batch(b=8, t=6, v=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    old = torch.randn(b, t, generator=g) * 0.1 - 2.5
    ref = torch.randn(b, t, generator=g) * 0.1 - 2.5
    adv = torch.randn(b, generator=g)
    return ids, mask, old, ref, adv


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("micro", [1, 3, 8])
def test_loss_gradient_invariant_to_micro_batching(aggregation, micro):
    ids, mask, old, ref, adv = _batch()
    settings = LossSettings(clip_eps=0.2, kl_coef=0.1, kl_estimator="k3", aggregation=aggregation)
    norm = float(mask.sum()) if aggregation == "token_mean" else float(len(ids))

    def grads(chunk):
        model = TinyPolicy()
        for s in range(0, len(ids), chunk):
            sl = slice(s, s + chunk)
            logp = token_logprobs(model(ids[sl]), ids[sl]) * mask[sl]
            loss, _ = rlsr_loss(logp, old[sl], ref[sl], adv[sl], mask[sl], settings, norm)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for g_full, g_micro in zip(grads(len(ids)), grads(micro)):
        torch.testing.assert_close(g_full, g_micro, rtol=1e-5, atol=1e-7)


def test_aggregate_means():
    v = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(v, m, "token_mean", 3.0).item() == pytest.approx(2.0)
    assert aggregate(v, m, "seq_mean", 2.0).item() == pytest.approx((2.0 + 2.0) / 2)


def test_token_logprobs_temperature():
    logits = torch.randn(2, 4, 7)
    tgt = torch.randint(0, 7, (2, 4))
    expect = torch.gather(torch.log_softmax(logits / 0.7, -1), -1, tgt[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tgt, 0.7), expect)


def test_sft_loss_is_the_summed_response_nll_over_the_normaliser():
    logp = torch.tensor([[-0.5, -1.0, -7.0], [-2.0, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # padding carries -7 and -9: never counted
    loss, stats = sft_loss(logp, mask, normaliser=6.0)
    assert loss.item() == pytest.approx(3.5 / 6.0)
    assert stats == {"tokens": 3.0, "nll_sum": pytest.approx(3.5)}
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 6, -1 / 6, 0.0], [-1 / 6, 0.0, 0.0]]))
