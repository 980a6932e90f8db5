"""Range and cross-field checks that types alone cannot express; each failure is one ConfigError
line naming the key, its value and what is allowed."""
from __future__ import annotations

import sys
from typing import Any

from rlsr_ray.config.build import ConfigError
from rlsr_ray.config.pool_sizes import validate_sizes
from rlsr_ray.config.schema import BUILTIN_TERMS, Config, LoraConfig, PoolConfig, RewardTerm, uses_weight_route


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
    before anything starts (rlsr_ray/modeling/lora.py, check_targets)."""
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
