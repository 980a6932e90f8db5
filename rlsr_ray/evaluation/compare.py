"""`python -m rlsr_ray.compare [PRESET] [--section.key=value ...]`: the paper's comparison in one run.

On the same data and settings: base -> SFT (rlsr_ray.sft), base -> RLSR and SFT -> RLSR
(rlsr_ray.run), then all four checkpoints answer the same held-out prompts (rlsr_ray.eval), and
report.html shows the training curves and every eval metric with paired deltas against base and
against SFT (and win rates when eval.judge is set).

    <run.output_dir>/sft/ rlsr/ sft_rlsr/ eval/ figures/ report.html

An arm whose summary is already in its folder is kept, so a stopped comparison goes on where it
stopped (each arm also resumes from its own newest checkpoint); delete the folder to start over.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rlsr_ray.config import Config, ConfigError, load_config, with_values

log = logging.getLogger("rlsr_ray")

USAGE = """usage: python -m rlsr_ray.compare [PRESET] [--section.key=value ...]

Trains base -> SFT, base -> RLSR and SFT -> RLSR with PRESET ({presets}, or a YAML path), evaluates
the four policies on the held-out prompts and writes <run.output_dir>/report.html."""

# Pairs compared in the eval (X, Y): each trained arm against base and against SFT, and the two RL arms.
PAIRS = [("sft", "base"), ("rlsr", "base"), ("sft_rlsr", "base"), ("rlsr", "sft"), ("sft_rlsr", "sft"),
         ("sft_rlsr", "rlsr")]


def arm_configs(cfg: Config) -> dict[str, Config]:
    """The three training runs: each writes its own folder, starts where the paper's arm starts,
    and resumes from its own newest checkpoint. The RL arms skip their own before/after eval:
    the comparison's eval covers all four policies on the same prompts."""
    out = Path(cfg.run.output_dir).expanduser().resolve()
    group = tracking_group(cfg)
    rl = {"run.eval_before_after": False, "run.resume": "auto"}
    arms = {
        "sft": {"run.output_dir": str(out / "sft"), "run.resume": "auto"},
        "rlsr": {"run.output_dir": str(out / "rlsr"), **rl},
        "sft_rlsr": {"run.output_dir": str(out / "sft_rlsr"), "model.policy": sft_policy(cfg, out), **rl},
    }
    # One tracking run per arm, grouped (wandb's group, MLflow's parent run) under the comparison.
    return {name: with_values(cfg, {**values, "run.tracking_group": group, "run.tracking_run_name": f"{group}-{name}"})
            for name, values in arms.items()}


def tracking_group(cfg: Config) -> str:
    """The comparison's tracking group: run.tracking_group, else its output folder's name."""
    return cfg.run.tracking_group or Path(cfg.run.output_dir).expanduser().resolve().name


def sft_policy(cfg: Config, out: Path) -> str:
    """The SFT arm's result as a whole model: under train.lora its final adapter's merged folder,
    so the SFT+RLSR arm trains new adapters on (and takes as its reference) the SFT policy."""
    from rlsr_ray.modeling.lora import MERGED

    final = out / "sft" / "final"
    return str(final / MERGED if cfg.train.lora.enabled else final)


def compare(cfg: Config) -> dict[str, Any]:
    from rlsr_ray import sft, tracking
    from rlsr_ray.modeling.models import resolve_reward_terms
    from rlsr_ray.driver import run
    from rlsr_ray.driver.ray_session import connect_ray
    from rlsr_ray.evaluation import report
    from rlsr_ray.evaluation.eval import evaluate, load_prompts, make_judge
    from rlsr_ray.evaluation.lm_eval_tasks import check_tasks

    t0 = time.perf_counter()
    out = Path(cfg.run.output_dir).expanduser().resolve()
    arms = arm_configs(cfg)
    load_prompts(cfg)  # bad data, or a judge that cannot answer, fails before hours of training
    make_judge(cfg)
    check_tasks(cfg)  # so does a harness task that does not exist
    resolve_reward_terms(cfg)  # so does a reward term that cannot be imported
    tracking.check_run(cfg)  # and a tracking back end not installed or not answering
    timings: dict[str, float] = {}
    started = None  # one Ray for every arm, started when an arm is trained (eval connects itself)
    try:
        for name, arm_cfg in arms.items():
            done = out / name / ("sft_summary.json" if name == "sft" else "summary.json")
            if done.exists():
                log.info("compare: %s already trained (%s), kept", name, done)
                continue
            if started is None:
                started = connect_ray(cfg)
            t = time.perf_counter()
            log.info("compare: training %s", name)
            (sft.run if name == "sft" else run.run)(arm_cfg)
            timings[name] = time.perf_counter() - t
        finals = {"base": cfg.model.policy, "sft": sft_policy(cfg, out)}
        for name in ("rlsr", "sft_rlsr"):
            summary = json.loads((out / name / "summary.json").read_text())
            finals[name] = summary.get("merged_model", summary["final_checkpoint"])  # LoRA: the merged folder
        t = time.perf_counter()
        evaluate(with_values(cfg, {"eval.output_dir": str(out / "eval")}), list(finals.items()), PAIRS)
        timings["eval"] = time.perf_counter() - t
    finally:
        if started:
            import ray

            ray.shutdown()
    # Written before the report, which shows its timings and machine line.
    result: dict[str, Any] = {"report": str(out / "report.html"), "checkpoints": finals, "arm_s": timings,
                              "machine": machine(), "total_s": time.perf_counter() - t0}
    (out / "compare_summary.json").write_text(json.dumps(result, indent=1))
    report.build(out)
    track_report(cfg, out)
    return result


def track_report(cfg: Config, out: Path) -> None:
    """The comparison's own tracking run (the arms' group; on MLflow their parent run): the eval's
    numbers, and the report, its figures and both summaries as artifacts. TensorBoard has nothing
    to add: the report lies beside the arms' event files."""
    from rlsr_ray import tracking

    kinds = tuple(k for k in cfg.run.report_to if k not in ("tensorboard", "none"))
    if not kinds:
        return
    group = tracking_group(cfg)
    r = cfg.run
    with tracking.open_trackers(kinds, out, cfg.to_dict(), project=r.tracking_project, name=group, group=group,
                                mlflow_tracking_uri=r.mlflow_tracking_uri, resume=False,
                                job_type="report") as trackers:
        summary = json.loads((out / "eval" / "eval_summary.json").read_text())
        trackers.finish({"checkpoints": {n: {k: v for k, v in c.items() if k != "path"}
                                         for n, c in summary["checkpoints"].items()},
                         "deltas": summary["deltas"]},
                        [out / "report.html", out / "figures", out / "eval" / "eval_summary.json",
                         out / "compare_summary.json"])


def machine() -> str:
    """The CPU class every timing depends on (and the GPU, where there is one)."""
    import os
    import platform

    import torch

    from rlsr_ray.modeling.policy import cpu_has_fast_bf16

    name = platform.processor() or platform.machine()
    try:
        name = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = (f"{os.cpu_count()} CPUs ({name}), torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
           f"{'fast' if cpu_has_fast_bf16() else 'no fast'} bf16 (AMX / AVX512-BF16)")
    if torch.cuda.is_available():
        cpu += f", GPU {torch.cuda.get_device_name(0)}"
    return cpu


def main(argv: list[str] | None = None) -> int:
    from actors.pool import PoolTimeout
    from rlsr_ray.algo.terms import RewardTermError
    from rlsr_ray.checkpoint import CheckpointError
    from rlsr_ray.cli import command, split_preset
    from rlsr_ray.data import DataError
    from rlsr_ray.evaluation.judge import JudgeError
    from rlsr_ray.evaluation.harness import LmEvalError
    from rlsr_ray.modeling.models import ModelError
    from rlsr_ray.sft import SftError
    from rlsr_ray.tracking import TrackingError

    return command(argv, USAGE, lambda args: compare(load_config(*split_preset(args))),
                   (ConfigError, DataError, ModelError, CheckpointError, JudgeError, SftError, RewardTermError,
                    TrackingError, LmEvalError),
                   (PoolTimeout,))


if __name__ == "__main__":
    sys.exit(main())
