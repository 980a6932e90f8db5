"""What a checkpoint costs per learner layout: seconds to write, seconds to restore, bytes on disk.

For each layout, the default preset (SmolLM2-135M) runs 2 steps with a checkpoint after each,
then resumes for a third step. Writing time is the mean over the 2 checkpoints (`checkpoint_s`
in summary.json); restoring time is `restore_s` of the resumed run (learners load weights,
optimizer and RNG, and the rollout pool receives the weights).

    python benchmarks/checkpoint_cost.py --out benchmarks/results/checkpoint_cost_cpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {"ZeRO-0, 1 learner": (0, 1), "ZeRO-2, 2 learners": (2, 2), "ZeRO-3, 2 learners": (3, 2)}
COMMON = ["--run.save_every=1", "--run.keep_checkpoints=0", "--run.eval_before_after=false", "--run.progress=false"]


def run(out: Path, steps: int, zero: int, learners: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "rlsr_ray.run", "default", f"--run.output_dir={out}", f"--run.steps={steps}",
           f"--train.zero_stage={zero}", f"--pools.learner.num_actors={learners}", *COMMON, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def sizes(folder: Path) -> dict[str, int]:
    kinds = {"model": 0, "optimizer": 0, "other": 0}
    for f in folder.iterdir():
        kind = "model" if f.name.startswith("model") else "optimizer" if f.name.startswith("optimizer") else "other"
        kinds[kind] += f.stat().st_size
    return kinds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="checkpoint_cost.json")
    args = ap.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (zero, learners) in LAYOUTS.items():
            out = Path(tmp) / f"zero{zero}x{learners}"
            first = run(out, 2, zero, learners)
            bytes_ = sizes(out / "checkpoints" / "step_2")
            resumed = run(out, 3, zero, learners, "--run.resume=auto")
            report[name] = {"write_s": first["checkpoint_s"] / first["checkpoints"], "restore_s": resumed["restore_s"],
                            "step_s": first["time_split_s"]["step_s"] / first["steps"],
                            "model_bytes": bytes_["model"], "optimizer_bytes": bytes_["optimizer"],
                            "total_bytes": sum(bytes_.values())}
            print(name, json.dumps(report[name]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'layout':22s} {'write s':>8s} {'restore s':>10s} {'step s':>7s} {'model MB':>9s} {'optim MB':>9s}")
    for name, r in report.items():
        print(f"{name:22s} {r['write_s']:8.2f} {r['restore_s']:10.2f} {r['step_s']:7.1f} "
              f"{r['model_bytes'] / 1e6:9.0f} {r['optimizer_bytes'] / 1e6:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
