"""ROUGE-L and chrF on cases worked out by hand."""
from __future__ import annotations

import pytest

from rlsr_ray.algo.text_metrics import chrf, rouge_l


def test_rouge_l_is_the_f_measure_of_the_longest_common_word_subsequence():
    # LCS "the cat on the mat" = 5 of 6 words on both sides: P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # 2 of 2 output words, 2 of 4 reference words: F = 2PR/(P+R) = 2/3.
    assert rouge_l("red apples", "red and green apples") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l("The cat, sat!", "the cat sat") == 1.0  # lowercased, punctuation dropped
    assert rouge_l("dogs bark", "cats purr") == 0.0
    assert rouge_l("", "cats purr") == 0.0


def test_chrf_averages_character_ngram_precision_and_recall_then_weighs_recall_twice():
    # Output "abcdefg" against "abcdefgh": every output n-gram matches (P_n = 1), the reference has
    # one more of each order, so R_n = (8 - n) / (9 - n) for n = 1..6; F_beta=2 = 5PR / (4P + R).
    r = sum((8 - n) / (9 - n) for n in range(1, 7)) / 6
    assert chrf("abcdefg", "abcdefgh") == pytest.approx(5 * r / (4 + r))
    assert chrf("abc def", "abcdef") == 1.0  # whitespace is not a character it counts
    assert chrf("xyz", "abc") == 0.0
    assert chrf("", "abc") == 0.0
