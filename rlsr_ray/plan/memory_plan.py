"""The memory plan: per pool, what one device holds at the config's worst micro-batch, against the
device's memory, before anything starts (`python -m rlsr_ray.plan PRESET [overrides]`; run.py
refuses a plan over its device). The bytes come from rlsr_ray/plan/memory.py."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rlsr_ray.config import Config, PoolConfig, pool_device
from rlsr_ray.plan.memory import GB, Batch, ModelShape, learner_activation_bytes, reference_activation_bytes, state_bytes

# One device's memory by Ray's accelerator_type label. Ray's "A100" covers both A100s: the smaller.
ACCELERATOR_GB = {"A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "L4": 24, "A10G": 24,
                  "L40S": 48, "T4": 16, "V100": 16}
# Held on every CUDA device beyond tensors: the CUDA context (~0.5 GB) and NCCL's buffers.
RESERVED_GB = 1.5

# The decoder shapes of the models the presets name (their config.json), so a plan needs no
# download; any other model is read from its local folder.
KNOWN_SHAPES = {
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-32b": dict(num_hidden_layers=64, hidden_size=5120, intermediate_size=27648, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "llama-3.1-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


class PlanError(ValueError):
    """A pool's plan does not fit its device."""


def model_shape(policy: str) -> ModelShape | None:
    """The policy's shape: its local config.json, else the table above; None when neither knows."""
    path = os.path.join(os.path.expanduser(_model(policy)), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return ModelShape.from_config(json.load(f))
    name = policy.rstrip("/").split("/")[-1].lower().removesuffix("-instruct")
    known = KNOWN_SHAPES.get(name)
    return ModelShape.from_config(known) if known else None


@dataclass
class PoolPlan:
    role: str
    device: str  # "cuda" or "cpu"
    parts: dict[str, float] = field(default_factory=dict)  # bytes on one device, by component
    capacity_gb: float | None = None  # the device's memory, where known
    notes: list[str] = field(default_factory=list)
    fix: str = ""  # the settings that lower the largest part
    problem: str = ""  # a reason it cannot run other than its total (vLLM's KV cache too small)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def reserved_gb(self) -> float:
        return RESERVED_GB if self.device == "cuda" else 0.0

    def over(self) -> bool:
        return bool(self.problem) or (self.capacity_gb is not None and
                                      self.total / GB > self.capacity_gb - self.reserved_gb)

    def refusal(self) -> str:
        """One line: the pool, the figure, the settings to change."""
        name, biggest = max(self.parts.items(), key=lambda kv: kv[1])
        what = self.problem or (f"{self.total / GB:.3g} GB planned per device, over its {self.capacity_gb:.3g} GB "
                                f"(less {self.reserved_gb:.1f} GB reserved); largest: {name} {biggest / GB:.1f} GB")
        return f"pool {self.role}: {what}; change {self.fix} (python -m rlsr_ray.plan shows the whole plan)"


def device_gb(p: PoolConfig) -> float | None:
    if p.device_memory_gb is not None:
        return p.device_memory_gb
    return ACCELERATOR_GB.get(p.accelerator_type or "") if pool_device(p) == "cuda" else None


def _dtype_bytes(cfg: Config, device: str) -> int:
    """Activation bytes: bfloat16 where it is asked for, or by 'auto' on CUDA; float32 otherwise
    (on CPU 'auto' depends on the machine, and float32 is the larger)."""
    d = cfg.model.compute_dtype
    return 2 if d == "bfloat16" or (d == "auto" and device == "cuda") else 4


def _attention(cfg: Config) -> str:
    a = cfg.model.attn_implementation
    return "sdpa" if a == "auto" else a  # auto's flash-attn depends on the node; sdpa is the larger


def _sequence(cfg: Config) -> int:
    """The longest sequence a run makes: the prompt limit plus the answer limit (max_model_len)."""
    return cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens


def _batch(cfg: Config, rows: int) -> Batch:
    return Batch(rows, _sequence(cfg), cfg.rollout.max_new_tokens, padded=rows > 1)


def learner_plan(cfg: Config, s: ModelShape) -> PoolPlan:
    p, t = cfg.pools.learner, cfg.train
    dev = pool_device(p)
    b = _dtype_bytes(cfg, dev)
    weights_bytes = 2 if dev == "cuda" and b == 2 and t.zero_stage > 0 else 4  # DeepSpeed's bf16 mode, else float32
    world = max(1, p.num_actors)
    trained = s.lora_params(t.lora.rank, t.lora.target_modules) if t.lora.enabled else None
    what = f"ZeRO-{t.zero_stage}, {world} learners" + (f", LoRA rank {t.lora.rank}" if trained else "")
    parts = {f"{k} ({what})": v for k, v in state_bytes(
        s, t.zero_stage, world, weights_bytes, t.optimizer, t.offload_optimizer, t.offload_params,
        trained).items() if k != "total"}
    if weights_bytes == 4 and b == 2:
        parts["autocast's bf16 weight copies"] = 2 * s.params
    if t.zero_stage == 3:
        parts["ZeRO-3 gathered layers (current + prefetched)"] = 2 * (s.params / s.layers) * weights_bytes
    rows = t.micro_batch_size if t.max_tokens_per_micro_batch <= 0 else \
        max(1, min(t.micro_batch_size, t.max_tokens_per_micro_batch // _sequence(cfg)))  # full-length rows in the budget
    m = _batch(cfg, rows)
    act = learner_activation_bytes(s, m, b, _attention(cfg), t.gradient_checkpointing, t.logprob_chunk_tokens, dev)
    parts[f"activations kept ({rows} x {m.width} tokens)"] = act["total"] - act["working"]
    parts["backward working set (largest layer or logits chunk)"] = act["working"]
    plan = PoolPlan("learner", dev, parts, device_gb(p))
    if trained:
        plan.notes.append(f"LoRA: {trained / 1e6:,.1f}M adapter parameters train ({trained / s.params:.2%} of "
                          f"{s.params / 1e6:,.0f}M); the reference is this base, adapters off")
    states = plan.total - act["total"]
    plan.fix = ("train.gradient_checkpointing=true, train.logprob_chunk_tokens=1024 or a smaller "
                "train.micro_batch_size (or train.max_tokens_per_micro_batch)"
                if act["total"] > states else
                "a higher train.zero_stage, more pools.learner.num_actors or train.offload_optimizer=true")
    return plan


def reference_plan(cfg: Config, s: ModelShape) -> PoolPlan:
    p, t = cfg.pools.reference, cfg.train
    dev = pool_device(p)
    b = _dtype_bytes(cfg, dev)
    w = 2 if dev == "cuda" and b == 2 else 4  # bf16 weights on CUDA (actors/reference.py)
    m = _batch(cfg, t.micro_batch_size)
    act = reference_activation_bytes(s, m, b, _attention(cfg), t.logprob_chunk_tokens, dev)
    parts = {"weights": w * s.params, f"scoring pass ({t.micro_batch_size} x {m.width} tokens)": act["total"]}
    plan = PoolPlan("reference", dev, parts, device_gb(p))
    plan.fix = "train.logprob_chunk_tokens=1024 or a smaller train.micro_batch_size"
    return plan


def rollout_plan(cfg: Config, s: ModelShape) -> PoolPlan:
    p, r = cfg.pools.rollout, cfg.rollout
    dev = pool_device(p)
    cap = device_gb(p)
    seq = _sequence(cfg)
    if r.backend != "vllm":
        b = _dtype_bytes(cfg, dev)
        kv = r.generate_batch_size * seq * s.kv_cache_bytes_per_token(b)
        plan = PoolPlan("rollout", dev, {"weights": 4 * s.params, f"KV cache ({r.generate_batch_size} x {seq})": kv,
                                         "logits": r.generate_batch_size * s.vocab * 4 * 2}, cap)
        plan.fix = "a smaller rollout.generate_batch_size"
        return plan
    tp = r.vllm_tensor_parallel_size
    weights = 2 * s.params / tp
    plan = PoolPlan("rollout", dev, {f"weights (bf16, tensor parallel {tp})": weights}, cap)
    plan.fix = ("a larger rollout.vllm_tensor_parallel_size (and pools.rollout.num_gpus), or "
                "rollout.vllm_gpu_memory_utilization")
    if cap is None:
        return plan
    budget = r.vllm_gpu_memory_utilization * cap * GB
    per_token = s.kv_cache_bytes_per_token(2) / tp
    kv = max(0.0, budget - weights)
    plan.parts["KV cache (the rest of vllm_gpu_memory_utilization)"] = kv
    seqs = kv / per_token / seq
    plan.notes.append(f"KV cache holds {kv / per_token:,.0f} tokens: {seqs:.1f} sequences of {seq} "
                      f"(max_model_len) at once")
    if seqs < 1:  # vLLM refuses to start when one max_model_len sequence does not fit
        plan.problem = (f"{kv / GB:.1f} GB left for the KV cache holds {kv / per_token:,.0f} tokens, less than one "
                        f"{seq}-token sequence (max_model_len)")
    return plan


def plan(cfg: Config, s: ModelShape) -> list[PoolPlan]:
    plans = [rollout_plan(cfg, s), reference_plan(cfg, s), learner_plan(cfg, s)]
    return [x for x in plans if getattr(cfg.pools, x.role).num_actors > 0 or x.role == "learner"]


def _model(policy: str) -> str:
    """A PEFT adapter folder's base (its shape is the base's), else the policy itself."""
    from rlsr_ray.modeling import lora

    return lora.base_path(policy) if lora.is_adapter(policy) else policy


def check(cfg: Config, policy: str) -> list[PoolPlan]:
    """The plan, or PlanError naming the first pool over its device: the figure and what to change."""
    s = model_shape(policy)
    if s is None:
        return []
    plans = plan(cfg, s)
    for x in plans:
        if x.over():
            raise PlanError(x.refusal())
    return plans


def table(plans: list[PoolPlan]) -> str:
    """The plan as text: a block per pool, GB per component, the total against the device."""
    lines = []
    for x in plans:
        cap = f"{x.capacity_gb:.0f} GB device" if x.capacity_gb is not None else "device memory not known"
        verdict = "" if x.capacity_gb is None else ("  OVER" if x.over() else "  fits")
        lines.append(f"pool {x.role} ({x.device}, {cap}): {x.total / GB:.2f} GB per device{verdict}")
        lines += [f"  {v / GB:9.2f} GB  {k}" for k, v in x.parts.items()]
        lines += [f"  {n}" for n in x.notes]
    return "\n".join(lines)
