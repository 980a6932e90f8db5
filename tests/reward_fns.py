"""Reward terms as a user writes them (docs/rewards.md), loaded by tests as
"reward_fns:NAME" with tests/ on the path."""
import math


def brevity(prompts, responses, references, **columns):
    """Shorter than the reference scores higher: 1 - len(response) / len(reference), floored at -1."""
    return [max(-1.0, 1.0 - len(r) / max(1, len(ref))) for r, ref in zip(responses, references)]


def echo_columns(prompts, responses, references, *, response_tokens, **columns):
    """Reads what the rows carry: the data row's `score` field, else the response's token count."""
    seen.append({"prompts": list(prompts), "response_tokens": list(response_tokens), **columns})
    return [float(s) if s is not None else float(n) for s, n in zip(columns.get("score", [None] * len(prompts)),
                                                                   response_tokens)]


seen: list[dict] = []


class KeywordHits:
    """A class term: built once per reward actor with its args (here a word list, elsewhere a model)."""
    built = 0

    def __init__(self, words=("water",)):
        KeywordHits.built += 1
        self.words = [w.lower() for w in words]

    def __call__(self, prompts, responses, references, **columns):
        return [float(sum(w in r.lower() for w in self.words)) for r in responses]


def no_columns(prompts, responses, references):
    return [0.0] * len(responses)


def one_short(prompts, responses, references, **columns):
    return [0.0] * (len(responses) - 1)


def not_finite(prompts, responses, references, **columns):
    return [math.nan] + [0.0] * (len(responses) - 1)


def raises(prompts, responses, references, **columns):
    raise KeyError("label")


NOT_A_FUNCTION = 3


class NotCallable:
    pass
