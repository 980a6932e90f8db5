"""ZeRO optimizer state as whole tensors per parameter, so that a checkpoint written by N learner
ranks loads on M ranks, for any N, M >= 1 and any ZeRO stage 1-3.

ZeRO keeps each rank's slice of one flat buffer per parameter group (fp32 master weights and the
optimizer's moments), padded and cut by world size: a rank's slice means nothing to a group of
another size. Here every parameter's full tensors are gathered (DeepSpeed's
safe_get_full_fp32_param / safe_get_full_optimizer_state, a collective every rank joins) and
parameter i is kept by rank i mod N, which writes it; on load each rank sets every parameter's
full tensors and keeps its own slice (safe_set_full_*). Gathering is a sum of disjoint slices
over zeros, so the values are bitwise those the optimizer held.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

FORMAT = "per_parameter"


def _flat_groups(zero_optimizer) -> list[tuple[int, torch.Tensor]]:
    """(param group index, flat fp32 partition) pairs the base optimizer steps: ZeRO-3 keeps them
    in fp32_partitioned_groups_flat and hands each to the optimizer only for its step."""
    base = zero_optimizer.optimizer
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        return [(zero_optimizer.sub_group_to_group_id[i], p)
                for i, p in enumerate(zero_optimizer.fp32_partitioned_groups_flat)]
    return [(g, p) for g, group in enumerate(base.param_groups) for p in group["params"]]


def materialise(zero_optimizer) -> None:
    """Create the optimizer's state where it has none yet (torch optimizers make it at the first
    step): one step on zero gradients at learning rate 0, which leaves the weights as they are."""
    base = zero_optimizer.optimizer
    kept = [(g["lr"], list(g["params"])) for g in base.param_groups]
    try:
        for g, flat in _flat_groups(zero_optimizer):
            if base.state.get(flat):
                continue
            group = base.param_groups[g]
            group["lr"], group["params"] = 0.0, [flat]
            flat.grad = torch.zeros_like(flat)
            base.step()
            flat.grad = None
    finally:
        for group, (lr, params) in zip(base.param_groups, kept):
            group["lr"], group["params"] = lr, params
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the moments
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _moment_keys(zero_optimizer) -> list[str]:
    """The optimizer's per-element state (AdamW: exp_avg, exp_avg_sq; plain SGD: none)."""
    base = zero_optimizer.optimizer
    _, flat = _flat_groups(zero_optimizer)[0]
    state = base.state.get(flat, {})
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)


def _step(zero_optimizer) -> float | None:
    _, flat = _flat_groups(zero_optimizer)[0]
    step = zero_optimizer.optimizer.state.get(flat, {}).get("step")
    return None if step is None else float(step)


def trained(module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer steps (under LoRA the adapters; the frozen base has no state)."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def gather(engine, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's share of the full state: the parameters i with i mod world_size == rank, their
    fp32 master weights and moments on CPU. Every rank must call it (each gather is collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.optimizer
    step = _step(zero)  # None before the first update: then there are no moments to keep
    keys = _moment_keys(zero) if step is not None else []
    params: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, p) in enumerate(trained(engine.module)):
        full = {"fp32": safe_get_full_fp32_param(p), **{k: safe_get_full_optimizer_state(p, k) for k in keys}}
        if i % world_size == rank:
            params[name] = {k: v.detach().to("cpu", copy=True) for k, v in full.items()}
    return {"format": FORMAT, "step": step, "params": params}


def restore(engine, shares: Iterable[dict[str, Any]]) -> None:
    """Set every parameter's full state from the shares of the ranks that wrote it (any number,
    read one at a time); each rank keeps its own slice. Weights follow the fp32 masters. Raises
    ValueError for shares that do not fit this policy."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    params = dict(trained(engine.module))
    seen: set[str] = set()
    step: float | None = None
    for k, share in enumerate(shares):
        if share.get("format") != FORMAT:
            raise ValueError(f"optimizer shard {k} is in a layout this version does not read "
                             f"(format {share.get('format')!r})")
        if k == 0:
            step = share["step"]
            if step is not None:  # the moments exist once the optimizer has stepped
                materialise(zero)
        for name, saved in share["params"].items():
            if name not in params:
                raise ValueError(f"optimizer state names {name!r}, which the policy does not have")
            p = params[name]
            safe_set_full_fp32_param(p, saved["fp32"].to(p.device))
            for key, value in saved.items():
                if key != "fp32":
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
            seen.add(name)
    if seen != set(params):
        raise ValueError(f"optimizer state lacks {sorted(set(params) - seen)[:3]}")
    if step is not None:
        for _, flat in _flat_groups(zero):
            zero.optimizer.state[flat]["step"] = torch.tensor(step, dtype=torch.float32)
    _weights_from_masters(zero)


def _weights_from_masters(zero_optimizer) -> None:
    """The working weights as the fp32 masters now hold them, as DeepSpeed does after a step:
    ZeRO-3 copies each flat partition into its parameters' slices (as its own
    _rigid_load_state_dict does); ZeRO-1/2 copies the masters into the weights and gathers them
    (update_lp_params). Every rank must call it."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        for i, fp32 in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
            if fp32.numel() > 0:
                zero_optimizer.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
            unflat = zero_optimizer.unflatten(zero_optimizer.fp16_partitioned_groups_flat[i],
                                              zero_optimizer.fp16_partitioned_groups[i])
            for partitioned, q in zip(zero_optimizer.fp16_partitioned_groups[i], unflat):
                partitioned.data = q.data
    else:
        zero_optimizer.update_lp_params()  # each rank copies its masters, then all gather
