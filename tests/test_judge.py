"""Pairwise judging: reply parsing, both orders, ties, win rate, length control, judge errors.

The aggregation tests drive the Judge protocol with scripted verdicts (the rules under test are
arithmetic on verdicts); the local judge runs a real (tiny random) causal LM; the endpoint judge
is tested against rlsr_ray.serving.policy_server in test_serve.py and against a closed port here.
"""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest

from rlsr_ray.evaluation import judge as J

TEMPLATE = "I: {instruction}\nA: {response_a}\nB: {response_b}"


class Scripted:
    """A judge that prefers the response holding `good`; says tie when both or neither do,
    or always answers `always` when set (a judge blind to content)."""
    name = "scripted"

    def __init__(self, always: str | None = None):
        self.always, self.prompts = always, []

    def verdicts(self, prompts):
        self.prompts += prompts
        out = []
        for p in prompts:
            a, b = p.split("\nA: ")[1].split("\nB: ")
            out.append(self.always or ("tie" if ("good" in a) == ("good" in b) else "A" if "good" in a else "B"))
        return out


@pytest.mark.parametrize("reply,verdict", [
    ("A", "A"), ("b", "B"), (" **A**", "A"), ('"B".', "B"), ("Tie", "tie"), ("tie.", "tie"),
    ("Response A is better", "A"), ("Both are fine", None), ("", None), ("Absolutely A", None),
])
def test_parse_verdict(reply, verdict):
    assert J.parse_verdict(reply) == verdict


def test_each_pair_is_asked_in_both_orders_and_scored_for_x():
    judge = Scripted()
    rows = J.pairwise(judge, TEMPLATE, ["q1", "q2", "q3"], ["good", "bad", "good"], ["bad", "good", "good too"])
    assert judge.prompts[0] == "I: q1\nA: good\nB: bad" and judge.prompts[3] == "I: q1\nA: bad\nB: good"
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.5]
    assert rows[0] == {"x_first": "A", "x_second": "B", "score": 1.0}
    w = J.win_rate(rows)
    assert (w["wins"], w["losses"], w["ties_or_split"], w["order_agreement"]) == (1, 1, 1, 1.0)
    assert w["win_rate"] == pytest.approx(50.0)
    assert w["se"] == pytest.approx(100 * np.std([1, 0, 0.5], ddof=1) / np.sqrt(3))


def test_a_judge_that_always_picks_one_position_gives_exactly_half():
    rows = J.pairwise(Scripted(always="A"), TEMPLATE, ["q"] * 4, ["good"] * 4, ["bad"] * 4)
    w = J.win_rate(rows)
    assert w["win_rate"] == 50.0 and w["ties_or_split"] == 4 and w["order_agreement"] == 0.0


def test_unreadable_replies_are_left_out_and_counted():
    rows = [{"x_first": "A", "x_second": None, "score": 1.0}, {"x_first": None, "x_second": None, "score": None}]
    w = J.win_rate(rows)
    assert (w["n"], w["unreadable_prompts"], w["win_rate"]) == (1, 1, 100.0)


def test_braces_in_answers_do_not_break_the_template():
    assert J.fill(TEMPLATE, "{x}", "{response_b}", "b") == "I: {x}\nA: {response_b}\nB: b"


def test_length_control_removes_a_preference_for_the_longer_answer():
    # X is longer by d on 12 prompts and wins 9 of them, shorter by d on 4 and wins 1: raw 62.5 %.
    # Two length differences of one size: the fit reproduces both win fractions (3/4 and 1/4) with
    # an intercept of 0, so at equal length X wins 50 % (the ridge moves it by far less than 0.1).
    scores = np.array([1.0] * 9 + [0.0] * 3 + [1.0] + [0.0] * 3)
    diff = np.array([40.0] * 12 + [-40.0] * 4)
    lc = J.length_controlled(scores, diff)
    assert scores.mean() == 0.625
    assert lc["lc_win_rate"] == pytest.approx(50.0, abs=0.1) and lc["lc_length_coef"] > 0
    # Lengths unrelated to the verdicts: the fit's intercept is the plain win rate.
    s = np.array([1.0, 0.0, 0.5, 1.0])
    assert J.length_controlled(s, np.zeros(4))["lc_win_rate"] == pytest.approx(100 * s.mean(), abs=1e-6)
    assert J.length_controlled(np.ones(5), np.arange(5.0))["lc_win_rate"] == 100.0  # no fit to diverge


def test_local_judge_reads_a_real_model_in_both_orders(tiny_policy):
    judge = J.LocalJudge(tiny_policy)
    prompts = [J.fill(J.load_template(None), "Name a color.", "Blue.", "Seven."),
               J.fill(J.load_template(None), "Name a color.", "Seven.", "Blue.")]
    v = judge.verdicts(prompts)
    assert all(x in J.CHOICES for x in v) and judge.verdicts(prompts) == v  # readable, deterministic
    rows = J.pairwise(judge, J.load_template(None), ["Name a color."], ["Blue."], ["Seven."])
    assert (rows[0]["x_first"], rows[0]["x_second"]) == tuple(v)
    assert rows[0]["score"] == np.mean([J.order_score(v[0], True), J.order_score(v[1], False)])


def test_prompt_file_without_placeholders_is_one_line(tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("Which is better, {response_a} or {response_b}?")
    with pytest.raises(J.JudgeError, match=r"judge\.txt lacks the placeholder\(s\) \{instruction\}"):
        J.load_template(str(bad))


def test_unreachable_endpoint_is_one_clear_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    judge = J.EndpointJudge(f"http://127.0.0.1:{port}/v1", "judge", timeout_s=5)
    with pytest.raises(J.JudgeError) as e:
        judge.ask("A or B?")
    msg = str(e.value)
    assert f"judge endpoint http://127.0.0.1:{port}/v1/chat/completions: cannot connect" in msg and "\n" not in msg
    with pytest.raises(J.JudgeError, match="eval.judge_model"):
        J.make_judge(f"http://127.0.0.1:{port}/v1", "", "KEY", 5, "/tmp")


def test_length_controlled_se_is_the_sandwich_not_bernoulli():
    # Length differences all equal: the fit is an intercept only, sigmoid(b0) is the mean score,
    # and the sandwich SE is the plain SE of the mean (ddof 0). Scores of 0.5 have less spread
    # than Bernoulli draws of the same mean, which sqrt(p(1-p)/n) would claim.
    s = np.array([0.5] * 8 + [1.0, 0.0])
    lc = J.length_controlled(s, np.full(10, 7.0))
    assert lc["lc_win_rate"] == pytest.approx(50.0, abs=1e-6)
    assert lc["lc_se"] == pytest.approx(100 * s.std(ddof=0) / math.sqrt(10), rel=1e-3)
    assert lc["lc_se"] < 100 * math.sqrt(0.25 / 10) / 2


def test_length_controlled_rate_is_na_when_length_separates_the_verdicts():
    # The longer answer always wins: the slope's likelihood has no maximum.
    diff = np.array([-30.0, -10.0, -5.0, 5.0, 12.0, 40.0])
    lc = J.length_controlled(np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), diff)
    assert lc["lc_separated"] and math.isnan(lc["lc_win_rate"]) and math.isnan(lc["lc_se"])
    # A tie exactly at the threshold's length still separates; one away from it does not.
    assert J.separated(np.array([-1.0, 0.0, 1.0]), np.array([0.0, 0.5, 1.0]))
    assert not J.separated(np.array([-1.0, 0.5, 1.0, 2.0]), np.array([0.0, 0.5, 1.0, 0.0]))
    assert J.separated(np.array([-1.0, 1.0]), np.array([1.0, 0.0]))  # the shorter always wins


def test_passing_endpoint_failures_are_retried_and_others_are_not():
    from judge_server import scripted_judge

    with scripted_judge([(503, "overloaded"), (429, "slow down"), (200, "B")]) as (url, seen):
        judge = J.EndpointJudge(url, "m", retries=2, backoff_s=0.01)
        assert judge.ask("Which?") == "B" and len(seen) == 3
    with scripted_judge([(500, "boom")]) as (url, seen):
        with pytest.raises(J.JudgeError, match=r"HTTP 500: boom after 3 tries"):
            J.EndpointJudge(url, "m", retries=2, backoff_s=0.01).ask("Which?")
        assert len(seen) == 3
    with scripted_judge([(400, "model 'm' does not exist"), (200, "A")]) as (url, seen):
        with pytest.raises(J.JudgeError, match=r"HTTP 400: model 'm' does not exist$"):
            J.EndpointJudge(url, "m", retries=2, backoff_s=0.01).ask("Which?")
        assert len(seen) == 1  # a request the server refuses is not worth another try
