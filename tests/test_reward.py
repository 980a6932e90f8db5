import random

import numpy as np
import pytest
import torch

from rlsr_ray.algo import terms as T
from rlsr_ray.algo.reward import PenaltyRule, cosine_rows, longest_common_substring


def lcs_table(a: str, b: str) -> int:
    """The textbook O(n*m) dynamic programme, as the oracle."""
    best, prev = 0, [0] * (len(b) + 1)
    for ca in a:
        cur = [0] * (len(b) + 1)
        for j, cb in enumerate(b, 1):
            if ca == cb:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def test_lcs_matches_dynamic_programme_on_random_strings():
    rng = random.Random(0)
    for _ in range(400):
        alphabet = "ab" if rng.random() < 0.5 else "abcde "
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert longest_common_substring(a, b) == lcs_table(a, b), (a, b)


def test_lcs_known_cases():
    assert longest_common_substring("", "abc") == 0
    assert longest_common_substring("xyz", "abc") == 0
    assert longest_common_substring("the cat sat", "a cat sat down") == len(" cat sat")
    ref = "The quick brown fox jumps over the lazy dog. " * 3
    assert longest_common_substring("prefix " + ref + " suffix", ref) == len(ref)


def test_penalty_needs_both_thresholds():
    rule = PenaltyRule(min_chars=100, min_fraction=0.1, penalty=-1.0)
    assert not rule.applies(100, 50)  # not longer than 100 chars
    assert rule.applies(101, 50)
    assert not rule.applies(150, 2000)  # 150 <= 10% of 2000
    assert rule.applies(201, 2000)


def test_copy_penalty_replaces_the_sum_for_copies_only():
    ref = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in green plants. " * 2
    responses = ["Plants make sugar from light.", "Sure! " + ref]
    copy = T.CopyPenalty()
    specs = [T.TermSpec("similarity", "similarity", 1.0), T.TermSpec("copy_penalty", "copy_penalty", 1.0)]
    sim = np.array([0.7, 0.95], np.float32)
    scores = {"similarity": sim.astype(np.float64),
              "copy_penalty": T.values(specs[1], copy, ["q"] * 2, responses, [ref, ref], {})}
    assert scores["copy_penalty"].tolist() == [0.0, 1.0]
    reward = T.combine(specs, [lambda *a, **k: None, copy], scores)
    assert reward.dtype == np.float32 and reward[0] == sim[0] and reward[1] == -1.0


def test_cosine_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer, util

    model = SentenceTransformer(minilm_path, device="cpu")
    a = model.encode(["The sky is blue because of scattering.", "Paris is the capital of France.",
                      "I like turtles."], convert_to_numpy=True)
    b = model.encode(["Rayleigh scattering makes the sky look blue.", "France's capital city is Paris.",
                      "Quantum chromodynamics is hard."], convert_to_numpy=True)
    ours = cosine_rows(a, b)
    theirs = torch.diagonal(util.cos_sim(torch.from_numpy(a), torch.from_numpy(b))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert ours[0] > ours[2] and ours[1] > ours[2]  # real embeddings rank paraphrases above noise


def test_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        cosine_rows(np.ones((2, 3)), np.ones((3, 3)))
