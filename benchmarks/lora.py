"""Full fine-tuning against LoRA on the default preset: learner states, sync cost, speed, learning.

Two parts, each variant in a fresh process:

- `states`: a LearnerActor as the default preset builds it (SmolLM2-135M-Instruct, ZeRO-0, AdamW),
  one update on a synthetic 16 x (64 + 48) mini-batch, then the bytes of its weights, gradients and
  optimizer states (sums of the tensors' nbytes), and one sync: export_weights (what the object
  store carries) and a transformers rollout backend's load_weights, timed.
- `runs`: `python -m rlsr_ray.run default` with and without `train.lora` (36 steps), reading
  summary.json (samples/s, held-out similarity before -> after) and metrics.jsonl (bytes and
  seconds per sync).

    python benchmarks/lora.py --out benchmarks/results/lora_cpu.json [--parts states,full,lora]
        [--lora-lr 3e-5,2e-4] [--rank 16]

`--lora-lr` takes one or more learning rates (a LoRA run each; default: the preset's). Parts not
run keep their figures from an existing `--out` file, so one variant can be re-measured alone.

Each state and run records `cpu` (torch's CPU capability string) and `date`: state them with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: actors/ beside rlsr_ray/
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def states(lora_rank: int) -> dict:
    """One learner's states after one update, and one sync's bytes and seconds (in this process)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learner_memory import _table

    from actors.hf_backend import TransformersBackend
    from actors.learner import LearnerActor
    from rlsr_ray.config import load_config
    from rlsr_ray.driver.pools import learner_settings
    from rlsr_ray.modeling.models import resolve_policy
    from rlsr_ray.modeling.policy import load_tokenizer, set_threads

    set_threads(2)
    extra = ["--train.lora.enabled=true", f"--train.lora.rank={lora_rank}", "--pools.reference.num_actors=0"] \
        if lora_rank else []
    cfg = load_config("default", extra)
    policy = resolve_policy(cfg.model.policy, cfg.model.cache_dir)
    s = learner_settings(cfg, cfg.train.lr, 1)
    lrn = LearnerActor(policy, s, torch_threads=2)
    lrn.setup(lrn.rendezvous())
    table = _table(16, 64, 48)
    lrn.train_step([table], [float(16 * 48)])
    model = lrn.engine.module
    params = list(model.parameters())
    opt = lrn.engine.optimizer
    moments = sum(t.nbytes for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
    out = {
        "variant": f"lora_r{lora_rank}" if lora_rank else "full",
        "parameters": sum(p.numel() for p in params),
        "trained_parameters": sum(p.numel() for p in params if p.requires_grad),
        "weights_bytes": sum(p.nbytes for p in params),
        "gradient_bytes": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_state_bytes": moments,
    }
    out["learner_state_bytes"] = out["weights_bytes"] + out["gradient_bytes"] + out["optimizer_state_bytes"]
    t0 = time.perf_counter()
    sent = lrn.export_weights()
    out["export_s"] = time.perf_counter() - t0
    out["sync_bytes"] = sum(v.nbytes for v in sent.values())
    backend = TransformersBackend(policy, load_tokenizer(policy), "float32", "cpu", 16, s.lora)
    t0 = time.perf_counter()
    backend.load_weights(sent)
    out["load_s"] = time.perf_counter() - t0
    return out


def run(out_dir: Path, extra: list[str]) -> dict:
    """One `rlsr_ray.run default` with these overrides; its summary and per-sync figures."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "default", f"--run.output_dir={out_dir}",
                           "--run.progress=false", *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rlsr_ray.run {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    syncs = [r for r in rows if "weight_sync_mb" in r]
    h = summary.get("heldout", {})
    import torch

    # Each run's own machine class and date: parts re-measured later may come from another machine.
    return {"overrides": extra, "cpu": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d"),
            "wall_s": time.perf_counter() - t0, "samples_per_s": summary["samples_per_s"],
            "sync_mb": sum(r["weight_sync_mb"] for r in syncs) / len(syncs),
            "sync_s": sum(r["weight_sync_s"] for r in syncs) / len(syncs),
            "train_s_per_step": sum(r["train_s"] for r in syncs) / len(syncs),
            "heldout_before": h.get("before_mean"), "heldout_after": h.get("after_mean"),
            "heldout_delta": h.get("delta_mean"), "heldout_delta_se": h.get("delta_se"), "heldout_z": h.get("z")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="states,full,lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-lr", default=None, help="train.lr of the LoRA runs, comma-separated (default: the preset's)")
    ap.add_argument("--work", default="outputs/bench_lora")
    ap.add_argument("--states-of", type=int, default=None, help=argparse.SUPPRESS)  # one fresh process's part
    args = ap.parse_args()
    if args.states_of is not None:
        print(json.dumps(states(args.states_of)))
        return 0
    import torch

    out = Path(args.out)
    result: dict = json.loads(out.read_text()) if out.exists() else {}
    result["rank"] = args.rank
    parts = args.parts.split(",")
    if "states" in parts:
        result["states"] = []
        for rank in (0, args.rank):
            proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--states-of", str(rank)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            result["states"].append({**json.loads(proc.stdout.strip().splitlines()[-1]),
                                     "cpu": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")})
    work = Path(args.work)
    runs = {json.dumps(r["overrides"]): r for r in result.get("runs", [])}
    if "full" in parts:
        r = run(work / "full", [])
        runs[json.dumps(r["overrides"])] = r
    if "lora" in parts:
        lora = ["--train.lora.enabled=true", f"--train.lora.rank={args.rank}", "--pools.reference.num_actors=0"]
        for lr in (args.lora_lr.split(",") if args.lora_lr else [None]):
            extra = lora + ([f"--train.lr={float(lr)}"] if lr else [])
            r = run(work / (f"lora_r{args.rank}" + (f"_lr{lr}" if lr else "")), extra)
            runs[json.dumps(r["overrides"])] = r
    result["runs"] = list(runs.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
