"""`python -m rlsr_ray.sft [PRESET] [--section.key=value ...]`: supervised fine-tuning on Ray Train.

The same config, presets and data formats as `rlsr_ray.run`. The policy learns the reference
answers of the training split (the held-out split stays out): cross-entropy on the answer tokens
only, the prompt masked (actors/objectives.SFT). Workers are Ray Train workers placed like
pools.learner; each runs the learner pool's own DeepSpeed engine (a LearnerActor, its group met as
the learner pool's meets: rank 0's rendezvous, handed to the others by Ray Train), so SFT and
RLSR train through the same code. Each global batch is
sorted by length before it is split over workers and micro-batches, so padding stays small. The
result is an HF folder, `<run.output_dir>/final`, that `rlsr_ray.run --model.policy=PATH` and
plain transformers load.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlsr_ray.config import Config, ConfigError, load_config, pool_device

log = logging.getLogger("rlsr_ray")

USAGE = """usage: python -m rlsr_ray.sft [PRESET] [--section.key=value ...]

Supervised fine-tuning of model.policy on the reference answers of the training split; writes
<run.output_dir>/final. PRESET: {presets} or a YAML path. Keys: sft.steps, sft.batch_examples,
sft.lr, sft.max_answer_tokens, sft.save_every, sft.storage_path, sft.max_failures, plus train.*,
pools.learner.*, data.*, run.output_dir, run.seed, run.keep_checkpoints and run.resume (auto: go on
from the newest SFT run's newest checkpoint)."""


def sft_rows(cfg: Config, policy_path: str) -> pa.Table:
    """SFT rows of the training split: prompt ids as rlsr_ray.run builds them (an overlong prompt
    dropped or cut by data.prompt_overflow, as there), answer ids + EOS. An answer longer than
    sft.max_answer_tokens is cut and gets no EOS: ending it there would teach the policy to stop
    mid-answer."""
    from rlsr_ray.contract import batch
    from rlsr_ray import data
    from rlsr_ray.modeling.policy import load_tokenizer

    examples = data.load_examples(cfg.data.path)
    train, _ = data.split_heldout(examples, cfg.data.heldout_size, cfg.data.shuffle_seed)
    tok = load_tokenizer(policy_path)
    d = cfg.data
    t = data.tokenize(train, tok, d.max_prompt_tokens, d.prompt_overflow, d.system_prompt)
    if t.dropped or t.truncated:
        log.info("sft: %d prompt(s) longer than data.max_prompt_tokens=%d %s", t.dropped or t.truncated,
                 d.max_prompt_tokens, "dropped" if t.dropped else "cut to their last tokens")
    limit = cfg.sft.max_answer_tokens
    answers, cut = [], 0
    for reference in t.references:  # paired with t.prompt_ids: tokenize keeps or drops both together
        ids = list(tok(reference, add_special_tokens=False)["input_ids"])
        if len(ids) >= limit:
            answers.append(ids[:limit])
            cut += 1
        else:
            answers.append(ids + [tok.eos_token_id])
    if cut:
        log.info("sft: %d answer(s) cut to sft.max_answer_tokens=%d, without EOS", cut, limit)
    table = pa.table({"group_id": pa.array(range(len(answers)), pa.int64()),
                      "prompt_ids": pa.array(t.prompt_ids, pa.list_(pa.int32())),
                      "response_ids": pa.array(answers, pa.list_(pa.int32()))})
    return batch.check(table, batch.SFT, "sft rows")


def worker_shares(rows: pa.Table, indices: list[int], world: int, micro_batch_size: int
                  ) -> tuple[list[pa.Table], float, int]:
    """One global batch: its rows sorted by length and cut into one contiguous share per worker,
    the batch's answer-token count (the loss normaliser on every worker), and the passes each
    worker makes (the most any needs)."""
    from rlsr_ray.contract import batch

    b = rows.take(pa.array(indices, pa.int64()))
    answers = pc.list_value_length(b.column("response_ids")).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(b.column("prompt_ids")).to_numpy(zero_copy_only=False) + answers
    b = b.take(pa.array(np.argsort(lengths, kind="stable"), pa.int64()))
    shares = batch.split(b, world)
    tokens = float(answers.sum())
    return shares, tokens, max(math.ceil(len(s) / micro_batch_size) for s in shares)


def _worker(job: dict[str, Any]) -> None:
    """One Ray Train worker: a LearnerActor in a group met at rank 0's rendezvous (the learner
    pool's own: a file store on a local Ray, whose ports all stay on loopback), SFT steps from the newest
    checkpoint Ray Train holds for this run (none: from the start) to job["steps"]."""
    import ray
    import ray.train
    from ray.train import Checkpoint
    from ray.train.collective import broadcast_from_rank_zero

    from actors.learner import LearnerActor
    from rlsr_ray import data
    from rlsr_ray.tracking.metrics import MetricsWriter, truncate_metrics

    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(job["device"])
    lrn = LearnerActor(job["policy"], job["settings"], world_size=world, device=device,
                       torch_threads=job["threads"], cache_dir=job["cache_dir"], rank=rank)
    lrn.setup(broadcast_from_rank_zero(lrn.rendezvous() if rank == 0 else None))
    start, cursor_state = 0, {}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:  # a restarted worker group, or run.resume: weights, optimizer, RNG, cursor
        with resumed.as_directory() as folder:
            state = lrn.load_checkpoint(folder)
        start, cursor_state = int(state["step"]), state["cursor"]
        print(f"sft worker {rank}: resumed from step {start} ({resumed.path})", flush=True)
    rows: pa.Table = ray.get(job["rows"])  # through the object store, not pickled into every worker's config
    cursor = data.PromptCursor(len(rows), job["seed"], **cursor_state)
    out = Path(job["output_dir"])
    writer = None
    if rank == 0:
        truncate_metrics(out, start)  # lines past the checkpoint belong to the attempt that died
        writer = MetricsWriter(out)  # the driver forwards its rows to the trackers (MetricsTail)
    for step in range(start, job["steps"]):
        t0 = time.perf_counter()
        shares, tokens, passes = worker_shares(rows, cursor.next_indices(job["batch"]), world,
                                               job["settings"].micro_batch_size)
        stats = lrn.sft_step([shares[rank]], [tokens], [passes])
        nll, counted = _summed(stats["nll_sum"], stats["tokens"], world, device)  # the batch's, not a share's
        row = {"step": step + 1, "loss": nll / max(counted, 1.0), "tokens": counted,
               "skipped": stats["skipped"], "grad_norm": stats.get("grad_norm", float("nan")),
               "step_s": time.perf_counter() - t0}
        if writer is not None:
            writer.write(row)
            if job["progress"]:  # the driver's log shows it (log_to_driver), as rlsr_ray.run's bar does
                print(progress_line(row, job["steps"], stats["skip_reasons"]), flush=True)
        last = step + 1 == job["steps"]
        if last or (job["save_every"] and (step + 1) % job["save_every"] == 0):
            staged = out / "sft_staging" / f"step_{step + 1}"  # every rank writes its optimizer shard here
            lrn.save_pretrained(str(staged), {"step": step + 1, "policy_version": step + 1,
                                              "cursor": cursor.state(), "reference_policy": job["policy"]})
            ckpt = Checkpoint.from_directory(str(staged)) if rank == 0 else None
            ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=f"step_{step + 1}",
                             delete_local_checkpoint_after_upload=True)
        else:
            ray.train.report(row)
    if writer is not None:
        writer.close()
        shutil.rmtree(out / "sft_staging", ignore_errors=True)  # each checkpoint went to storage
    # Every rank (ZeRO-3 gathers); rank 0 writes. Under LoRA: the adapter, and merged/ beside it.
    lrn.save_pretrained(job["final"], merged=True)


def quiet_ray_train_reports() -> None:
    """Ray Train logs "Reporting training result N: TrainingReport(...)" for every report, which
    the driver shows beside each step's own progress line; that one record alone is dropped."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).addFilter(
        lambda record: not str(record.msg).startswith("Reporting training result"))


def worker_device(device: str) -> str:
    """This worker's device: on GPUs the one Ray Train assigned it. Workers on one node share
    CUDA_VISIBLE_DEVICES (ray/train/v2/_internal/callbacks/accelerators.py), so plain "cuda"
    would put all of them on the node's first GPU."""
    if not device.startswith("cuda"):
        return device
    import ray.train.torch

    return str(ray.train.torch.get_device())


def progress_line(row: dict[str, Any], steps: int, skip_reasons: list[str]) -> str:
    """One step's progress line. A skipped update has no gradient norm (its summed norm reads 0): the
    line says why it was skipped instead."""
    applied = (f"update skipped ({', '.join(sorted(set(skip_reasons)))})" if row["skipped"]
               else f"grad norm {row['grad_norm']:.3f}")
    return (f"sft step {row['step']}/{steps}: loss {row['loss']:.4f} over {row['tokens']:.0f} answer tokens, "
            f"{applied}, {row['step_s']:.1f}s")


def _summed(a: float, b: float, world: int, device: str) -> tuple[float, float]:
    import torch

    t = torch.tensor([a, b], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return float(t[0]), float(t[1])


def storage_root(cfg: Config, out: Path) -> str:
    return cfg.sft.storage_path or str(out / "ray_train")


def _fresh_name() -> str:
    now = time.time()  # milliseconds too: two runs started in one second must not share a name
    return time.strftime("sft-%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"


def _storage_fs(storage: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(),
                                                                       str(Path(storage).expanduser()))


def train_run_name(cfg: Config, storage: str) -> str:
    """The Ray Train run to write: a fresh name, or with run.resume the run to go on from
    ("auto": the newest one under the storage path that reported a checkpoint)."""
    resume = cfg.run.resume
    if resume in (None, "never"):
        return _fresh_name()
    import pyarrow.fs as pafs

    fs, root = _storage_fs(storage)
    if resume != "auto":
        if fs.get_file_info(f"{root}/{resume}").type != pafs.FileType.Directory:
            raise ConfigError(f"run.resume: no SFT run named {resume!r} under {storage}")
        return resume
    runs = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = sorted(i.base_name for i in runs if i.type == pafs.FileType.Directory and i.base_name.startswith("sft-"))
    for name in reversed(names):  # Ray Train's record of the checkpoints a run reported
        if fs.get_file_info(f"{root}/{name}/checkpoint_manager_snapshot.json").type == pafs.FileType.File:
            return name
    return _fresh_name()


def goes_on(storage: str, name: str) -> bool:
    """Whether the Ray Train run `name` exists already (run.resume found it): its tracking runs go on."""
    import pyarrow.fs as pafs

    fs, root = _storage_fs(storage)
    return fs.get_file_info(f"{root}/{name}").type == pafs.FileType.Directory


class SftError(RuntimeError):
    """Training failed on the workers; the message ends with the last line of the cause."""


def require_final(final: Path, name: str) -> None:
    """Worker rank 0 writes final/ where it runs; a driver on another node (the head of the
    shipped clusters, which `rlsr_ray.compare` reads it from) sees it only on shared storage."""
    if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
        raise SftError(f"SFT run {name} finished, but {final} is not on this machine: the workers wrote it on "
                       "their node; put run.output_dir on storage every node shares (e.g. NFS)")


def trainer(local_ray: bool, *args, **kwargs):
    """A Ray Train trainer that leaves the process group to the workers (Ray Train's TorchTrainer
    would meet them at a TCP store listening on every interface); on a local Ray that this command
    started, without Ray Train's PlacementGroupCleaner. The cleaner removes the workers' placement
    group should the training controller die, and asks the State API every second whether it still
    lives; the State API is served by the dashboard, which a local Ray started here does not run
    (docs/clusters.md). Each ask then fails slowly, and the controller waits for the cleaner's
    current ask to end before it returns (~12 s per SFT run) and floods the log with warnings. The
    placement group of a local Ray goes with that Ray when the command ends."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class Trainer(DataParallelTrainer):
        def _create_default_callbacks(self):
            found = super()._create_default_callbacks()
            return [c for c in found if not (local_ray and isinstance(c, PlacementGroupCleanerCallback))]

    return Trainer(*args, **kwargs)


def run(cfg: Config) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError

    from rlsr_ray import tracking
    from rlsr_ray.driver.pools import learner_settings
    from rlsr_ray.driver.ray_session import connect_ray, on_local_ray
    from rlsr_ray.tracking.metrics import truncate_metrics
    from rlsr_ray.modeling.models import resolve_policy
    from rlsr_ray.tracking.tail import MetricsTail

    t0 = time.perf_counter()
    out = Path(cfg.run.output_dir).expanduser().resolve()  # Ray Train needs an absolute storage path
    policy = resolve_policy(cfg.model.policy, cfg.model.cache_dir)
    if cfg.train.lora.enabled:  # adapters on layers the policy has, before any weights load
        from rlsr_ray.modeling.lora import LoraSpec, check_targets

        check_targets(policy, LoraSpec.from_config(cfg.train.lora))
    tracking.check_run(cfg)  # a tracking back end not installed or not answering: one line, nothing started
    rows = sft_rows(cfg, policy)
    s = cfg.sft
    storage = storage_root(cfg, out)
    name = train_run_name(cfg, storage)
    going_on = goes_on(storage, name)
    steps = s.steps or math.ceil(len(rows) / s.batch_examples)
    out.mkdir(parents=True, exist_ok=True)
    if not going_on:
        truncate_metrics(out, 0)  # a fresh run's rows only, for the trackers as for the file
    metrics = out / "metrics.jsonl"
    forwarded = metrics.read_text(encoding="utf-8").split("\n")[:-1] if going_on and metrics.exists() else []
    # Ray Train re-logs a worker's print() through its own logger, which Ray then shows beside the
    # printed line: every progress line twice. Ray Train passes this variable on to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    with tracking.for_run(cfg, out, "sft", resume=going_on) as trackers:
        started = connect_ray(cfg)
        import ray

        p = cfg.pools.learner
        settings = learner_settings(cfg, lr=s.lr, micro_steps=1)
        job = {"policy": policy, "settings": settings, "device": pool_device(p), "threads": p.torch_threads,
               "cache_dir": cfg.model.cache_dir, "rows": ray.put(rows), "seed": cfg.run.seed, "steps": steps,
               "batch": min(s.batch_examples, len(rows)), "save_every": s.save_every, "output_dir": str(out),
               "progress": cfg.run.progress,
               "final": str(out / "final")}
        workers = max(1, p.num_actors)
        resources = {"CPU": p.num_cpus, **({"GPU": p.num_gpus} if p.num_gpus else {}), **p.resources}
        sft_trainer = trainer(
            on_local_ray(), _worker, train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=p.num_gpus > 0,
                                         resources_per_worker=resources, accelerator_type=p.accelerator_type),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=s.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None)))
        log.info("sft: %d examples, %d steps of %d on %d worker(s); Ray Train run %s under %s", len(rows), steps,
                 job["batch"], workers, name, storage)
        # Only the driver logs: it forwards the rows rank 0 writes (the workers open no tracking run).
        tail = MetricsTail(metrics, trackers, forwarded).start() if trackers.trackers else None
        try:
            result = sft_trainer.fit()
        except TrainingFailedError as e:
            cause = str(e).strip().splitlines()
            raise SftError(f"SFT run {name} failed: {cause[-1] if cause else type(e).__name__}") from None
        finally:
            if tail is not None:
                tail.stop()
            if started:
                ray.shutdown()
        require_final(Path(job["final"]), name)
        for ckpt, reported in result.best_checkpoints or []:
            trackers.log_checkpoint(int(reported["step"]), ckpt.path)
        summary = {"final": job["final"], "examples": len(rows), "steps": steps, "workers": workers,
                   "ray_train_run": name, "storage_path": storage,
                   "checkpoint": result.checkpoint.path if result.checkpoint else None,
                   "total_s": time.perf_counter() - t0}
        if cfg.train.lora.enabled:  # final/ is the adapter (PEFT's format); merged/ in it the whole model
            summary["merged_model"] = str(Path(job["final"]) / "merged")
        (out / "sft_summary.json").write_text(json.dumps(summary, indent=1))
        trackers.finish(summary, [out / "sft_summary.json"])
    return summary


def main(argv: list[str] | None = None) -> int:
    from rlsr_ray.cli import command, split_preset
    from rlsr_ray.data import DataError
    from rlsr_ray.modeling.models import ModelError
    from rlsr_ray.tracking import TrackingError

    return command(argv, USAGE, lambda args: run(load_config(*split_preset(args))),
                   (ConfigError, DataError, ModelError, SftError, TrackingError))


if __name__ == "__main__":
    sys.exit(main())
