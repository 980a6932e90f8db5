"""Reward terms (rlsr_ray/algo/terms.py): the default is the paper's reward to the bit, built-ins
and user terms sum with their weights, and every bad term stops with one line naming it."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.reward import RewardActor
from rlsr_ray.contract import batch
from rlsr_ray.algo import terms as T
from rlsr_ray.algo.reward import PenaltyRule, cosine_rows, longest_common_substring
from rlsr_ray.config import load_config
from rlsr_ray.modeling.models import resolve_reward_terms

sys.path.insert(0, str(Path(__file__).parent))  # reward_fns, as a user's module on the path
import reward_fns  # noqa: E402

REF = "Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit. " * 2
RESPONSES = ["It boils at 100 C.", "Bananas are yellow.", "Sure: " + REF, "water, water everywhere"]


def rollouts(responses=RESPONSES, extras=None) -> pa.Table:
    n = len(responses)
    return pa.Table.from_pydict({
        "group_id": [0] * n, "sample_idx": list(range(n)), "prompt_ids": [[1]] * n, "reference_text": [REF] * n,
        "prompt_text": ["When does water boil?"] * n, "data_json": extras or ["{}"] * n,
        "response_ids": [[5] * (k + 1) for k in range(n)], "response_text": responses,
        "rollout_logprobs": [[-1.0] * (k + 1) for k in range(n)], "finish_reason": ["stop"] * n,
        "policy_version": [0] * n}, schema=batch.ROLLOUTS)


def terms_of(override: str, minilm_path: str | None = None) -> list[T.TermSpec]:
    cfg = load_config("tiny", [f"--reward.terms={override}"])
    return T.specs(cfg, lambda m: minilm_path or m)


@pytest.fixture(scope="module")
def paper_actor(minilm_path):
    return RewardActor(resolve_reward_terms(load_config("tiny")))


def test_the_default_is_the_papers_reward_bit_for_bit(paper_actor, minilm_path):
    """reward = cos(MiniLM(response), MiniLM(reference)), or -1 where the LCS rule holds: written out
    here from its parts, with a model of this test's own."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path, device="cpu")
    sim = cosine_rows(model.encode(RESPONSES, batch_size=64, convert_to_numpy=True),
                      model.encode([REF] * len(RESPONSES), batch_size=64, convert_to_numpy=True))
    copied = np.array([PenaltyRule().applies(longest_common_substring(r, REF), len(REF)) for r in RESPONSES])
    want = np.where(copied, np.float32(-1.0), sim.astype(np.float32))
    out = paper_actor.score(rollouts())
    assert out.column_names == ["group_id", "sample_idx", "reward", "similarity", "copy_penalty"]
    assert out.column("reward").to_numpy().tobytes() == want.tobytes()
    assert out.column("copy_penalty").to_pylist() == [0.0, 0.0, 1.0, 0.0]


def test_weighted_terms_sum_and_two_embedding_terms(minilm_path):
    """Two similarity terms (the paper's SB + Qwen set-up; here MiniLM twice) with weights, plus
    built-in and user terms: the reward is their weighted sum, each kept as its own column."""
    specs = terms_of('[{name: sb, fn: similarity, weight: 0.5}, {name: second, fn: similarity, weight: 0.5}, '
                     '{name: rouge_l, weight: 0.2}, {name: length, weight: 1.0, args: {buffer_tokens: 2}}, '
                     '{name: brevity, fn: "reward_fns:brevity", weight: 0.1}, {name: copy_penalty}]', minilm_path)
    out = RewardActor(specs).score(rollouts()).to_pydict()
    for k in range(len(RESPONSES)):
        if out["copy_penalty"][k]:
            assert out["reward"][k] == -1.0
            continue
        total = (0.5 * out["sb"][k] + 0.5 * out["second"][k] + 0.2 * out["rouge_l"][k] + out["length"][k]
                 + 0.1 * out["brevity"][k])
        assert out["reward"][k] == pytest.approx(total, abs=1e-6)
    assert out["sb"] == out["second"]
    # length: max_new_tokens 8 (tiny), buffer 2: free up to 6 tokens; responses are 1..4 tokens.
    assert out["length"] == [0.0] * 4
    from rlsr_ray.algo.text_metrics import rouge_l

    assert out["rouge_l"] == pytest.approx([rouge_l(r, REF) for r in RESPONSES], abs=1e-6)


def test_length_is_dapos_soft_overlong_penalty():
    term = T.Length(max_tokens=10, buffer_tokens=4)
    got = term([], [], [], response_tokens=[0, 6, 7, 8, 10])
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    with pytest.raises(T.RewardTermError, match="buffer_tokens=11"):
        T.Length(max_tokens=10, buffer_tokens=11)


def test_a_user_term_reads_the_data_rows_fields_and_token_counts():
    specs = [T.TermSpec("echo", "reward_fns:echo_columns", 1.0)]
    extras = [json.dumps({"score": 0.25, "topic": "physics"}), "{}", json.dumps({"topic": "food"}), "{}"]
    reward_fns.seen.clear()
    out = RewardActor(specs).score(rollouts(extras=extras))
    # score where the row has one, else the response's token count (1..4)
    assert out.column("echo").to_pylist() == [0.25, 2.0, 3.0, 4.0]
    seen = reward_fns.seen[-1]
    assert seen["topic"] == ["physics", None, "food", None]
    assert seen["finish_reason"] == ["stop"] * 4 and seen["prompts"] == ["When does water boil?"] * 4


def test_a_class_term_is_built_once_per_actor_with_its_args():
    before = reward_fns.KeywordHits.built
    actor = RewardActor([T.TermSpec("hits", "reward_fns:KeywordHits", 1.0, {"words": ["water", "boil"]})])
    for _ in range(3):
        out = actor.score(rollouts())
    assert reward_fns.KeywordHits.built == before + 1
    assert out.column("hits").to_pylist() == [1.0, 0.0, 2.0, 1.0]


@pytest.mark.parametrize("term, message", [
    ('{name: x, fn: "no_such_module_here:f"}',
     "reward term 'x' \\(no_such_module_here:f\\): cannot import 'no_such_module_here'"),
    ('{name: x, fn: "reward_fns:missing"}', "module 'reward_fns' has no 'missing'"),
    ('{name: x, fn: "reward_fns:no_columns"}', "has no \\*\\*columns parameter"),
    ('{name: x, fn: "reward_fns:NOT_A_FUNCTION"}', "is a int, not a function or class"),
    ('{name: x, fn: "reward_fns:NotCallable"}', "instances are not callable"),
    ('{name: x, fn: "reward_fns:KeywordHits", args: {colour: red}}', "do not fit KeywordHits\\(\\)"),
    ('{name: x, fn: length, args: {buffer: 3}}', "do not fit length: got an unexpected keyword argument 'buffer'"),
    ('{name: x, fn: length, args: {buffer_tokens: 9}}', "buffer_tokens=9 must be in \\[1, 8\\]"),
    ('{name: x, fn: rouge_l, args: {n: 2}}', "rouge_l takes no args"),
])
def test_a_bad_term_stops_at_load_naming_it(term, message):
    cfg = load_config("tiny", [f"--reward.terms=[{{name: similarity}}, {term}]"])
    with pytest.raises(T.RewardTermError, match=message) as e:
        resolve_reward_terms(cfg)
    assert "\n" not in str(e.value) and "reward term 'x'" in str(e.value)


@pytest.mark.parametrize("fn, message", [
    ("one_short", "reward term 'x' \\(reward_fns:one_short\\): returned 3 value\\(s\\) for 4 row\\(s\\)"),
    ("raises", "reward term 'x' \\(reward_fns:raises\\): KeyError: 'label'"),
])
def test_a_term_that_returns_what_no_reward_can_be_stops_naming_it(fn, message):
    with pytest.raises(T.RewardTermError, match=message):
        RewardActor([T.TermSpec("x", f"reward_fns:{fn}", 1.0)]).score(rollouts())


def test_a_non_finite_term_value_skips_the_step_naming_its_column():
    from rlsr_ray.driver.pipeline import nonfinite_reason

    out = RewardActor([T.TermSpec("brevity", "reward_fns:brevity", 1.0),
                       T.TermSpec("x", "reward_fns:not_finite", 0.0)]).score(rollouts())
    assert math.isnan(out.column("x").to_pylist()[0])
    assert nonfinite_reason(out) == "1 non-finite value(s) in reward"  # 0 x NaN is NaN: the sum says so first
    assert nonfinite_reason(out.drop_columns(["reward"]).add_column(2, "reward", pa.array([0.0] * 4, pa.float32()))) \
        == "1 non-finite value(s) in x"


@pytest.mark.parametrize("terms, message", [
    ("[{name: similarity}, {name: similarity}]", "reward.terms\\[0\\].name: 'similarity' .*names another term too"),
    ("[{name: x, fn: nope}]", "reward.terms\\[0\\].fn: 'nope' .*must be a built-in"),
    ("[{name: similarity}, {name: copy_penalty, weight: 2}]", "copy_penalty has no weight"),
    ("[{name: copy_penalty}]", "copy_penalty needs a term it can replace"),
    ("[{name: reward}]", "is a REWARDS key column"),
    ("[{name: x, fn: length, model: m}]", "only a similarity term takes a model"),
    ("[{fn: similarity}]", "reward.terms\\[0\\]: missing key 'name'"),
    ("[{name: similarity, wieght: 2}]", "unknown config key 'reward.terms\\[0\\].wieght'"),
])
def test_config_refuses_terms_by_their_fields(terms, message):
    from rlsr_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"--reward.terms={terms}"])


def test_a_term_error_from_an_actor_is_reported_as_its_own_line():
    """Raised in a reward actor, the error reaches the driver wrapped in Ray's RayTaskError, whose
    text is the actor's traceback; the command prints the term's line (rlsr_ray.cli.error_line)."""
    import ray.exceptions

    from rlsr_ray.cli import error_line

    try:
        RewardActor([T.TermSpec("x", "reward_fns:one_short", 1.0)]).score(rollouts())
    except T.RewardTermError as e:
        import traceback

        wrapped = ray.exceptions.RayTaskError("score_parts", traceback.format_exc(), e).as_instanceof_cause()
    assert isinstance(wrapped, T.RewardTermError) and "test_terms.py" in str(wrapped)  # the traceback's text
    assert error_line(wrapped) == "reward term 'x' (reward_fns:one_short): returned 3 value(s) for 4 row(s); " \
                                  "it must return one float per row"
