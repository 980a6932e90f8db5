"""The comparison's HTML report, built only from the files the arms wrote.

    <compare dir>/sft/metrics.jsonl, rlsr/metrics.jsonl, sft_rlsr/metrics.jsonl   per-step training
    <compare dir>/eval/eval_summary.json                                          the evaluation
    -> <compare dir>/figures/*.png and report.html (the PNGs embedded: one file to send around)

Every number in a table cell carries `data-source`, the summary file and key it was read from, so
a reader (and the test) can trace it.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from rlsr_ray.tracking.metrics import read_metrics

ARMS = {"base": "base", "sft": "SFT", "rlsr": "RLSR", "sft_rlsr": "SFT → RLSR"}
TRAINED = ("sft", "rlsr", "sft_rlsr")
# Eval metrics: label, short label (the delta table's header), how to show a value.
METRICS = {
    "similarity": ("similarity to reference (reward's embedding)", "similarity", "{:.4f}"),
    "rouge_l": ("ROUGE-L vs reference", "ROUGE-L", "{:.4f}"),
    "chrf": ("chrF vs reference", "chrF", "{:.4f}"),
    "copy_penalized": ("copy-penalty rate", "copy rate", "{:.3f}"),
    "tokens": ("answer length (tokens)", "tokens", "{:.1f}"),
    "cut": ("cut at the token limit", "cut rate", "{:.3f}"),
}
# Per-step curves: metrics.jsonl key -> title.
CURVES = {"reward_mean": "reward (mean over samples)", "kl": "KL to the reference policy",
          "response_length_mean": "response length (tokens)"}


def _fmt(value: Any, pattern: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else pattern.format(value)


def _cell(value: Any, pattern: str, source: str) -> str:
    return f'<td data-source="{html.escape(source)}">{_fmt(value, pattern)}</td>'


def _points(rows: list[dict[str, Any]], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have `key`: a skipped RL step has no loss, KL or length."""
    kept = [r for r in rows if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in kept], [r[key] for r in kept]


def term_curves(curves: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """metrics.jsonl key -> title of each reward term's curve (reward_<term>_mean), in first-seen order."""
    keys = {k: None for arm in ("rlsr", "sft_rlsr") for row in curves.get(arm, []) for k in row
            if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"}
    return {k: f"reward term {k[len('reward_'):-len('_mean')]} (mean over samples)" for k in keys}


def plot_figures(root: Path, curves: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """PNG files under root/figures: (relative path, caption) of each."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig_dir = root / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=100, format="png")
        plt.close(fig)
        made.append((f"figures/{name}", caption))

    for key, title in {**CURVES, **term_curves(curves)}.items():
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for arm in ("rlsr", "sft_rlsr"):
            ax.plot(*_points(curves.get(arm, []), key), marker=".", label=ARMS[arm])
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.legend()
        save(fig, f"{key}.png", f"{title}, per RL step")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    sft = curves.get("sft", [])
    a.plot(*_points(sft, "loss"), marker=".", color="tab:green")
    a.set_title("SFT: answer-token cross-entropy")
    a.set_xlabel("SFT step")
    for arm in ("rlsr", "sft_rlsr"):
        b.plot(*_points(curves.get(arm, []), "loss"), marker=".", label=ARMS[arm])
    b.set_title("RL: policy loss + KL term")
    b.set_xlabel("RL step")
    b.legend()
    save(fig, "loss.png", "training loss per step (SFT and the two RL arms; different objectives)")
    return made


def _pm(value: Any, err: Any, pattern: str, source: str, err_source: str) -> str:
    """A value ± its error, each in a span citing its key (no error: the value alone)."""
    cell = f'<span data-source="{html.escape(source)}">{_fmt(value, pattern)}</span>'
    if err is not None:
        cell += f' ± <span data-source="{html.escape(err_source)}">{_fmt(err, pattern)}</span>'
    return f"<td>{cell}</td>"


def harness_tables(lm: dict[str, Any], arms: list[str], src: str) -> list[str]:
    """Per LM Evaluation Harness task: each metric with the arms side by side (value ± the harness's
    stderr), then X − Y per pair, paired by document (mean ± SE), where the harness gave per-document
    scores."""
    parts = [f"<h2>LM Evaluation Harness (lm-eval {html.escape(lm['lm_eval_version'])})</h2>"]
    for task in lm["tasks"]:
        per = {a: lm["checkpoints"][a].get(task) for a in arms if a in lm["checkpoints"]}
        first = next((v for v in per.values() if v), None)
        if first is None:
            continue
        shots = first["num_fewshot"]
        parts.append(f"<h3>{html.escape(task)}</h3><p>{first['samples']} documents, {shots} shot(s).</p>"
                     "<table><tr><th>metric</th>" + "".join(f"<th>{html.escape(ARMS.get(a, a))}</th>" for a in per)
                     + "</tr>")
        for m in first["metrics"]:
            row = [f"<tr><th>{html.escape(m)}</th>"]
            for a, v in per.items():
                s = f"{src}:lm_eval.checkpoints.{a}.{task}.metrics.{m}"
                got = (v or {}).get("metrics", {}).get(m, {})
                row.append(_pm(got.get("value"), got.get("stderr"), "{:.4f}", f"{s}.value", f"{s}.stderr"))
            parts.append("".join(row) + "</tr>")
        parts.append("</table>")
        paired = [(key, d) for key, d in lm["deltas"].items() if task in d["tasks"]]
        if paired:
            metrics = list(paired[0][1]["tasks"][task])
            parts.append("<table><tr><th>X vs Y (paired by document)</th>"
                         + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>")
            for key, d in paired:
                row = [f"<tr><th style='white-space:nowrap'>{html.escape(ARMS.get(d['x'], d['x']))} vs "
                       f"{html.escape(ARMS.get(d['y'], d['y']))}</th>"]
                for m in metrics:
                    s = f"{src}:lm_eval.deltas.{key}.tasks.{task}.{m}"
                    got = d["tasks"][task].get(m, {})
                    row.append(_pm(got.get("delta_mean"), got.get("delta_se"), "{:.4f}", f"{s}.delta_mean",
                                   f"{s}.delta_se"))
                parts.append("".join(row) + "</tr>")
            parts.append("</table>")
    return parts


def build(root: Path) -> Path:
    """Write root/report.html from the arms' files; returns its path."""
    root = Path(root)
    curves = {arm: read_metrics(root / arm / "metrics.jsonl") if (root / arm / "metrics.jsonl").exists() else []
              for arm in TRAINED}
    summary = json.loads((root / "eval" / "eval_summary.json").read_text())
    figures = plot_figures(root, curves)
    src = "eval/eval_summary.json"
    arms = [a for a in ARMS if a in summary["checkpoints"]]

    parts = ["<h1>RLSR comparison: base, SFT, RLSR, SFT → RLSR</h1>",
             f"<p>{summary['prompts']} prompts ({html.escape(summary['source'])}), answers with at most "
             f"{summary['max_new_tokens']} new tokens at temperature {summary['temperature']}.</p>"]
    parts.append("<h2>Evaluation</h2><table><tr><th>metric</th>"
                 + "".join(f"<th>{html.escape(ARMS[a])}</th>" for a in arms) + "</tr>")
    for m, (label, _, pattern) in METRICS.items():
        parts.append(f"<tr><th>{html.escape(label)}</th>"
                     + "".join(_cell(summary["checkpoints"][a][m], pattern, f"{src}:checkpoints.{a}.{m}") for a in arms)
                     + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Paired deltas (X − Y, mean ± standard error over prompts)</h2>"
                 "<table><tr><th>X vs Y</th>" + "".join(f"<th>{html.escape(METRICS[m][1])}</th>" for m in METRICS)
                 + "</tr>")
    for key, d in summary["deltas"].items():
        row = [f"<tr><th style='white-space:nowrap'>{html.escape(ARMS.get(d['x'], d['x']))} vs "
               f"{html.escape(ARMS.get(d['y'], d['y']))}</th>"]
        for m, (_, _, pattern) in METRICS.items():
            s = f"{src}:deltas.{key}.{m}"
            row.append(f'<td><span data-source="{s}.delta_mean">{_fmt(d[m]["delta_mean"], pattern)}</span> ± '
                       f'<span data-source="{s}.delta_se">{_fmt(d[m]["delta_se"], pattern)}</span></td>')
        parts.append("".join(row) + "</tr>")
    parts.append("</table>")
    if "lm_eval" in summary:
        parts.extend(harness_tables(summary["lm_eval"], arms, src))
    parts.append("<h2>Win rate (pairwise judge)</h2>")
    j = summary["judge"]
    if not j.get("configured"):
        parts.append("<p><b>No judge configured</b> (eval.judge): no win rates; the metrics above compare each "
                     "answer with its reference.</p>")
    else:
        parts.append(f"<p>Judge: {html.escape(j['judge'])}; prompt {html.escape(j['prompt'])}; both orders asked, "
                     "ties count half.</p>")
        if "caution" in j:
            parts.append(f"<p><b>Caution:</b> {html.escape(j['caution'])}</p>")
        # A judge not marked vetted gives votes, not win rates (rlsr_ray.evaluation.eval.judge_pairs).
        group = "win_rates" if "win_rates" in j else "votes"
        what = "X's win rate %" if group == "win_rates" else "X's share of the judge's votes %"
        parts.append(f"<table><tr><th>X vs Y</th><th>{what}</th><th>length-controlled %</th>"
                     "<th>prompts</th><th>order agreement</th></tr>")
        for key, w in j[group].items():
            s = f"{src}:judge.{group}.{key}"
            parts.append(f"<tr><th>{html.escape(ARMS.get(w['x'], w['x']))} vs {html.escape(ARMS.get(w['y'], w['y']))}</th>"
                         f'<td><span data-source="{s}.win_rate">{_fmt(w["win_rate"], "{:.1f}")}</span> ± '
                         f'<span data-source="{s}.se">{_fmt(w["se"], "{:.1f}")}</span></td>'
                         + _cell(w.get("lc_win_rate"), "{:.1f}", f"{s}.lc_win_rate")
                         + _cell(w["n"], "{}", f"{s}.n") + _cell(w["order_agreement"], "{:.2f}", f"{s}.order_agreement")
                         + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Training</h2>")
    run_file = root / "compare_summary.json"
    if run_file.exists():
        run_info = json.loads(run_file.read_text())
        parts.append(f"<p>Machine: {html.escape(run_info.get('machine', 'not recorded'))}.</p>"
                     "<table><tr><th>stage</th><th>wall seconds (this invocation)</th></tr>")
        for stage, secs in run_info.get("arm_s", {}).items():
            parts.append(f"<tr><th>{html.escape(ARMS.get(stage, stage))}</th>"
                         + _cell(secs, "{:.0f}", f"compare_summary.json:arm_s.{stage}") + "</tr>")
        parts.append("</table>")
    for rel, caption in figures:
        data = base64.b64encode((root / rel).read_bytes()).decode()
        parts.append(f'<figure data-file="{rel}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td{white-space:nowrap}th{text-align:left}figure{margin:1em 0}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>RLSR comparison</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    out = root / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
