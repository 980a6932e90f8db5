"""Seconds and MB per weight sync, object store vs the weight route, and their share of a step.

The default preset (SmolLM2-135M, one learner, one rollout actor) runs a few steps once per
`rollout.weight_sync` path; the figures come from its metrics.jsonl (`weight_sync_s`,
`weight_sync_mb`, `step_s`), the first step left out (it includes one-time warm-up).

    python benchmarks/weight_sync.py --steps 5 --out benchmarks/results/weight_sync_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ("object_store", "group")
COMMON = ["--run.eval_before_after=false", "--run.progress=false", "--ray.address=local"]


def run(out: Path, steps: int, path: str, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "rlsr_ray.run", "default", f"--run.output_dir={out}", f"--run.steps={steps}",
           f"--rollout.weight_sync={path}", *COMMON, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="weight_sync.json")
    args = ap.parse_args()
    from rlsr_ray.modeling.policy import cpu_has_fast_bf16

    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_fast_bf16(),
              "steps": args.steps, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            rows = run(Path(tmp) / path, args.steps, path)[1:]
            assert all(r["weight_sync_path"] == path for r in rows), [r["weight_sync_path"] for r in rows]
            sync = [r["weight_sync_s"] for r in rows]
            step = [r["step_s"] for r in rows]
            report["paths"][path] = {
                "sync_s_median": statistics.median(sync), "sync_s_max": max(sync),
                "mb_per_sync": rows[0]["weight_sync_mb"], "step_s_median": statistics.median(step),
                "sync_share_of_step": sum(sync) / sum(step),
            }
            print(path, json.dumps(report["paths"][path]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nCPU capability {report['cpu_capability']}, {args.steps - 1} steps each")
    print(f"{'path':14s} {'sync s':>8s} {'MB/sync':>8s} {'step s':>7s} {'share':>7s}")
    for name, r in report["paths"].items():
        print(f"{name:14s} {r['sync_s_median']:8.3f} {r['mb_per_sync']:8.0f} {r['step_s_median']:7.1f} "
              f"{r['sync_share_of_step']:7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
