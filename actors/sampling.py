"""What a rollout backend is asked for and what it gives back, independent of the engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class SamplingSpec:
    n: int  # samples per prompt (GRPO group size)
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int  # per call, so a step's samples are reproducible


@dataclass
class Sample:
    response_ids: list[int]  # generated tokens, EOS included when produced
    logprobs: list[float]  # log pi(token) at the sampling temperature (1.0 when greedy)
    finish_reason: str  # "stop" or "length"


class RolloutBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 keys: Sequence[int] | None = None) -> list[list[Sample]]:
        """One list of `spec.n` samples per prompt, in prompt order. `keys` (one int per prompt,
        the group ids) let a backend seed each prompt on its own, so a prompt's samples do not
        depend on which actor drew it or what else was in its batch (both backends do)."""

    def load_weights(self, state_dict: dict) -> None:
        """The whole state dict, through Ray's object store (first sync, fallback)."""

    # The weight route (rlsr_ray/modeling/weight_group.py): this backend's end of the group, where the model is.
    weight_dtype: str  # what the model's weights are held in, hence what travels

    def join_route(self, address: str, rank: int, settings: Any, specs: list) -> None: ...

    def in_route(self) -> bool: ...

    def receive_weights(self) -> None:
        """Receive one broadcast of every spec and load it; raises if the route tore."""

    def close_route(self) -> None: ...


def cut_at_eos(tokens: Sequence[int], logprobs: Sequence[float], eos_ids: set[int]) -> Sample:
    """Keep tokens up to and including the first EOS; what follows is engine padding."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return Sample(list(tokens[: i + 1]), list(logprobs[: i + 1]), "stop")
    return Sample(list(tokens), list(logprobs), "length")


def mixed_seed(*parts: int) -> int:
    """A 62-bit seed from several ints (run seed, rank, step seed, group id), well spread so that
    nearby inputs give unrelated streams. Below 2**62: vLLM stores seeds as int64 and gives the
    i-th of a request's n samples seed + i."""
    import numpy as np

    return int(np.random.SeedSequence([p & (2**63 - 1) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(2))
