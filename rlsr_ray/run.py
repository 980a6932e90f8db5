"""`python -m rlsr_ray.run [PRESET] [--section.key=value ...]`: the RLSR driver.

Joins a running Ray cluster (RAY_ADDRESS, `ray job submit`, or `ray start` on this machine) or
starts a local one bound to 127.0.0.1, builds the four pools, evaluates the held-out prompts,
trains, saves an HF checkpoint, evaluates again, and writes summary.json beside metrics.jsonl.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from actors.pool import WORKER_ENV
from rlsr_ray.config import Config, ConfigError, load_config, pool_device, preset_names, uses_weight_route

log = logging.getLogger("rlsr_ray")

USAGE = """usage: python -m rlsr_ray.run [PRESET] [--section.key=value ...]

PRESET is a shipped preset ({presets}) or a path to a YAML file; default: 'default'.
Overrides use dotted keys, e.g. --run.steps=10 --run.output_dir=out --data.path=my.jsonl
Sections: model, data, rollout, algo, train, pools.<role>, ray, reward_service, sft, run (see README,
"Configuration")."""


def running_cluster_address() -> str | None:
    """The address `ray start` recorded on this machine, if its GCS still answers.

    Ray's own address="auto" trusts the record and hangs for minutes on a cluster that died
    without `ray stop`; a two-second TCP probe tells live from stale.
    """
    record = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip()
        host, _, port = address.rpartition(":")
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except (OSError, ValueError):
        return None
    return address


_LOCAL_RAY = False  # the Ray this process is connected to is one connect_ray started


def connect_ray(cfg: Config) -> bool:
    """Join a cluster if one is reachable, else start a local one. Returns True if started here."""
    global _LOCAL_RAY
    from rlsr_ray.plan import local_num_cpus

    if cfg.ray.address == "local":
        address = None
    else:
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or running_cluster_address()
    if not address:
        _single_node_mode()
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        _LOCAL_RAY = False
        log.info("joined the running Ray cluster at %s", address)
        return False
    env = dict(WORKER_ENV)
    if sys.platform == "linux":
        # Gloo binds its pairs to the address the host name resolves to, on some machines a
        # routable one; every rank of a local Ray is on this machine.
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    ray.init(address="local", num_cpus=local_num_cpus(cfg), include_dashboard=False, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": env})
    _LOCAL_RAY = True
    log.info("started a local Ray instance with %d logical CPUs", local_num_cpus(cfg))
    return True


def on_local_ray() -> bool:
    """Whether this process is connected to a local Ray that connect_ray started (it goes away
    with the command), not to a cluster it joined."""
    import ray

    return _LOCAL_RAY and ray.is_initialized()


def _single_node_mode() -> None:
    """Make a Ray started here listen on loopback only: no dashboard or job API, and no port on the
    machine's network addresses. ray.init replaces a requested 127.0.0.1 node address with the
    routable one unless Ray runs single-node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Ray's own
    processes read that variable when they start; this process read it when it first imported ray,
    which a command may have done already (rlsr_ray.sft imports Ray Train first), so the value it
    then took is set too: Ray looks it up at each call (ray._private.services.get_node_ip_address)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def learner_settings(cfg: Config, lr: float, micro_steps: int):
    """The learner's settings from the config (rlsr_ray.sft passes its own learning rate)."""
    from actors.learner import LearnerSettings
    from rlsr_ray.loss import LossSettings

    a, t = cfg.algo, cfg.train
    return LearnerSettings(
        lr=lr, adam_betas=t.adam_betas, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
        zero_stage=t.zero_stage, micro_batch_size=t.micro_batch_size, micro_steps=micro_steps,
        loss=LossSettings(a.clip_eps, a.kl_coef, a.kl_estimator, a.loss_aggregation),
        temperature=_temperature(cfg), compute_dtype=cfg.model.compute_dtype,
        recompute_old_logprobs=a.recompute_old_logprobs, seed=cfg.run.seed, optimizer=t.optimizer,
    )


def learner_pool(cfg: Config, policy_path: str):
    """The learner pool's actors, created (they load the policy) but not yet in a group."""
    from actors.learner import LearnerActor
    from actors.pool import Pool
    from rlsr_ray.plan import step_plan

    p = cfg.pools.learner
    plan = step_plan(cfg)
    settings = learner_settings(cfg, cfg.train.lr, plan.micro_steps)
    # No Ray restarts: a learner group is rebuilt whole and reloaded from a checkpoint (trainer.py).
    return Pool("learner", LearnerActor, p, dict(
        policy_path=policy_path, settings=settings, world_size=plan.learner_world_size,
        device=pool_device(p), torch_threads=p.torch_threads, cache_dir=cfg.model.cache_dir),
        ray_restarts=False, **_timeouts(cfg))


def start_setup(learner):
    """Start the learners' DeepSpeed setup in one group; returns the pending setup. The
    rendezvous call waits for every learner's constructor (the policy loaded)."""
    meet = learner.call("rendezvous", [()] * learner.size)[0]  # rank 0's choice for everyone
    return learner.broadcast("setup", meet)


def _temperature(cfg: Config) -> float:
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


def _timeouts(cfg: Config) -> dict[str, float]:
    return dict(placement_timeout_s=cfg.ray.placement_timeout_s, call_timeout_s=cfg.ray.call_timeout_s)


def rollout_pool(cfg: Config, policy_path: str):
    from actors.pool import Pool
    from actors.rollout import RolloutActor

    p, r = cfg.pools.rollout, cfg.rollout
    return Pool("rollout", RolloutActor, p, dict(
        policy_path=policy_path, backend=r.backend, compute_dtype=cfg.model.compute_dtype,
        device=pool_device(p), torch_threads=p.torch_threads, generate_batch_size=r.generate_batch_size,
        vllm_gpu_memory_utilization=r.vllm_gpu_memory_utilization, seed=cfg.run.seed), **_timeouts(cfg))


def reward_pool(cfg: Config, reward_path: str):
    """The reward pool, or the shared reward service when reward_service.enabled."""
    from actors.pool import Pool
    from actors.reward import RewardActor
    from rlsr_ray.reward import PenaltyRule

    p, a = cfg.pools.reward, cfg.algo
    if cfg.reward_service.enabled:
        from rlsr_ray import reward_service

        return reward_service.connect(cfg, pool_device(p))
    return Pool("reward", RewardActor, p, dict(
        model_path=reward_path, rule=PenaltyRule(a.lcs_min_chars, a.lcs_min_fraction, a.lcs_penalty),
        device=pool_device(p), torch_threads=p.torch_threads), **_timeouts(cfg))


def build_pools(cfg: Config, policy_path: str, reward_path: str):
    from actors.pool import Pool
    from actors.reference import ReferenceActor
    from rlsr_ray.step import Pools
    from rlsr_ray.plan import step_plan

    p, t = cfg.pools, cfg.train
    # Every pool's actors are created before the first call to any of them, so all load at once
    # (the learners' rendezvous waits for their constructors); the learners' setup then proceeds
    # while the others finish loading.
    learner = learner_pool(cfg, policy_path)
    rollout = rollout_pool(cfg, policy_path)
    reward = reward_pool(cfg, reward_path)
    reference = Pool("reference", ReferenceActor, p.reference, dict(
        policy_path=policy_path, compute_dtype=cfg.model.compute_dtype, device=pool_device(p.reference),
        torch_threads=p.reference.torch_threads, micro_batch_size=t.micro_batch_size,
        temperature=_temperature(cfg)), **_timeouts(cfg))
    learner.get(start_setup(learner), "setup")
    pools = Pools(rollout, reward, reference, learner, route=weight_route(cfg),
                  defer_loads=cfg.algo.max_staleness >= 2)
    if pools.route is not None and pools.route.usable(learner, rollout):
        pools.route.open(learner, rollout)  # both start from the same policy: nothing to send yet
    return pools, step_plan(cfg)


def weight_route(cfg: Config):
    from rlsr_ray.weight_route import WeightRoute

    r, p = cfg.rollout, cfg.pools
    if not uses_weight_route(cfg):
        return None
    backend = r.weight_sync_backend
    if backend == "auto":
        backend = "nccl" if pool_device(p.learner) == "cuda" and pool_device(p.rollout) == "cuda" else "gloo"
    return WeightRoute(backend, int(r.weight_bucket_mb * 1e6), r.weight_sync_timeout_s)


def prepare_data(cfg: Config, policy_path: str):
    from rlsr_ray import data
    from rlsr_ray.policy import load_tokenizer

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
    from rlsr_ray import checkpoint, data, trainer
    from rlsr_ray.heldout import heldout_similarity, paired_delta
    from rlsr_ray.models import resolve_policy, resolve_reward_model
    from rlsr_ray.policy import describe_compute_dtype

    t_start = time.perf_counter()
    out = Path(cfg.run.output_dir).expanduser()
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})

    # Every input is checked before anything is written or started: bad input leaves no trace.
    policy_path = resolve_policy(cfg.model.policy, cfg.model.cache_dir)
    reward_path = resolve_reward_model(cfg.model.reward_model)
    train_tok, heldout_tok = prepare_data(cfg, policy_path)
    log.info("data: %d training prompts, %d held out (%d truncated, %d dropped)", len(train_tok.prompt_ids),
             len(heldout_tok.prompt_ids) if heldout_tok else 0, train_tok.truncated, train_tok.dropped)
    found = trainer.find_resume(cfg, out, policy_path)
    log.info(describe_compute_dtype(cfg.model.compute_dtype))

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    remote = cfg.reward_service.enabled or any(
        getattr(cfg.pools, r).num_actors > 0 for r in ("rollout", "reward", "reference", "learner"))
    started = connect_ray(cfg) if remote else False
    pools = None
    try:
        pools, plan = build_pools(cfg, policy_path, reward_path)
        t_restore = time.perf_counter()
        resume = trainer.restore(cfg, pools, out, found)
        summary: dict[str, Any] = {"setup_s": time.perf_counter() - t_start, "resumed_from_step": resume.step}
        if found is not None:
            summary["restore_s"] = time.perf_counter() - t_restore  # learners load it, rollout gets the weights
        heldout = data.prompts_table(heldout_tok, list(range(len(heldout_tok.prompt_ids))), 0) \
            if heldout_tok and cfg.run.eval_before_after else None
        before = trainer.baseline_eval(pools, heldout, cfg.run.eval_max_new_tokens, out) \
            if heldout is not None else None
        def rebuild_learners():
            learner = learner_pool(cfg, policy_path)
            learner.get(start_setup(learner), "setup")
            return learner

        rows, saving = trainer.train_loop(cfg, pools, plan, train_tok, out, resume, policy_path, rebuild_learners)
        summary.update(trainer.throughput(rows), **saving,
                       final_checkpoint=str(checkpoint.step_dir(out, cfg.run.steps)))
        if before is not None:
            after = heldout_similarity(pools, heldout, cfg.run.eval_max_new_tokens)
            summary["heldout"] = paired_delta(before["similarity"], after["similarity"])
            summary["heldout"]["length_before"] = sum(before["lengths"]) / len(before["lengths"])
            summary["heldout"]["length_after"] = sum(after["lengths"]) / len(after["lengths"])
            (out / "heldout_eval.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    finally:
        for p in pools.all() if pools else []:
            p.shutdown()
        if started:
            import ray

            ray.shutdown()
    summary["total_s"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
        print(USAGE.format(presets=", ".join(preset_names())))
        return 0
    from rlsr_ray.cli import split_preset

    preset, argv = split_preset(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(preset, argv)
    except ConfigError as e:
        print(f"rlsr_ray: error: {e}", file=sys.stderr)
        return 2
    from actors.pool import PoolTimeout
    from rlsr_ray.checkpoint import CheckpointError
    from rlsr_ray.data import DataError
    from rlsr_ray.models import ModelError

    try:
        summary = run(cfg)
    except (DataError, ModelError, CheckpointError) as e:
        print(f"rlsr_ray: error: {e}", file=sys.stderr)
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
