"""Group-relative advantages (GRPO), pure numpy.

Each prompt's samples form a group; a sample's advantage is its reward minus the group mean,
optionally divided by the group standard deviation. Groups of one and groups whose rewards are all
equal carry no ranking signal: their advantage is exactly zero, never NaN.
"""
from __future__ import annotations

import numpy as np


def group_advantages(
    rewards: np.ndarray, group_ids: np.ndarray, std_norm: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """rewards [N] float, group_ids [N] int -> advantages [N] float32."""
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must be 1-D of one length")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards contain NaN or inf")
    _, inverse, counts = np.unique(group_ids, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=rewards)
    means = sums / counts
    centered = rewards - means[inverse]
    adv = centered
    if std_norm:
        # Sample std (ddof=1), as in the GRPO paper; groups of one have no spread.
        sq = np.bincount(inverse, weights=centered**2)
        std = np.sqrt(sq / np.maximum(counts - 1, 1))
        adv = centered / (std[inverse] + eps)
    # Exactly zero where there is no signal, so float noise never becomes a gradient.
    flat = (counts[inverse] == 1) | _all_equal(rewards, inverse)
    adv = np.where(flat, 0.0, adv)
    return adv.astype(np.float32)


def _group_range(rewards: np.ndarray, inverse: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (inverse[i] = sample i's group): the lowest and highest reward."""
    lo = np.full(groups, np.inf)
    hi = np.full(groups, -np.inf)
    np.minimum.at(lo, inverse, rewards)
    np.maximum.at(hi, inverse, rewards)
    return lo, hi


def _all_equal(rewards: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Per sample: is every reward in its group the same?"""
    lo, hi = _group_range(rewards, inverse, inverse.max() + 1 if len(inverse) else 0)
    return (hi - lo == 0)[inverse]


def informative_groups(rewards: np.ndarray, group_ids: np.ndarray, rtol: float) -> np.ndarray:
    """Per group (in order of first appearance): does its reward spread carry signal?

    Cosine rewards almost never tie exactly, so `_all_equal` rarely fires; a group whose spread
    (max - min) is within `rtol` of its largest |reward| is noise that std-normalisation would
    blow up to unit-size advantages. Groups of one never carry signal. rtol=0 keeps every group
    with any spread at all.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    ids, first, inverse, counts = np.unique(np.asarray(group_ids), return_index=True, return_inverse=True,
                                            return_counts=True)
    lo, hi = _group_range(rewards, inverse, len(ids))
    scale = np.maximum(np.abs(lo), np.abs(hi))
    keep = (counts > 1) & (hi - lo > rtol * scale)
    return keep[np.argsort(first)]
