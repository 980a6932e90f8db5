"""On-policy (algo.max_staleness=0) against off-policy overlap (=1, or any k), same box, same run.

Each layout runs the same preset twice, once per mode, one after the other, and reports the
median step time, samples/s over all steps, the time waiting for rollouts, and the held-out
similarity delta (when evaluation is on). Layouts:

  default     the default preset as shipped: rollout and learner each use both cores (they took
              turns until now), so overlapping them oversubscribes a 2-core machine
  own_cores   one torch thread and one logical CPU per pool: rollout and learner can each run on
              a core of their own while they overlap

    python benchmarks/async_vs_sync.py --layouts default own_cores --out benchmarks/results/async_cpu.json
    python benchmarks/async_vs_sync.py --preset tiny --layouts own_cores --staleness 1 2 --steps 12 --no-eval \
        --set rollout.max_new_tokens=64
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {
    "default": [],
    "own_cores": [f"--pools.{role}.{key}=1" for role in ("rollout", "reward", "reference", "learner")
                  for key in ("num_cpus", "torch_threads")],
}


def run(preset: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "rlsr_ray.run", preset, "--ray.address=local", "--run.progress=false",
           f"--run.output_dir={out}", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in rows]
    result = {
        "wall_s": time.perf_counter() - t0,
        "steps": len(rows),
        "step_s_median": statistics.median(steps),
        "step_s_total": sum(steps),
        "samples_per_s": summary["samples_per_s"],
        "rollout_wait_s_total": sum(r.get("rollout_s", 0.0) for r in rows),
        "train_s_total": sum(r.get("train_s", 0.0) for r in rows),
        "weight_sync_s_total": sum(r.get("weight_sync_s", 0.0) for r in rows),
        "policy_staleness_max": max(r["policy_staleness"] for r in rows),
    }
    if "heldout" in summary:
        h = summary["heldout"]
        result["heldout"] = {k: h[k] for k in ("before_mean", "after_mean", "delta_mean", "delta_se")}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--steps", type=int, default=None, help="override run.steps (default: the preset's)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--staleness", nargs="+", type=int, default=[0, 1], help="algo.max_staleness values; the "
                    "first is the baseline of the speed-up")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further overrides, e.g. rollout.max_new_tokens=48")
    args = ap.parse_args()
    common = ([f"--run.steps={args.steps}"] if args.steps else []) + \
        (["--run.eval_before_after=false"] if args.no_eval else []) + [f"--{kv}" for kv in args.set]
    results: dict = {"preset": args.preset, "common": common}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            base = args.staleness[0]
            for k in args.staleness:
                name = f"{layout}/staleness{k}"
                r = run(args.preset, [*LAYOUTS[layout], *common, f"--algo.max_staleness={k}"],
                        Path(tmp) / name.replace("/", "_"))
                results[name] = r
                print(name, json.dumps(r), flush=True)
            for k in args.staleness[1:]:
                ratio = results[f"{layout}/staleness{base}"]["step_s_total"] / results[f"{layout}/staleness{k}"]["step_s_total"]
                key = "speedup" if (base, k) == (0, 1) else f"speedup_{k}_over_{base}"
                results[f"{layout}/{key}"] = ratio
                print(f"{layout}: step time, staleness {base} / staleness {k} = {ratio:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
