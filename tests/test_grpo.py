import numpy as np
import pytest

from rlsr_ray.algo.grpo import group_advantages


def test_zero_variance_group_gives_exact_zero():
    adv = group_advantages(np.array([0.5, 0.5, 0.5, 0.1, 0.9]), np.array([1, 1, 1, 2, 2]))
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert np.all(np.isfinite(adv))
    assert adv[3] < 0 < adv[4]


def test_group_of_one_gives_zero():
    adv = group_advantages(np.array([0.3, 0.2, 0.8]), np.array([7, 8, 8]))
    assert adv[0] == 0.0
    assert np.all(np.isfinite(adv))


def test_centered_and_std_normalised_per_group():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=32)
    groups = np.repeat(np.arange(4), 8)
    adv = group_advantages(rewards, groups, std_norm=True)
    for g in range(4):
        a = adv[groups == g]
        assert abs(a.mean()) < 1e-5
        assert a.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
    plain = group_advantages(rewards, groups, std_norm=False)
    for g in range(4):
        np.testing.assert_allclose(plain[groups == g], rewards[groups == g] - rewards[groups == g].mean(), atol=1e-6)


def test_interleaved_group_ids():
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), np.array([3, 5, 3, 5]), std_norm=False)
    np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5])


def test_rejects_nan_rewards():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(np.array([0.1, np.nan]), np.array([0, 0]))
