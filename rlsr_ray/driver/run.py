"""`python -m rlsr_ray.run [PRESET] [--section.key=value ...]`: the RLSR driver.

Joins a running Ray cluster (RAY_ADDRESS, `ray job submit`, or `ray start` on this machine) or
starts a local one bound to 127.0.0.1, builds the four pools, evaluates the held-out prompts,
trains, saves an HF checkpoint, evaluates again, and writes summary.json beside metrics.jsonl.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from actors.pool import WORKER_ENV
from rlsr_ray.config import Config, ConfigError, load_config, preset_names
from rlsr_ray.driver.elastic import release_capacity, request_capacity
from rlsr_ray.driver.pools import build_pools, rebuild_learner_group
from rlsr_ray.driver.ray_session import connect_ray

log = logging.getLogger("rlsr_ray")

USAGE = """usage: python -m rlsr_ray.run [PRESET] [--section.key=value ...]

PRESET is a shipped preset ({presets}) or a path to a YAML file; default: 'default'.
Overrides use dotted keys, e.g. --run.steps=10 --run.output_dir=out --data.path=my.jsonl
Sections: {sections}; every key, its type, default and meaning: docs/configuration.md, or
python -m rlsr_ray.config.reference."""


def prepare_data(cfg: Config, policy_path: str):
    from rlsr_ray import data
    from rlsr_ray.modeling.policy import load_tokenizer

    examples = data.load_examples(cfg.data.path)
    train_ex, heldout_ex = data.split_heldout(examples, cfg.data.heldout_size, cfg.data.shuffle_seed)
    tok = load_tokenizer(policy_path)
    d = cfg.data
    train_tok = data.tokenize(train_ex, tok, d.max_prompt_tokens, d.prompt_overflow, d.system_prompt)
    heldout_tok = data.tokenize(heldout_ex, tok, d.max_prompt_tokens, d.prompt_overflow, d.system_prompt) \
        if heldout_ex else None
    return train_tok, heldout_tok


def run(cfg: Config) -> dict[str, Any]:
    """Run a whole job; returns the summary also written to output_dir/summary.json."""
    from rlsr_ray import checkpoint
    from rlsr_ray import data
    from rlsr_ray.plan import memory_plan
    from rlsr_ray.driver import trainer
    from rlsr_ray.driver.heldout import heldout_similarity, paired_delta
    from rlsr_ray.config import reference_in_learner
    from rlsr_ray.modeling.lora import MERGED, LoraSpec, check_targets
    from rlsr_ray.modeling.models import resolve_policy, resolve_reward_terms
    from rlsr_ray.modeling.policy import describe_compute_dtype
    from rlsr_ray import tracking

    t_start = time.perf_counter()
    out = Path(cfg.run.output_dir).expanduser()
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})

    # Every input is checked before anything is written or started: bad input leaves no trace.
    policy_path = resolve_policy(cfg.model.policy, cfg.model.cache_dir)
    spec = LoraSpec.from_config(cfg.train.lora)
    if spec is not None:
        check_targets(policy_path, spec)  # adapters on layers the policy has, before any weights load
        if not reference_in_learner(cfg):
            log.info("train.lora with a reference pool: it holds a second copy of the base; "
                     "pools.reference.num_actors=0 computes the reference in the learners instead")
    memory_plan.check(cfg, policy_path)  # a pool over its device's memory is refused before anything starts
    tracking.check_run(cfg)  # a tracking back end not installed or not answering: one line, nothing started
    reward_terms = resolve_reward_terms(cfg)
    train_tok, heldout_tok = prepare_data(cfg, policy_path)
    log.info("data: %d training prompts, %d held out (%d truncated, %d dropped)", len(train_tok.prompt_ids),
             len(heldout_tok.prompt_ids) if heldout_tok else 0, train_tok.truncated, train_tok.dropped)
    found = trainer.find_resume(cfg, out, policy_path)
    log.info(describe_compute_dtype(cfg.model.compute_dtype))

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # The tracking runs close as failed if anything below raises (or Ctrl-C), finished after the summary.
    with tracking.for_run(cfg, out, "rlsr", resume=found is not None) as trackers:
        remote = cfg.reward_service.enabled or any(
            getattr(cfg.pools, r).num_actors > 0 for r in ("rollout", "reward", "reference", "learner"))
        started = connect_ray(cfg) if remote else False
        pools, asked = None, False
        try:
            asked = remote and request_capacity(cfg)
            pools, plan = build_pools(cfg, policy_path, reward_terms)
            t_restore = time.perf_counter()
            resume = trainer.restore(cfg, pools, out, found)
            summary: dict[str, Any] = {"setup_s": time.perf_counter() - t_start, "resumed_from_step": resume.step}
            if found is not None:
                summary["restore_s"] = time.perf_counter() - t_restore  # learners load it, rollout gets the weights
            heldout = data.prompts_table(heldout_tok, list(range(len(heldout_tok.prompt_ids))), 0) \
                if heldout_tok and cfg.run.eval_before_after else None
            before = trainer.baseline_eval(pools, heldout, cfg.run.eval_max_new_tokens, out) \
                if heldout is not None else None
            rows, saving = trainer.train_loop(cfg, pools, plan, train_tok, out, resume, policy_path,
                                              lambda at_most=None: rebuild_learner_group(cfg, policy_path, at_most),
                                              trackers)
            summary.update(trainer.throughput(rows), **saving,
                           final_checkpoint=str(checkpoint.step_dir(out, cfg.run.steps)))
            if spec is not None:  # the adapter's checkpoint holds the plain HF folder of the result
                summary["merged_model"] = str(checkpoint.step_dir(out, cfg.run.steps) / MERGED)
            if before is not None:
                after = heldout_similarity(pools, heldout, cfg.run.eval_max_new_tokens)
                summary["heldout"] = paired_delta(before["similarity"], after["similarity"])
                summary["heldout"]["length_before"] = sum(before["lengths"]) / len(before["lengths"])
                summary["heldout"]["length_after"] = sum(after["lengths"]) / len(after["lengths"])
                (out / "heldout_eval.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
        finally:
            for p in pools.all() if pools else []:
                p.shutdown()
            if asked:
                release_capacity()
            if started:
                import ray

                ray.shutdown()
        summary["total_s"] = time.perf_counter() - t_start
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        trackers.finish(summary, [out / "summary.json", out / "heldout_eval.json", out / "config.yaml"])
    return summary


def interrupted_message(cfg: Config) -> str:
    """One line for Ctrl-C: how far the run got, the newest checkpoint, how to go on from it."""
    from rlsr_ray import checkpoint

    out = Path(cfg.run.output_dir).expanduser()
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        reached = json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        reached = 0
    newest = checkpoint.latest(out)
    if newest is None:
        return f"rlsr_ray: interrupted after step {reached}; no checkpoint written yet (run.save_every)"
    return (f"rlsr_ray: interrupted after step {reached}; newest checkpoint {newest}; resume with the same "
            f"command plus --run.resume=auto --run.output_dir={out}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        import dataclasses

        sections = ", ".join("pools.<role>" if f.name == "pools" else f.name for f in dataclasses.fields(Config))
        print(USAGE.format(presets=", ".join(preset_names()), sections=sections))
        return 0
    from rlsr_ray.cli import error_line, split_preset

    preset, argv = split_preset(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(preset, argv)
    except ConfigError as e:
        print(f"rlsr_ray: error: {e}", file=sys.stderr)
        return 2
    from actors.pool import PoolTimeout
    from rlsr_ray.algo.terms import RewardTermError
    from rlsr_ray.checkpoint import CheckpointError
    from rlsr_ray.data import DataError
    from rlsr_ray.plan.memory_plan import PlanError
    from rlsr_ray.modeling.models import ModelError
    from rlsr_ray.tracking import TrackingError

    try:
        summary = run(cfg)
    except (DataError, ModelError, CheckpointError, RewardTermError, PlanError, TrackingError) as e:
        print(f"rlsr_ray: error: {error_line(e)}", file=sys.stderr)
        return 2
    except PoolTimeout as e:
        print(f"rlsr_ray: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted_message(cfg), file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
