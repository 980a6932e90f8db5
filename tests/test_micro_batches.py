"""Micro-batches by rows or by a padded-token budget (rlsr_ray/contract/micro_batches.py)."""
from __future__ import annotations

import random

from rlsr_ray.contract.micro_batches import micro_batches, padded_tokens


def test_without_a_budget_rows_go_in_order_in_runs_of_micro_batch_size():
    assert micro_batches([5] * 7, [3] * 7, max_rows=3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_budget_packs_longest_first_every_row_once_and_each_batch_within_it():
    rng = random.Random(0)
    prompts = [rng.randint(10, 200) for _ in range(40)]
    answers = [rng.randint(1, 1000) for _ in range(40)]
    groups = micro_batches(prompts, answers, max_rows=8, max_tokens=2048)
    assert sorted(i for g in groups for i in g) == list(range(40))
    for g in groups:
        assert len(g) <= 8
        assert len(g) == 1 or padded_tokens(prompts, answers, g) <= 2048
    totals = [prompts[g[0]] + answers[g[0]] for g in groups]
    assert totals == sorted(totals, reverse=True)  # longest first
    padding = sum(padded_tokens(prompts, answers, g) for g in groups)
    in_order = sum(padded_tokens(prompts, answers, g) for g in micro_batches(prompts, answers, max_rows=2))
    assert padding < in_order  # like lengths together pad less, even with up to 4x the rows


def test_a_row_over_the_budget_goes_alone():
    assert micro_batches([10, 10, 10], [5000, 5, 5], max_rows=8, max_tokens=100) == [[0], [1, 2]]
