"""Reward terms: the reward as a weighted sum of named terms, each scoring a batch of rows.

A term is called as `term(prompts, responses, references, **columns)` with one list entry per
row and returns one float per row. `columns` holds `response_tokens` (generated tokens),
`finish_reason` ("stop" or "length") and every other field of the data row the prompt came from
(None where a row lacks it). Built in:

  similarity    cosine of sentence-transformers embeddings of response and reference (the paper)
  copy_penalty  1 where the response copies the reference (the paper's LCS rule), else 0; where it
                is 1 the reward is algo.lcs_penalty, whatever the other terms sum to
  length        DAPO's soft overlong penalty: 0 up to max_new_tokens - buffer_tokens, then
                falling linearly to -1 at max_new_tokens
  rouge_l       ROUGE-L F-measure of response against reference

A user's term is "module:function", or "module:Class" whose instance (built once per reward
actor with `args`, so it can hold a model) is the callable. Terms are built where the rows are
scored: in the reward actors, or the reward service's replicas.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rlsr_ray.algo.reward import PenaltyRule, cosine_rows, longest_common_substring


class RewardTermError(ValueError):
    """A reward term that cannot be loaded or returned what no reward can be; names the term."""


@dataclass(frozen=True)
class TermSpec:
    """One term, resolved from the config: what a reward actor needs to build it."""
    name: str  # its REWARDS column
    fn: str  # a built-in's name or module:attribute
    weight: float
    args: dict[str, Any] = field(default_factory=dict)  # constructor keywords (built-ins: their settings)

    @property
    def label(self) -> str:
        return f"reward term {self.name!r}" + (f" ({self.fn})" if self.fn != self.name else "")


class Similarity:
    """Cosine of response and reference embeddings under one sentence-transformers model."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model, device=device)
        self.batch_size = batch_size
        self._ref_cache: dict[str, np.ndarray] = {}  # references repeat n times per step and every epoch

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)

    def _reference_embeddings(self, refs: list[str]) -> np.ndarray:
        new = sorted({r for r in refs if r not in self._ref_cache})
        if new:
            self._ref_cache.update(zip(new, self._embed(new)))
        return np.stack([self._ref_cache[r] for r in refs])

    def __call__(self, prompts, responses, references, **columns) -> np.ndarray:
        if not responses:
            return np.zeros(0, np.float32)
        return cosine_rows(self._embed(list(responses)), self._reference_embeddings(list(references)))


class CopyPenalty:
    """1.0 where the response shares too long a substring with the reference, else 0.0."""

    def __init__(self, min_chars: int = 100, min_fraction: float = 0.1, penalty: float = -1.0):
        self.rule = PenaltyRule(min_chars, min_fraction, penalty)
        self.replaces_sum_with = penalty

    def __call__(self, prompts, responses, references, **columns) -> np.ndarray:
        return np.array([float(self.rule.applies(longest_common_substring(r, ref), len(ref)))
                         for r, ref in zip(responses, references)], np.float32)


class Length:
    """DAPO's soft overlong punishment, from each response's token count."""

    def __init__(self, max_tokens: int, buffer_tokens: int | None = None):
        self.max_tokens = max_tokens
        self.buffer_tokens = max(1, max_tokens // 5) if buffer_tokens is None else buffer_tokens
        if not 1 <= self.buffer_tokens <= max_tokens:
            raise RewardTermError(f"buffer_tokens={self.buffer_tokens} must be in [1, {max_tokens}] "
                                  "(rollout.max_new_tokens)")

    def __call__(self, prompts, responses, references, *, response_tokens, **columns) -> np.ndarray:
        n = np.asarray(response_tokens, np.float64)
        free = self.max_tokens - self.buffer_tokens
        return np.clip((free - n) / self.buffer_tokens, -1.0, 0.0)


def rouge_l(prompts, responses, references, **columns) -> list[float]:
    from rlsr_ray.algo.text_metrics import rouge_l as score

    return [score(r, ref) for r, ref in zip(responses, references)]


BUILTINS: dict[str, Callable] = {"similarity": Similarity, "copy_penalty": CopyPenalty, "length": Length,
                                 "rouge_l": rouge_l}


def specs(cfg, resolve_model: Callable[[str], str] = lambda m: m) -> list[TermSpec]:
    """The config's terms with their settings filled in: a similarity term's model resolved,
    copy_penalty's rule from algo.lcs_*, length's limit from rollout.max_new_tokens."""
    out = []
    for t in cfg.reward.terms:
        fn, args = t.fn or t.name, dict(t.args)
        if fn == "similarity":
            args["model"] = resolve_model(t.model or cfg.model.reward_model)
        elif fn == "copy_penalty":
            a = cfg.algo
            args = dict(min_chars=a.lcs_min_chars, min_fraction=a.lcs_min_fraction, penalty=a.lcs_penalty, **args)
        elif fn == "length":
            args.setdefault("max_tokens", cfg.rollout.max_new_tokens)
        out.append(TermSpec(t.name, fn, t.weight, args))
    return out


def paper(model: str, rule: PenaltyRule = PenaltyRule()) -> list[TermSpec]:
    """The paper's RLSR reward as terms: similarity under `model`, replaced by `rule`'s penalty."""
    return [TermSpec("similarity", "similarity", 1.0, {"model": model}),
            TermSpec("copy_penalty", "copy_penalty", 1.0,
                     dict(min_chars=rule.min_chars, min_fraction=rule.min_fraction, penalty=rule.penalty))]


def _takes_rows(f: Callable, skip_first: bool = False) -> str | None:
    """Why f cannot be called as f(prompts, responses, references, **columns), or None."""
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a C function): called as it is
        return None
    params = params[1:] if skip_first else params
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == kinds.VAR_POSITIONAL for p in params):
        return "takes fewer than three positional arguments (prompts, responses, references)"
    if not any(p.kind == kinds.VAR_KEYWORD for p in params):
        return "has no **columns parameter (the rows' other columns are passed by name)"
    required = [p.name for p in positional[3:] if p.default is kinds.empty]
    required += [p.name for p in params if p.kind == kinds.KEYWORD_ONLY and p.default is kinds.empty
                 and p.name not in ("response_tokens", "finish_reason")]
    if required:
        return f"requires {required}, which no row column provides"
    return None


def _user_target(spec: TermSpec) -> Any:
    module_name, _, attr = spec.fn.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as e:  # an import error, or the module's own failure while importing
        raise RewardTermError(f"{spec.label}: cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RewardTermError(f"{spec.label}: module {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    return target


def check(spec: TermSpec) -> None:
    """Import a user's term and check its signature (and a class's constructor against args),
    without building it: run before anything starts, so a bad term stops the command at once."""
    if spec.fn in BUILTINS:
        made = BUILTINS[spec.fn]
        if not inspect.isclass(made) and spec.args:
            raise RewardTermError(f"{spec.label}: {spec.fn} takes no args, got {spec.args}")
        try:
            inspect.signature(made).bind(**spec.args)
        except TypeError as e:
            raise RewardTermError(f"{spec.label}: args {spec.args} do not fit {spec.fn}: {e}") from None
        if made is Length:
            try:
                Length(**spec.args)  # its range check, before anything starts
            except RewardTermError as e:
                raise RewardTermError(f"{spec.label}: {e}") from None
        return
    target = _user_target(spec)
    if inspect.isclass(target):
        try:
            inspect.signature(target).bind(**spec.args)
        except TypeError as e:
            raise RewardTermError(f"{spec.label}: args {spec.args} do not fit {target.__name__}(): {e}") from None
        if any("__call__" in vars(k) for k in target.__mro__[:-1]):
            why = _takes_rows(target.__call__, skip_first=True)
        else:
            why = "is a class whose instances are not callable (define __call__)"
    elif callable(target):
        why = _takes_rows(target)
    else:
        why = f"is a {type(target).__name__}, not a function or class"
    if why:
        raise RewardTermError(f"{spec.label}: {spec.fn} {why}")


def build(spec: TermSpec, device: str = "cpu") -> Callable:
    """The callable that scores rows for one term."""
    if spec.fn == "similarity":
        return Similarity(device=device, **spec.args)
    if spec.fn in BUILTINS:
        made = BUILTINS[spec.fn]
        return made(**spec.args) if inspect.isclass(made) else made
    check(spec)
    target = _user_target(spec)
    if inspect.isclass(target):
        return target(**spec.args)
    if spec.args:
        import functools

        return functools.partial(target, **spec.args)
    return target


def values(spec: TermSpec, term: Callable, prompts: Sequence[str], responses: Sequence[str],
           references: Sequence[str], columns: dict[str, list]) -> np.ndarray:
    """One term's values for the rows, as float64 [N]; a wrong shape or type stops with its name.
    Non-finite values are kept: the driver skips such a step and says which column held them."""
    n = len(responses)
    try:
        out = np.asarray(term(list(prompts), list(responses), list(references), **columns), dtype=np.float64)
    except RewardTermError:
        raise
    except Exception as e:  # the term's own failure, or a result that is not numbers
        raise RewardTermError(f"{spec.label}: {type(e).__name__}: {e}") from e
    if out.shape != (n,):
        raise RewardTermError(f"{spec.label}: returned {out.shape[0] if out.ndim == 1 else out.shape} "
                              f"value(s) for {n} row(s); it must return one float per row")
    return out


def combine(specs_: Sequence[TermSpec], terms: Sequence[Callable], scores: dict[str, np.ndarray]) -> np.ndarray:
    """reward [N] float32: the weighted sum of the terms, then a copy penalty's value where it applies."""
    summed = None
    for spec, term in zip(specs_, terms):
        if hasattr(term, "replaces_sum_with"):
            continue
        part = spec.weight * scores[spec.name]
        summed = part if summed is None else summed + part
    reward = summed.astype(np.float32)
    for spec, term in zip(specs_, terms):
        if hasattr(term, "replaces_sum_with"):
            reward = np.where(scores[spec.name] != 0, np.float32(term.replaces_sum_with), reward)
    return reward.astype(np.float32)


def score(specs_: Sequence[TermSpec], terms: Sequence[Callable], prompts: Sequence[str], responses: Sequence[str],
          references: Sequence[str], columns: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(reward [N] float32, {term name: values [N] float64}) of the rows."""
    scores = {s.name: values(s, t, prompts, responses, references, columns) for s, t in zip(specs_, terms)}
    return combine(specs_, terms, scores), scores

