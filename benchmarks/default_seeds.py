"""The default preset at several seeds: each run's held-out delta and time, and their spread.

Runs (or, with --read-only, only reads) `python -m rlsr_ray.run --run.seed=S
--run.output_dir=OUT/seedS` one after another, each in a fresh process, then writes one JSON
with, per seed: wall time of the whole command, samples/s, median step, the per-phase time split,
held-out similarity before -> after with its paired delta, SE and z, prompts improved / worse,
answers cut at the evaluation's token limit before -> after, and the first 6 -> last 6 steps' train
reward; and over the seeds: the mean, min and max of the delta. The CPU class and date go with it.

    python benchmarks/default_seeds.py --seeds 0,1,2 --out benchmarks/results/default_seeds_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml


def one(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    ev = json.loads((out / "heldout_eval.json").read_text())
    limit = yaml.safe_load((out / "config.yaml").read_text())["run"]["eval_max_new_tokens"]
    before, after = ev["before"], ev["after"]
    diffs = [a - b for a, b in zip(after["similarity"], before["similarity"])]
    h = summary["heldout"]
    return {
        "total_s": summary["total_s"], "setup_s": summary["setup_s"], "samples_per_s": summary["samples_per_s"],
        "median_step_s": statistics.median(r["step_s"] for r in rows),
        "phase_s": {k: round(sum(r.get(k) or 0.0 for r in rows), 1)
                    for k in ("rollout_s", "reward_s", "reference_s", "score_wall_s", "train_s", "weight_sync_s")},
        "heldout": h, "improved": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs),
        "cut_before": sum(n >= limit for n in before["lengths"]) / len(before["lengths"]),
        "cut_after": sum(n >= limit for n in after["lengths"]) / len(after["lengths"]),
        "train_reward_first6": statistics.mean(r["reward_mean"] for r in rows[:6]),
        "train_reward_last6": statistics.mean(r["reward_mean"] for r in rows[-6:]),
        "kl_last": rows[-1]["kl"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="outputs/default_seeds", help="folder of the runs' output folders")
    ap.add_argument("--read-only", action="store_true", help="summarise runs already made")
    ap.add_argument("--out", default="benchmarks/results/default_seeds_cpu.json")
    args = ap.parse_args()
    import torch

    seeds = [int(s) for s in args.seeds.split(",")]
    per: dict[str, dict] = {}
    for s in seeds:
        out = Path(args.runs) / f"seed{s}"
        wall = None
        if not args.read_only:
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "rlsr_ray.run", f"--run.seed={s}", f"--run.output_dir={out}"],
                           check=True)
            wall = time.time() - t0
        r = per[str(s)] = {"wall_s": wall, **one(out)}
        h = r["heldout"]
        print(f"seed {s}: delta {h['delta_mean']:+.4f} +- {h['delta_se']:.4f} (z {h['z']:.2f}), "
              f"{r['samples_per_s']:.2f} samples/s", flush=True)
    deltas = [p["heldout"]["delta_mean"] for p in per.values()]
    result = {
        "command": f"python -m rlsr_ray.run --run.seed=S --run.output_dir={args.runs}/seedS, S in {seeds}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "runs": per,
        "delta": {"mean": statistics.mean(deltas), "min": min(deltas), "max": max(deltas),
                  "sd": statistics.stdev(deltas) if len(deltas) > 1 else None},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["delta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
