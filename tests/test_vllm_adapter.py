"""The vLLM backend's adapter logic, driven by STAND-IN objects shaped like vLLM's outputs.

vLLM has no CPU build, so the engine itself cannot run here; these tests cover what rlsr_ray adds
around it without the vllm wheel: the SamplingParams arguments and the conversion of
RequestOutputs into samples. tests/test_vllm_api.py checks the same against vLLM's own classes.
"""
from dataclasses import dataclass

import pytest

from actors.sampling import SamplingSpec
from actors.vllm_backend import engine_kwargs, sampling_kwargs, to_samples


@dataclass
class StandInLogprob:  # mirrors vllm.sequence.Logprob
    logprob: float


@dataclass
class StandInCompletion:  # mirrors vllm.outputs.CompletionOutput
    token_ids: list
    logprobs: list
    finish_reason: str


@dataclass
class StandInRequestOutput:  # mirrors vllm.outputs.RequestOutput
    outputs: list


def test_sampling_kwargs_sampled_and_greedy():
    kw = sampling_kwargs(SamplingSpec(n=8, max_new_tokens=100, temperature=0.9, top_p=0.95, seed=7), seed=99)
    assert kw == dict(n=8, max_tokens=100, logprobs=0, temperature=0.9, top_p=0.95, seed=99)
    greedy = sampling_kwargs(SamplingSpec(n=1, max_new_tokens=5, temperature=0.0, top_p=0.5, seed=0), seed=99)
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy and "seed" not in greedy


def test_to_samples_picks_sampled_token_logprob_and_cuts_at_eos():
    eos = 2
    steps = [{5: StandInLogprob(-0.5)}, {9: StandInLogprob(-1.5), 4: StandInLogprob(-0.1)}, {eos: StandInLogprob(-0.05)}]
    comp_stop = StandInCompletion([5, 9, eos], steps, "stop")
    comp_len = StandInCompletion([7, 7], [{7: StandInLogprob(-0.2)}, {7: StandInLogprob(-0.3)}], "length")
    s = to_samples(StandInRequestOutput([comp_stop, comp_len]), {eos})
    assert s[0].response_ids == [5, 9, eos] and s[0].logprobs == [-0.5, -1.5, -0.05] and s[0].finish_reason == "stop"
    assert s[1].response_ids == [7, 7] and s[1].finish_reason == "length"


def test_to_samples_stop_without_echoed_eos_is_still_stop():
    comp = StandInCompletion([5], [{5: StandInLogprob(-0.5)}], "stop")
    assert to_samples(StandInRequestOutput([comp]), {2})[0].finish_reason == "stop"


def test_to_samples_requires_logprobs():
    with pytest.raises(ValueError, match="logprobs=0"):
        to_samples(StandInRequestOutput([StandInCompletion([5], None, "stop")]), {2})


def test_engine_kwargs_seed_once_neutral_defaults_one_logprob():
    kw = engine_kwargs("/m", "bfloat16", 0.8, seed=5)
    assert kw["seed"] == 5 and kw["max_logprobs"] == 1 and kw["generation_config"] == "vllm"
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["dtype"] == "bfloat16"


@pytest.mark.parametrize("reason", ["abort", "error", None])
def test_to_samples_refuses_aborted_or_failed_requests(reason):
    comp = StandInCompletion([5, 6], [{5: StandInLogprob(-0.5)}, {6: StandInLogprob(-0.5)}], reason)
    with pytest.raises(RuntimeError, match=f"finish_reason {reason!r}"):
        to_samples(StandInRequestOutput([comp]), {2})


def test_sampling_kwargs_mask_the_padded_logits_of_a_model_by_limit_not_by_whitelist():
    spec = SamplingSpec(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    assert "extra_args" not in sampling_kwargs(spec)
    kw = sampling_kwargs(spec, token_limit=151_665)
    assert kw["extra_args"] == {"rlsr_token_limit": 151_665} and "allowed_token_ids" not in kw
    assert "logits_processors" not in engine_kwargs("/m", "bfloat16", 0.8, seed=5)
    assert engine_kwargs("/m", "bfloat16", 0.8, seed=5, mask_padded_vocab=True)["logits_processors"] == [
        "actors.vllm_logits:TokenizerVocabMask"]
