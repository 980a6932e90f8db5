"""Learner role: DeepSpeed ZeRO data-parallel training of the policy on TRAIN mini-batches.

World size = number of learner actors; gloo on CPU, NCCL on GPU. A client torch AdamW is used so
DeepSpeed builds no fused/CPU Adam extension. The loss of each micro-batch is already normalised
by its mini-batch's global token (or sequence) count; multiplying by the world size undoes
DeepSpeed's averaging of gradients over ranks, so the update equals the single-process one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors.comm_op import without_shm_op
from actors.objectives import GRPO, SFT, Objective
from rlsr_ray.contract import batch
from rlsr_ray.modeling import lora
from rlsr_ray.algo.loss import LossSettings
from rlsr_ray.modeling.policy import (enable_checkpointing, load_causal_lm, load_tokenizer, resolve_compute_dtype,
                             response_logprobs, set_threads, state_dict_to_torch)
from rlsr_ray.contract.micro_batches import micro_batches, padded_tokens
from rlsr_ray.contract.selection import MinibatchParts, gather
from rlsr_ray.modeling.weight_group import RouteSettings, WeightGroup, tensor_specs


@dataclass(frozen=True)
class LearnerSettings:
    lr: float
    adam_betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    zero_stage: int
    micro_batch_size: int  # sequences per forward/backward
    micro_steps: int  # micro-batches per mini-batch on one learner (DeepSpeed's accumulation steps)
    loss: LossSettings
    temperature: float
    compute_dtype: str
    recompute_old_logprobs: bool
    seed: int = 0
    # "sgd" (plain, no momentum) makes an update linear in the gradient, so layouts that should
    # agree (micro-batching, learner counts, ZeRO stages) can be compared to float32 accuracy;
    # Adam's first step is lr * g / (|g| + eps), which turns rounding noise in near-zero gradients
    # into lr-sized differences.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward
    # > 0: micro-batches packed by padded tokens (rlsr_ray/contract/micro_batches.py), at most
    # micro_batch_size rows each; the group makes as many passes as its busiest rank.
    max_tokens_per_micro_batch: int = 0
    logprob_chunk_tokens: int = 0  # > 0: the LM head on this many tokens at a time (policy.forward_logprobs)
    offload_optimizer: bool = False  # ZeRO >= 1: the optimizer's share in host memory
    offload_params: bool = False  # ZeRO-3: the parameters' partitions in host memory too
    attn_implementation: str = "auto"  # transformers' name; auto resolved on this device (policy.resolve_attention)
    lora: lora.LoraSpec | None = None  # train adapters only (rlsr_ray/modeling/lora.py); None: the full weights
    # LoRA: the reference log-probs come from this learner's base, adapters off (no reference pool).
    reference_in_learner: bool = False


def cuda_index(device: str) -> int:
    """The CUDA device this learner drives, which DeepSpeed takes from LOCAL_RANK. A pool actor
    sees only its own GPU ("cuda" = index 0); Ray Train's workers on one node share
    CUDA_VISIBLE_DEVICES, and each is told its own device by ray.train.torch.get_device()
    ("cuda:3"), so SFT passes that."""
    d = torch.device(device)
    return (d.index or 0) if d.type == "cuda" else 0


def precision_config(cuda: bool, zero_stage: int, compute_dtype: str) -> dict:
    """DeepSpeed's precision sections for a learner.

    bf16 on CUDA under ZeRO >= 1: DeepSpeed's bf16 mode (bf16 weights, float32 masters in the ZeRO
    optimizer; check_grad_overflow: a non-finite gradient norm skips the update). Without ZeRO,
    DeepSpeed has no float32-master bf16 optimizer: its bf16 mode falls back to the fp16 one
    (FP16_UnfusedOptimizer: bf16 weights, bf16 gradients summed over micro-batches), and on an H200
    that path skipped 2 of 4 SFT steps of a 135M policy on a non-finite gradient. So under ZeRO-0 the
    weights stay float32 and DeepSpeed's own torch autocast computes in bf16 (its engine switches off
    a CUDA autocast opened outside it); no module is marked lower-precision, so gradients are summed
    and reduced in float32. On CPU weights stay float32 and the caller's autocast applies (DeepSpeed
    looks at CUDA's autocast only)."""
    bf16 = cuda and compute_dtype == "bfloat16"
    return {
        "bf16": {"enabled": bf16 and zero_stage > 0, "check_grad_overflow": True},
        "torch_autocast": {"enabled": bf16 and zero_stage == 0, "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
    }


def zero_config(s: LearnerSettings, cuda: bool) -> dict:
    """DeepSpeed's zero_optimization section: the stage, and host-memory offload where asked."""
    out: dict = {"stage": s.zero_stage}
    if s.offload_optimizer:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if s.offload_params:
        out["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerActor:
    def __init__(self, policy_path: str, settings: LearnerSettings, world_size: int = 1, device: str = "cpu",
                 torch_threads: int = 1, cache_dir: str = "~/.cache/rlsr_ray", rank: int = 0):
        set_threads(torch_threads)
        torch.manual_seed(settings.seed)
        settings = dataclasses.replace(settings, compute_dtype=resolve_compute_dtype(settings.compute_dtype, device))
        self.rank, self.world_size, self.device, self.s = rank, world_size, device, settings
        self.cache_dir = Path(cache_dir).expanduser()
        self.tok = load_tokenizer(policy_path)
        self.model = load_causal_lm(policy_path, device, attn_implementation=settings.attn_implementation)
        if settings.lora is not None:
            self.model = lora.wrap(self.model, settings.lora)  # after the seed: A's initial values
        if settings.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.specs = tensor_specs(self._synced(self.model))  # before ZeRO-3 partitions the parameters
        self.route: WeightGroup | None = None  # rank 0's end of the weight route to the rollout actors
        self.engine = None
        self._bad_minibatch = ""  # why the current mini-batch will not be applied, if it will not

    def rendezvous(self) -> str:
        """Rank 0 names where the group meets (a torch.distributed init_method).

        On a loopback-only Ray (a local one started by rlsr_ray, or no Ray) every learner is on
        this machine, and the group meets in a file store: a TCP store listens on every interface.
        """
        try:
            import ray

            host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        except ImportError:  # pragma: no cover - ray is a dependency
            host = "127.0.0.1"
        if host in ("127.0.0.1", "::1", "localhost"):
            # An unguessable name; the store deletes its file once the last rank lets go of it.
            return "file://" + os.path.join(tempfile.gettempdir(), f"rlsr_ray_rdzv_{secrets.token_hex(8)}")
        return f"tcp://[{host}]:{_free_port()}" if ":" in host else f"tcp://{host}:{_free_port()}"

    def setup(self, init_method: str) -> str:
        """Join the group at init_method (from rank 0's rendezvous) and build the DeepSpeed engine.
        Returns a line for the run's log: what was done about DeepSpeed's CPU comm op."""
        import deepspeed

        said = without_shm_op(self.cache_dir)  # before the group: init_distributed would build it
        index = cuda_index(self.device)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(index))
        if init_method.startswith("tcp://"):  # DeepSpeed's comm helpers also read these
            host, _, port = init_method[len("tcp://"):].rpartition(":")
            os.environ.update(MASTER_ADDR=host.strip("[]"), MASTER_PORT=port)
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(index)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   init_method=init_method, rank=self.rank, world_size=self.world_size)
        s = self.s
        config = {
            "train_micro_batch_size_per_gpu": s.micro_batch_size,
            "gradient_accumulation_steps": s.micro_steps,
            "train_batch_size": s.micro_batch_size * s.micro_steps * self.world_size,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": zero_config(s, cuda),
            "zero_allow_untested_optimizer": True,
            # The client torch AdamW also steps offloaded states (DeepSpeed would insist on its
            # CPU Adam, a JIT-built extension).
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            **precision_config(cuda, s.zero_stage, s.compute_dtype),
        }
        trained = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters alone
        if s.optimizer == "sgd":
            optimizer = torch.optim.SGD(trained, lr=s.lr, weight_decay=s.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trained, lr=s.lr, betas=s.adam_betas, weight_decay=s.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)
        if init_method.startswith("file://"):
            # The store would delete its file when the last rank closes it, but actors end by
            # SIGKILL; once every rank is in (gloo pairs connected), it is no longer read.
            self._barrier()
            if self.rank == 0:
                Path(init_method[len("file://"):]).unlink(missing_ok=True)
        return said

    def old_logprobs(self, table: pa.Table) -> list:
        if not self.s.recompute_old_logprobs:
            return table.column("rollout_logprobs").to_pylist()
        return [x.tolist() for x in self.logprobs(table)]

    def train_parts(self, parts: list[MinibatchParts], rollout_tables: int, *tables: pa.Table) -> dict[str, float]:
        """train_step on mini-batches this learner assembles itself from pieces of the rollout
        tables (the first `rollout_tables` of `tables`) and the reference tables (the rest), which
        Ray hands over straight from the actors that made them."""
        rollouts, refs = tables[:rollout_tables], tables[rollout_tables:]
        t0 = time.perf_counter()
        if self.s.reference_in_learner:  # one REF_LOGPROBS table per mini-batch, of its rows in order
            refs = tuple(self.reference_logprobs(gather(rollouts, p.rollouts, batch.ROLLOUTS)) for p in parts)
            parts = [dataclasses.replace(p, ref_logprobs=[(i, 0, len(t))]) for i, (p, t) in enumerate(zip(parts, refs))]
        reference_s = time.perf_counter() - t0
        trains = batch.assemble_train(parts, rollouts, refs, f"learner[{self.rank}] input")
        stats = self.train_step(trains, [p.normaliser for p in parts], [p.micro_steps for p in parts])
        return {**stats, "reference_s": reference_s} if self.s.reference_in_learner else stats

    def train_step(self, minibatches: list[pa.Table], normalisers: list[float],
                   micro_steps: list[int] | None = None) -> dict[str, float]:
        """GRPO: one optimizer step per TRAIN mini-batch; summed statistics over all of them."""
        return self.optimise(GRPO(), minibatches, normalisers, micro_steps)

    def sft_step(self, minibatches: list[pa.Table], normalisers: list[float],
                 micro_steps: list[int] | None = None) -> dict[str, float]:
        """Supervised fine-tuning: one optimizer step per SFT mini-batch."""
        return self.optimise(SFT(), minibatches, normalisers, micro_steps)

    def optimise(self, objective: Objective, minibatches: list[pa.Table], normalisers: list[float],
                 micro_steps: list[int] | None = None) -> dict[str, float]:
        """One optimizer step per mini-batch; returns summed statistics over all of them.

        Mini-batches may differ in size (dynamic sampling drops groups). Every learner makes
        `micro_steps[i]` forward/backward passes on mini-batch i, so the gradient collectives stay
        matched; a learner short of rows repeats its first micro-batch at zero weight."""
        eng, s = self.engine, self.s
        step_keys = (*objective.stat_keys, "grad_norm", "skipped")  # from each micro-step's stats
        keys = (*step_keys, "padding_tokens", "micro_batches")
        totals: dict = {k: 0.0 for k in keys}
        reasons = []
        minibatches = [batch.check(t, objective.schema, f"learner[{self.rank}] input") for t in minibatches]
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        contexts = objective.prepare(self, minibatches)
        if micro_steps is None:
            micro_steps = [s.micro_steps] * len(minibatches)
        for table, context, norm, passes in zip(minibatches, contexts, normalisers, micro_steps):
            eng.train()  # after scoring, which switches the module to eval
            plens = pc.list_value_length(table.column("prompt_ids")).to_pylist()
            rlens = pc.list_value_length(table.column("response_ids")).to_pylist()
            groups = micro_batches(plens, rlens, s.micro_batch_size, s.max_tokens_per_micro_batch)
            if s.max_tokens_per_micro_batch > 0:  # how many packing makes differs by rank
                passes = int(self._max_on_ranks(float(len(groups))))
            if not groups or len(groups) > passes:
                raise ValueError(f"learner[{self.rank}]: {len(table)} rows make {len(groups)} micro-batches, "
                                 f"planned {passes}")
            totals["micro_batches"] += len(groups)
            totals["padding_tokens"] += sum(padded_tokens(plens, rlens, g) - sum(plens[i] + rlens[i] for i in g)
                                            for g in groups)
            weights = [1.0] * len(groups) + [0.0] * (passes - len(groups))
            groups += [groups[0]] * (passes - len(groups))
            for i, (rows, weight) in enumerate(zip(groups, weights)):
                part = table.slice(rows[0], len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) \
                    else table.take(rows)
                loss, stats = objective.loss(self, part, [context[j] for j in rows], norm)
                stats = self._micro_step(loss, stats, last=i == passes - 1, weight=weight)
                for k in step_keys:
                    value = stats.get(k, 0.0)
                    totals[k] += value if np.isfinite(value) else 0.0  # a skipped batch's NaNs stay out
                if "skip_reason" in stats:
                    reasons.append(stats["skip_reason"])
        totals["skip_reasons"] = reasons
        # Prompt + response tokens through forward and backward: what MFU counts (6 N per token).
        totals["sequence_tokens"] = float(batch.sequence_tokens(minibatches))
        if self.device.startswith("cuda"):
            totals["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 1e6
        return totals

    def _micro_step(self, loss: torch.Tensor, stats: dict, last: bool, weight: float = 1.0) -> dict[str, float]:
        """Backward and (at the boundary) step on one micro-batch's loss. weight 0: a padding pass
        that keeps this rank's collectives in step with the others."""
        # The caller owns the boundary: mini-batches need not hold DeepSpeed's configured count.
        self.engine.set_gradient_accumulation_boundary(last)
        if weight != 1.0:
            loss = loss * weight
            stats = {k: v * weight for k, v in stats.items()}
        # A non-finite loss must never reach the weights. Every rank takes the same decision, so
        # the gradient collectives inside backward() stay matched across the group.
        if self._on_any_rank(not bool(torch.isfinite(loss))):
            self._bad_minibatch = "non-finite loss"
        if not self._bad_minibatch:
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        elif self.s.zero_stage > 0:
            # ZeRO >= 1 discards a step whose gradient norm is not finite (its overflow path:
            # gradients cleared, optimizer untouched). A NaN gradient sends a bad mini-batch there.
            self.engine.backward(loss * float("nan"), scale_wrt_gas=False)
        if not last:
            self.engine.step()  # counts the micro-step; the update happens at the boundary
            return stats
        if self.s.zero_stage > 0:
            return self._zero_boundary_step(stats)
        # ZeRO-0: every rank holds full (already averaged) gradients; the pre-clipping norm decides.
        norm = self._full_grad_norm() if not self._bad_minibatch else None
        if norm is not None and not np.isfinite(norm):
            self._bad_minibatch = "non-finite gradient"
        if self._bad_minibatch:
            stats["skipped"], stats["skip_reason"] = 1.0, self._bad_minibatch
            self._step_without_update()
            return stats
        self.engine.step()
        stats["grad_norm"] = norm
        return stats

    def _zero_boundary_step(self, stats: dict) -> dict:
        self.engine.step()
        if self.engine.optimizer.overflow:  # DeepSpeed skipped the update (non-finite gradient norm)
            stats["skipped"], stats["skip_reason"] = 1.0, self._bad_minibatch or "non-finite gradient"
            self._bad_minibatch = ""
            return stats
        value = self.engine.get_global_grad_norm()  # pre-clipping norm, recorded during step()
        stats["grad_norm"] = float(value) if value is not None else float("nan")
        return stats

    def _on_any_rank(self, flag: bool) -> bool:
        return self._max_on_ranks(1.0 if flag else 0.0) > 0

    def _max_on_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _step_without_update(self) -> None:
        """ZeRO-0: close the accumulation window without touching the weights: zero gradients, lr 0.

        DeepSpeed's step() must still run to keep its micro-step bookkeeping aligned; with zero
        gradients and lr 0 AdamW leaves every weight as it was (its moments decay by one step).
        """
        for p in self.engine.module.parameters():
            if p.requires_grad:  # zeros, not None: DeepSpeed's clipping needs gradients to exist
                p.grad = torch.zeros_like(p)
        groups = self.engine.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        self.engine.step()
        for g, lr in zip(groups, saved):
            g["lr"] = lr
        self._bad_minibatch = ""

    def _full_grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def reference_logprobs(self, rollouts: pa.Table) -> pa.Table:
        """REF_LOGPROBS of ROLLOUTS rows under the base policy: this LoRA learner's own weights with
        the adapters switched off, which is the frozen initial policy (the base never trains)."""
        model = self.engine.module if self.engine is not None else self.model
        with model.disable_adapter():
            lps = self.logprobs(rollouts)
        table = pa.table({"group_id": rollouts.column("group_id"), "sample_idx": rollouts.column("sample_idx"),
                          "ref_logprobs": pa.array([x.tolist() for x in lps], pa.list_(pa.float32()))})
        return batch.check(table, batch.REF_LOGPROBS, f"learner[{self.rank}] reference")

    @torch.no_grad()
    def logprobs(self, table: pa.Table) -> list:
        model = self.engine.module if self.engine is not None else self.model
        model.eval()
        return response_logprobs(model, table.column("prompt_ids").to_pylist(),
                                 table.column("response_ids").to_pylist(), self.tok.pad_token_id,
                                 self.s.temperature, self.s.compute_dtype, self.s.micro_batch_size, self.device,
                                 len(self.tok), self.s.logprob_chunk_tokens)

    def export_weights(self) -> dict | None:
        """Full CPU state dict on rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
        with self._full_weights() as model:
            return self._cpu_state_dict(model) if self.rank == 0 else None

    def publish_weights(self) -> list | None:
        """Rank 0: [reference, bytes] of export_weights put into Ray's object store by this actor
        itself. In a list, Ray hands the reference over unresolved: the caller never holds the
        weights. Every rank must call it under ZeRO-3."""
        import ray

        state = self.export_weights()
        return [ray.put(state), sum(v.nbytes for v in state.values())] if state is not None else None

    @contextlib.contextmanager
    def _full_weights(self, everything: bool = False):
        """The policy module with what a sync sends whole (ZeRO-3 gathers it; all ranks enter): the
        adapters under LoRA (the base stays partitioned), every parameter otherwise or with
        `everything`."""
        model = self.engine.module if self.engine is not None else self.model
        if self.s.zero_stage == 3 and self.engine is not None:
            import deepspeed

            params = [p for p in model.parameters() if everything or self.s.lora is None or p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield model
        else:
            yield model

    def _synced(self, model) -> dict[str, torch.Tensor]:
        """What a weight sync moves: the adapters under LoRA, else the whole state dict."""
        return lora.adapter_tensors(model) if self.s.lora is not None else model.state_dict()

    # The weight route (rlsr_ray/modeling/weight_group.py): rank 0 sends, the rollout actors receive.
    def weight_specs(self) -> list | None:
        return self.specs if self.rank == 0 else None

    def open_weight_route(self, address: str, settings: RouteSettings) -> None:
        self.close_weight_route()
        if self.rank == 0:  # blocks until every rollout actor has joined
            self.route = WeightGroup(address, 0, settings)

    def send_weights(self) -> dict:
        """Every rank calls it (ZeRO-3 gathers); rank 0 broadcasts. A torn route is reported, not
        raised: a rollout actor's death must not fail the learner group."""
        with self._full_weights() as model:
            if self.rank != 0:
                return {"ok": True, "bytes": 0}
            if self.route is None:
                return {"ok": False, "error": "learner rank 0 holds no weight route"}
            try:
                return {"ok": True, "bytes": self.route.send(self._synced(model), self.specs)}
            except RuntimeError as e:  # gloo/NCCL: a peer died or timed out
                self.route = None
                return {"ok": False, "error": str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}

    def close_weight_route(self) -> None:
        self.route = None  # the process group is destroyed with its last reference

    def _cpu_state_dict(self, model) -> dict:
        """float32 numpy arrays: Ray stores them zero-copy, and readers map them without unpickling."""
        sd = self._synced(model)
        # tensor_specs lists tied weights (lm_head = embeddings) once, as the weight route sends them.
        return {s.name: sd[s.name].detach().to("cpu", dtype=torch.float32, copy=True).numpy()
                for s in tensor_specs(sd)}

    def save_pretrained(self, path: str, trainer_state: dict | None = None,
                        pending: dict | None = None, merged: bool = False) -> str | None:
        """Write an HF folder (safetensors + tokenizer) atomically; every rank must call it. Under
        LoRA it is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, which
        peft.PeftModel.from_pretrained loads), and with `merged` it also holds merged/, a plain
        HF folder of the base with the adapters folded in.

        With `trainer_state`, the folder is a resumable checkpoint: optimizer state (ZeRO-0: one
        copy, since every rank holds all of it; ZeRO >= 1: one shard per rank), RNG state, the
        rollouts generated ahead for later steps (`pending`, step -> table; rank 0 writes them),
        and trainer_state.json last.
        """
        import shutil

        from rlsr_ray import checkpoint

        state = self.export_weights()
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a writer that died
        if merged and self.s.lora is not None:
            with self._full_weights(everything=True) as model:  # collective under ZeRO-3
                if self.rank == 0:
                    folded = {k: v.detach().to("cpu", copy=True) for k, v in lora.merged_state_dict(model).items()}
                    model.get_base_model().save_pretrained(tmp / lora.MERGED, state_dict=folded,
                                                           safe_serialization=True)
                    self.tok.save_pretrained(tmp / lora.MERGED)
        layout = checkpoint.optimizer_layout(self.s.zero_stage, self.world_size)
        names = checkpoint.optimizer_names(layout)
        if trainer_state is not None and self.s.zero_stage > 0:
            # Each rank writes its share of the parameters' whole optimizer state (zero_state.py:
            # loadable by any number of ranks) into the folder rank 0 publishes, so no rank holds
            # all of it; learners on several nodes therefore need run.output_dir on shared storage.
            from actors import zero_state

            share = zero_state.gather(self.engine, self.rank, self.world_size)  # collective
            if self.rank == 0:
                tmp.mkdir(parents=True, exist_ok=True)
            self._barrier()
            checkpoint.save_nested(share, tmp, names[self.rank])
            self._barrier()
        if self.rank != 0:
            return None
        model = self.engine.module if self.engine is not None else self.model
        model.save_pretrained(tmp, state_dict=state_dict_to_torch(state), safe_serialization=True)
        self.tok.save_pretrained(tmp)
        if trainer_state is not None:
            if self.s.zero_stage == 0:
                checkpoint.save_nested(self.engine.optimizer.state_dict(), tmp, names[0])
            checkpoint.save_nested({"torch": torch.get_rng_state()}, tmp, "rng")
            steps = checkpoint.save_pending(tmp, pending or {})
            checkpoint.write_state(tmp, {**trainer_state, "optimizer": layout, "pending_steps": steps,
                                         "lora": self.s.lora.to_dict() if self.s.lora is not None else None})
        checkpoint.publish(tmp, target)
        return str(target)

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def load_checkpoint(self, path: str) -> dict:
        """Restore weights, optimizer and RNG from a checkpoint written by save_pretrained: with
        ZeRO >= 1 by any number of ranks at any stage >= 1 (zero_state.py), with ZeRO-0 by ZeRO-0."""
        from safetensors.torch import load_file

        from actors import zero_state
        from rlsr_ray import checkpoint

        folder = Path(path)
        state = checkpoint.read_state(folder)  # the driver has checked it is resumable (find_resume)
        saved = state["optimizer"]
        if (saved["zero_stage"] == 0) != (self.s.zero_stage == 0):
            raise checkpoint.CheckpointError(f"{folder}: optimizer state of ZeRO-{saved['zero_stage']} cannot "
                                             f"load into ZeRO-{self.s.zero_stage} (ZeRO-0 <-> ZeRO >= 1)")
        if (state.get("lora") is None) != (self.s.lora is None):
            raise checkpoint.CheckpointError(f"{folder}: written {'with' if state.get('lora') else 'without'} "
                                             f"LoRA, loaded {'with' if self.s.lora else 'without'} (train.lora)")
        if self.s.zero_stage < 3 and self.s.lora is not None:
            self._load_adapter(folder)
        elif self.s.zero_stage < 3:  # ZeRO-3's partitioned weights follow the fp32 masters instead
            weights = {}
            for f in sorted(folder.glob("model*.safetensors")):
                weights.update(load_file(str(f)))
            missing, unexpected = self.engine.module.load_state_dict(weights, strict=False)
            if [k for k in missing if k != "lm_head.weight"] or unexpected:
                raise checkpoint.CheckpointError(f"{folder}: weights do not fit the policy "
                                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        names = checkpoint.optimizer_names(saved)
        if self.s.zero_stage == 0:
            self.engine.optimizer.load_state_dict(checkpoint.load_nested(folder, names[0]))
        else:
            shares = (checkpoint.load_nested(folder, name) for name in names)  # one in memory at a time
            try:
                zero_state.restore(self.engine, shares)  # fp32 masters exact, not re-derived from weights
            except ValueError as e:
                raise checkpoint.CheckpointError(f"{folder}: {e}") from None
        torch.set_rng_state(checkpoint.load_nested(folder, "rng")["torch"])
        return state

    def _load_adapter(self, folder: Path) -> None:
        """A PEFT adapter file into this learner's adapters; every one of them must be in it."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from rlsr_ray import checkpoint

        saved = load_file(str(folder / "adapter_model.safetensors"))
        model = self.engine.module
        result = set_peft_model_state_dict(model, saved)
        if result.unexpected_keys or len(saved) != len(lora.adapter_tensors(model)):
            raise checkpoint.CheckpointError(f"{folder}: the adapter does not fit this policy's train.lora "
                                             f"({len(saved)} tensors for {len(lora.adapter_tensors(model))}, "
                                             f"unexpected {result.unexpected_keys[:3]})")
