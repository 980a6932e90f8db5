"""`python -m rlsr_ray.compare tiny`: the three arms, the four-way eval and the report, end to end.

The report is checked against the files it was built from: every figure it names exists and is
the PNG it embeds, and every number in its tables is the value at the summary key it cites."""
from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from listeners import LOOPBACK, command_listeners

pytestmark = pytest.mark.slow
LM_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"  # the harness's tasks of tests/test_lm_eval.py


def _lookup(root: Path, source: str):
    file, _, key = source.partition(":")
    value = json.loads((root / file).read_text())
    for part in key.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The comparison's folder and summary, and every socket its session listened on, read each
    second through all its stages (SFT on Ray Train, two RLSR runs, the evaluation)."""
    out = tmp_path_factory.mktemp("compare")
    log = out.parent / "compare.log"
    # A local judge so the win-rate table is built too; the tiny random model is no judge, and
    # the report must say so.
    # Tracked the way users track: wandb offline and an MLflow SQLite store beside it.
    code, seen = command_listeners(["rlsr_ray.compare", "tiny", "--ray.address=local", f"--run.output_dir={out}",
                                    "--eval.judge=tiny-random", "--run.report_to=tensorboard,wandb,mlflow",
                                    "--eval.lm_eval_tasks=rlsr_mc,rlsr_gen", f"--eval.lm_eval_include_path={LM_TASKS}",
                                    f"--run.mlflow_tracking_uri=sqlite:///{out.parent}/mlflow.db"],
                                   log, timeout_s=900, WANDB_MODE="offline")
    assert code == 0, log.read_text()[-3000:]
    return out, json.loads((out / "compare_summary.json").read_text()), seen


def test_the_local_ray_of_every_stage_listens_on_loopback_only(finished):
    _, _, seen = finished
    assert len(seen) >= 5, seen
    assert sorted((a, pid) for a, pid in seen if a not in LOOPBACK) == []


def test_rlsr_from_sft_starts_from_and_is_anchored_to_the_sft_policy(finished):
    out, result, _ = finished
    assert result["checkpoints"]["sft"] == str(out / "sft" / "final")
    state = json.loads((Path(result["checkpoints"]["sft_rlsr"]) / "trainer_state.json").read_text())
    assert state["reference_policy"] == str((out / "sft" / "final").resolve())
    rows = [json.loads(x) for x in (out / "sft_rlsr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["kl"]) for r in rows)


def test_every_figure_and_number_in_the_report_comes_from_the_files(finished):
    out, _, _ = finished
    page = (out / "report.html").read_text()
    figures = re.findall(r'<figure data-file="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert {Path(f).stem for f, _ in figures} == {"reward_mean", "kl", "response_length_mean", "loss",
                                                  "reward_similarity_mean", "reward_copy_penalty_mean"}
    assert "reward term similarity" in page  # each reward term's column, from metrics.jsonl to a figure
    for rel, data in figures:
        raw = (out / rel).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and base64.b64decode(data) == raw
    cited = re.findall(r'data-source="([^"]+)">([^<]*)<', page)
    assert len(cited) >= 6 * 4 + 6 * 6 * 2 + 6 * 5  # metric table, delta table, win-rate table
    for source, shown in cited:
        value = _lookup(out, source)
        if shown == "–":
            assert value is None or not math.isfinite(value), source
            continue
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        assert abs(float(shown) - float(value)) <= 0.5 * 10 ** -decimals + 1e-12, (source, shown, value)
    # No number in a table that does not cite its source.
    for cell in re.findall(r"<td>(.*?)</td>", page):
        assert re.sub(r'<span data-source="[^"]+">[^<]*</span>|[ ±]', "", cell) == "", cell
    assert "too small to judge answers" in page  # the tiny judge's votes are not shown as a verdict


def test_the_harness_tasks_ran_on_all_four_checkpoints_and_are_paired_by_document(finished):
    out, result, _ = finished
    lm = json.loads((out / "eval" / "eval_summary.json").read_text())["lm_eval"]
    assert sorted(lm["checkpoints"]) == ["base", "rlsr", "sft", "sft_rlsr"]
    docs = {"rlsr_mc": 12, "rlsr_gen": 8}
    for name in lm["checkpoints"]:
        scores = json.loads((out / "eval" / "lm_eval" / f"{name}.json").read_text())["scores"]
        for task, n in docs.items():
            got = lm["checkpoints"][name][task]
            assert got["samples"] == n
            for metric, per_doc in scores[task].items():  # the summary's mean is the documents' mean
                assert len(per_doc) == n
                assert got["metrics"][metric]["value"] == pytest.approx(sum(per_doc.values()) / n, abs=1e-12)
    d = lm["deltas"]["sft_vs_base"]["tasks"]["rlsr_mc"]["acc"]
    assert d["n"] == 12
    base_acc = lm["checkpoints"]["base"]["rlsr_mc"]["metrics"]["acc"]["value"]
    sft_acc = lm["checkpoints"]["sft"]["rlsr_mc"]["metrics"]["acc"]["value"]
    assert d["delta_mean"] == pytest.approx(sft_acc - base_acc, abs=1e-12)
    page = (out / "report.html").read_text()
    assert "<h3>rlsr_mc</h3>" in page and "<h3>rlsr_gen</h3>" in page  # its cells: the report test's citations


def test_each_arm_is_a_tracking_run_of_the_comparisons_group_equal_to_its_metrics(finished):
    """wandb (its offline files, read with its own reader) and MLflow (MlflowClient): one run per arm
    in the comparison's group, holding every number of every metrics.jsonl row at its step and each
    checkpoint's path; the report and the eval summary on the comparison's own run."""
    from mlflow.tracking import MlflowClient
    from test_tracking import mlflow_history, newest_per_step, wandb_records, wandb_run_dir

    from rlsr_ray.tracking.mlflow_tracker import metric_key
    from rlsr_ray.tracking.trackers import numeric

    out, result, _ = finished
    group = out.name
    client = MlflowClient(f"sqlite:///{out.parent}/mlflow.db")
    [parent] = client.search_runs([client.get_experiment_by_name("rlsr_ray").experiment_id],
                                  f"tags.`rlsr_ray.group_parent` = '{group}'")
    for arm in ("sft", "rlsr", "sft_rlsr"):
        rows = [json.loads(x) for x in (out / arm / "metrics.jsonl").read_text().splitlines()]
        expect: dict[str, dict[int, float]] = {}
        for r in rows:
            for k, v in numeric(r).items():
                expect.setdefault(k, {})[r["step"]] = v
        assert len(expect) >= (5 if arm == "sft" else 20), sorted(expect)
        ids = json.loads((out / arm / "tracking.json").read_text())
        found = wandb_records(wandb_run_dir(out / arm, ids["wandb"]))
        assert (found["run"].display_name, found["run"].run_group) == (f"{group}-{arm}", group)
        assert found["run"].job_type == ("sft" if arm == "sft" else "rlsr") and found["exit"] == 0
        run = client.get_run(ids["mlflow"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.params["run.output_dir"] == str(out / arm)
        for k, by_step in expect.items():
            assert newest_per_step(found["history"], k) == pytest.approx(by_step), (arm, k)
            assert mlflow_history(client, ids["mlflow"], metric_key(k)) == pytest.approx(by_step), (arm, k)
        last = max(r["step"] for r in rows)
        assert run.data.tags["checkpoint.latest"].endswith(f"step_{last}"), run.data.tags
        assert found["summary"]["checkpoint/latest"] == run.data.tags["checkpoint.latest"]
    report = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "figures", "eval_summary.json", "compare_summary.json"} <= report
    metrics = client.get_run(parent.info.run_id).data.metrics
    summary = json.loads((out / "eval" / "eval_summary.json").read_text())
    assert metrics["final/checkpoints/rlsr/similarity"] == summary["checkpoints"]["rlsr"]["similarity"]
    [report_run] = [d for d in (out / "wandb").glob("offline-run-*")]
    found = wandb_records(report_run)
    assert found["run"].job_type == "report" and found["run"].run_group == group
    assert "report.html" in next(iter(found["artifacts"].values()))


def test_a_finished_comparison_keeps_its_arms(finished):
    out, _, _ = finished
    before = (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    # Nothing left to train, and the eval's pools in this process: no Ray is started at all.
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.compare", "tiny", "--ray.address=local",
                           f"--run.output_dir={out}", "--eval.max_new_tokens=4", "--pools.rollout.num_actors=0",
                           "--pools.reward.num_actors=0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already trained" in done.stderr and (out / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == before
    assert "No judge configured" in (out / "report.html").read_text()


def test_figures_skip_the_rows_of_skipped_rl_steps(tmp_path):
    """A skipped step (NaN rewards, nothing informative) has no loss, KL or length in its row."""
    from rlsr_ray.evaluation.report import CURVES, plot_figures

    rl = [{"step": 1, "loss": 0.5, **{k: 0.1 for k in CURVES}}, {"step": 2, "skipped": "non-finite rewards"},
          {"step": 3, "loss": 0.4, **{k: 0.2 for k in CURVES}}]
    made = plot_figures(tmp_path, {"sft": [{"step": 1, "loss": 2.0}], "rlsr": rl, "sft_rlsr": rl[1:]})
    assert [p for p, _ in made] == [f"figures/{k}.png" for k in CURVES] + ["figures/loss.png"]
    assert all((tmp_path / p).read_bytes().startswith(b"\x89PNG") for p, _ in made)
