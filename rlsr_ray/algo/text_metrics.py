"""Reference-based text metrics as pure functions over strings, in [0, 1].

RLSR trains on embedding similarity, so a model can gain on it by sharpening or by changing its
length without answering better. ROUGE-L (longest common subsequence of words) and chrF
(character n-gram F-score) measure closeness to the reference on another axis: the evaluation
reports both, and ROUGE-L is also a reward term (rlsr_ray.algo.terms) for runs that want it.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # character 6-grams, beta 2: sacrebleu's standard chrF


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's tokenizer: lowercased alphanumeric words)."""
    return float(_rouge().score(reference, output)["rougeL"].fmeasure)


def chrf(output: str, reference: str) -> float:
    """Sentence chrF from sacrebleu, scaled from its 0-100 to 0-1."""
    return float(_chrf().sentence_score(output, [reference]).score) / 100.0
