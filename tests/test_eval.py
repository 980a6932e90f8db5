"""`python -m rlsr_ray.eval`: two real (tiny random) checkpoints answer a user file through the
rollout and reward roles (in-process pools); files, summary and deltas are checked against each
other, and bad input fails in one line before anything is generated."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rlsr_ray.evaluation import eval as E
from rlsr_ray.config import ConfigError, load_config

IN_DRIVER = ["--preset=tiny", "--pools.rollout.num_actors=0", "--pools.reward.num_actors=0", "--eval.max_new_tokens=6"]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_policy, tmp_path_factory):
    """The tiny policy and a copy with other weights, so their answers differ."""
    from transformers import AutoModelForCausalLM

    other = tmp_path_factory.mktemp("ckpt") / "other"
    shutil.copytree(tiny_policy, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(other)
    return tiny_policy, str(other)


def test_two_checkpoints_give_paired_deltas_from_their_own_outputs(two_checkpoints, tmp_path, capsys):
    base, other = two_checkpoints
    data = tmp_path / "questions.jsonl"
    rows = [{"prompt": f"Question {k}: name a color.", "response": "Blue is a color."} for k in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert E.main([f"base={base}", f"other={other}", *IN_DRIVER, f"--eval.data_path={data}",
                   f"--eval.output_dir={out}"]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["prompts"] == 3 and summary["judge"]["configured"] is False
    assert "no judge configured" in summary["judge"]["note"]
    per = {n: [json.loads(x) for x in (out / "outputs" / f"{n}.jsonl").read_text().splitlines()] for n in ("base", "other")}
    for name, rows_out in per.items():
        assert [r["instruction"] for r in rows_out] == [r["prompt"] for r in rows]
        for m in E.METRICS:  # the summary's means are the per-prompt values' means
            assert summary["checkpoints"][name][m] == pytest.approx(np.mean([float(r[m]) for r in rows_out]))
        assert all(1 <= r["tokens"] <= 6 and r["cut"] == (r["finish_reason"] == "length") for r in rows_out)
        alpaca = json.loads((out / "model_outputs" / f"{name}.json").read_text())
        assert [(a["instruction"], a["output"], a["generator"]) for a in alpaca] == \
            [(r["instruction"], r["output"], name) for r in rows_out]
    assert [r["output"] for r in per["base"]] != [r["output"] for r in per["other"]]
    d = summary["deltas"]["other_vs_base"]
    for m in E.METRICS:
        diff = [float(o[m]) - float(b[m]) for o, b in zip(per["other"], per["base"])]
        assert d[m]["delta_mean"] == pytest.approx(np.mean(diff))
        assert d[m]["delta_se"] == pytest.approx(np.std(diff, ddof=1) / np.sqrt(3))


def test_the_default_prompts_are_the_held_out_split():
    from rlsr_ray import data

    cfg = load_config("tiny", [])
    _, held = data.split_heldout(data.load_examples(None), cfg.data.heldout_size, cfg.data.shuffle_seed)
    p = E.load_prompts(cfg)
    assert p.references == [ex.reference for ex in held] and len(p.instructions) == cfg.data.heldout_size


def test_checkpoint_labels():
    assert E.parse_checkpoints(["a=/x/y", "/r/checkpoints/step_4", "/s/final"]) == \
        [("a", "/x/y"), ("checkpoints_step_4", "/r/checkpoints/step_4"), ("s_final", "/s/final")]
    with pytest.raises(ConfigError, match="used twice"):
        E.parse_checkpoints(["a=/x", "a=/y"])


@pytest.mark.parametrize("arg,message", [
    ("--eval.judge=http://127.0.0.1:9/v1", "eval.judge_model: name the endpoint's model"),
    ("--eval.judge_prompt=/nonexistent/judge.txt", "eval.judge_prompt: cannot read /nonexistent/judge.txt"),
])
def test_bad_judge_settings_fail_in_one_line_before_generation(tiny_policy, tmp_path, capsys, arg, message):
    out = tmp_path / "eval"
    assert E.main([tiny_policy, tiny_policy + "/", *IN_DRIVER, arg, f"--eval.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlsr_ray: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_missing_checkpoint_fails_in_one_line(tmp_path, capsys):
    assert E.main([str(tmp_path / "nope"), *IN_DRIVER, f"--eval.output_dir={tmp_path / 'eval'}"]) == 2
    assert f"checkpoint nope: {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_means_and_paired_deltas_on_hand_made_answers():
    def row(sim, rl, cf, pen, tok, cut):
        return {"similarity": sim, "rouge_l": rl, "chrf": cf, "copy_penalized": pen, "tokens": tok, "cut": cut}

    base = [row(0.5, 0.2, 0.3, False, 10, True), row(0.7, 0.4, 0.5, True, 20, False)]
    other = [row(0.6, 0.2, 0.4, False, 4, False), row(0.9, 0.6, 0.5, False, 30, False)]
    assert E.means(base) == pytest.approx({"similarity": 0.6, "rouge_l": 0.3, "chrf": 0.4, "copy_penalized": 0.5,
                                           "tokens": 15.0, "cut": 0.5})
    d = E.deltas(base, other)
    # Per-prompt differences: similarity (0.1, 0.2), tokens (-6, +10), copy flag (0, -1), cut (-1, 0).
    assert d["similarity"]["delta_mean"] == pytest.approx(0.15)
    assert d["similarity"]["delta_se"] == pytest.approx(np.std([0.1, 0.2], ddof=1) / np.sqrt(2))
    assert d["tokens"]["delta_mean"] == pytest.approx(2.0) and d["tokens"]["delta_se"] == pytest.approx(8.0)
    assert d["copy_penalized"]["delta_mean"] == -0.5 and d["cut"]["delta_mean"] == -0.5


def _questions(tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{k}: name a color.", "response": "Blue."}) + "\n" for k in range(3)))
    return f"--eval.data_path={data}"


def test_an_endpoint_whose_reply_cannot_be_read_fails_before_generation(tiny_policy, tmp_path, capsys):
    from judge_server import scripted_judge

    out = tmp_path / "eval"
    with scripted_judge([(200, "I think both answers have merit.")]) as (url, seen):
        assert E.main([tiny_policy, *IN_DRIVER, _questions(tmp_path), f"--eval.judge={url}", "--eval.judge_model=m",
                       f"--eval.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "asked to reply with the single letter A, m replied 'I think both" in err and "\n" not in err
    assert len(seen) == 1 and not out.exists()


def test_a_judge_failing_for_good_loses_no_metric_and_unvetted_votes_are_not_win_rates(two_checkpoints, tmp_path, capsys):
    from judge_server import scripted_judge

    base, other = two_checkpoints
    args = [f"base={base}", f"other={other}", *IN_DRIVER, _questions(tmp_path), "--eval.judge_model=m",
            "--eval.judge_retries=1"]
    out = tmp_path / "failing"
    with scripted_judge([(200, "A"), (503, "overloaded")]) as (url, seen):
        assert E.main([*args, f"--eval.judge={url}", f"--eval.output_dir={out}"]) == 2
    assert "HTTP 503: overloaded after 2 tries" in capsys.readouterr().err
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["judge"] == {"configured": True, "pending": True}
    assert set(summary["checkpoints"]) == {"base", "other"} and "other_vs_base" in summary["deltas"]

    for vetted, group in ((False, "votes"), (True, "win_rates")):
        out = tmp_path / group
        with scripted_judge([(200, "A")]) as (url, seen):
            assert E.main([*args, f"--eval.judge={url}", f"--eval.output_dir={out}",
                           f"--eval.judge_vetted={str(vetted).lower()}"]) == 0
        judge = json.loads((out / "eval_summary.json").read_text())["judge"]
        assert judge["vetted"] is vetted and list(judge) == ["configured", "judge", "prompt", "vetted", group] + \
            ([] if vetted else ["caution"])
        assert judge[group]["other_vs_base"]["win_rate"] == 50.0  # "A" always: each order once
        assert len(seen) == 1 + 2 * 3


@pytest.mark.slow
def test_the_command_on_its_own_local_ray_listens_on_loopback_only(tiny_policy, tmp_path):
    """`python -m rlsr_ray.eval` with its rollout and reward pools as actors: the local Ray it
    starts is read while a checkpoint is answered (after the pools are up)."""
    from listeners import LOOPBACK, command_listeners

    out, log = tmp_path / "eval", tmp_path / "eval.log"
    code, seen = command_listeners(["rlsr_ray.eval", f"base={tiny_policy}", "--preset=tiny", "--ray.address=local",
                                    "--eval.max_new_tokens=4", f"--eval.output_dir={out}"], log, timeout_s=300,
                                   ready="reward actor 0 ready", every_s=0.5)
    assert code == 0, log.read_text()[-3000:]
    assert json.loads((out / "eval_summary.json").read_text())["prompts"] == 8  # tiny's held-out split
    assert len(seen) >= 5, (seen, log.read_text()[-3000:])
    assert sorted((a, pid) for a, pid in seen if a not in LOOPBACK) == []
