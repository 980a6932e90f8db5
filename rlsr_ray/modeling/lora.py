"""LoRA adapters on the policy (peft): wrapping, the adapter tensors a sync moves, the merged
weights a plain transformers load reads, and PEFT-format folders.

An adapter pair replaces a linear layer's y = W x by y = W x + (alpha / r) B A x, with A (r x in)
random and B (out x r) zero at the start, so a freshly wrapped policy computes what its base
computes. The base weights never change: they are the reference policy (adapters switched off).

Names: tensors keep the wrapped model's state-dict names on every side (learner, rollout
actors), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"; PEFT's folder
format drops the adapter name (".default"), which peft's save and load functions handle.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlsr_ray.modeling.models import ModelError

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"  # a checkpoint's plain HF folder (the final one's) with the adapters folded in
ADAPTER = "default"  # peft's name for the one adapter


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    @classmethod
    def from_config(cls, lo) -> "LoraSpec | None":
        """From train.lora (rlsr_ray.config.LoraConfig); None where LoRA is off."""
        if not lo.enabled:
            return None
        return cls(lo.rank, float(lo.alpha), float(lo.dropout), tuple(lo.target_modules))

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


class LoraError(ModelError):
    """A LoRA setting or adapter folder that does not fit the policy; one line naming it."""


def linear_names(model) -> list[str]:
    """Last name components of the decoder's linear layers (what target_modules can name)."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def check_targets(policy_path: str, spec: LoraSpec) -> None:
    """Every target names a linear layer of the policy; checked on an empty (meta-device) model
    built from its config.json, before any weights are loaded or any actor starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = base_path(policy_path) if is_adapter(policy_path) else policy_path
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    known = linear_names(model)
    unknown = [t for t in spec.target_modules if t not in known]
    if unknown:
        raise LoraError(f"train.lora.target_modules: {unknown[0]!r} is no linear layer of {base} "
                        f"(its layers: {', '.join(known)})")


def wrap(model, spec: LoraSpec):
    """The policy with adapters on its target layers, the base frozen (peft's PeftModel). Draws
    A's initial values from torch's RNG: seed it first for a reproducible start."""
    from peft import get_peft_model

    return get_peft_model(model, spec.peft_config())


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their state-dict names, in state-dict order: what a sync moves."""
    return {name: t for name, t in model.state_dict().items() if ".lora_" in name}


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict in its own (transformers) names with every adapter folded in:
    W + (alpha / r) B A, computed as peft's merge computes it (get_delta_weight), so the values
    equal peft's merge_and_unload bit for bit. The model itself is left as it is."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {name: m.get_delta_weight(ADAPTER) for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        module, sep, leaf = key.partition(".base_layer.")
        if not sep:
            out[key] = value
            continue
        out[f"{module}.{leaf}"] = value + deltas[module].to(value.dtype) if leaf == "weight" else value
    return out


def is_adapter(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def base_path(adapter: str | Path) -> str:
    """The base model an adapter folder was trained on (PEFT's base_model_name_or_path)."""
    config = json.loads((Path(adapter).expanduser() / ADAPTER_CONFIG).read_text())
    return str(config.get("base_model_name_or_path") or "")


def load_merged(adapter: str, load_base):
    """A plain transformers model: the base an adapter folder names (load_base(path) loads it),
    with the adapter folded in."""
    from peft import PeftModel

    base = base_path(adapter)
    if not base:
        raise LoraError(f"{adapter}/{ADAPTER_CONFIG}: no base_model_name_or_path")
    return PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload()


def peft_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict names -> PEFT's folder names: the adapter's name dropped (".lora_A.default." ->
    ".lora_A."), as peft's get_peft_model_state_dict writes them and vLLM's loader reads them."""
    return {name.replace(f".{ADAPTER}.", "."): t for name, t in tensors.items()}


def write_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, base: str) -> None:
    """A PEFT adapter folder from adapter tensors (state-dict names), without the model: what
    peft's save_pretrained writes (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config()
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in peft_names(tensors).items()}, str(folder / "adapter_model.safetensors"))
