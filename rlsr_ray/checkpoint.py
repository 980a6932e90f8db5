"""Checkpoints: layout, atomic publication, retention, discovery, and pickle-free state files.

    output_dir/checkpoints/step_N/
        model.safetensors, config.json, tokenizer*   an HF folder: loads with plain transformers
        optimizer.safetensors + optimizer.json        ZeRO-0 optimizer state: tensors + a JSON skeleton
        optimizer_rank{r}.safetensors + .json         ZeRO >= 1: rank r's optimizer partition
        rng.safetensors + rng.json                    torch RNG state
        pending_rollouts/step_M.parquet               off-policy runs: rollouts already generated for
                                                      later steps (their prompts are past the cursor)
        trainer_state.json                            step, policy version, data cursor, reference

A checkpoint is written under step_N.tmp and renamed when complete, so a directory named step_N is
whole by construction; trainer_state.json is written last inside it and checked on load. Nothing
is ever unpickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")
_JSON_LEAVES = (type(None), bool, int, float, str)  # what the JSON skeleton holds as is


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial or corrupt; the message names the path."""


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every published checkpoint, oldest first; temp dirs are ignored."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(output_dir: Path, at_most: int | None = None) -> Path | None:
    """The newest complete checkpoint, optionally no later than step `at_most`."""
    found = [(s, p) for s, p in complete_checkpoints(output_dir) if at_most is None or s <= at_most]
    return found[-1][1] if found else None


def publish(tmp: Path, target: Path) -> None:
    """Make a fully written temp dir visible under its final name in one rename."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def prune(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (0 keeps everything) and stale temp dirs."""
    root = Path(output_dir) / "checkpoints"
    removed = []
    for p in root.glob("step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    found = complete_checkpoints(output_dir)
    for _, p in found[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **state}, indent=1))


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a complete checkpoint (no {STATE_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from None
    for key in ("format", "step", "policy_version", "cursor", "reference_policy", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{path}: missing field {key!r}")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {state['format']} is not {FORMAT_VERSION}")
    layout = state["optimizer"]
    if not (isinstance(layout, dict) and layout.get("zero_stage") in (0, 1, 2, 3)
            and isinstance(layout.get("shards"), int) and layout["shards"] >= 1):
        raise CheckpointError(f"{path}: field 'optimizer' is malformed ({layout!r})")
    # A LoRA checkpoint is a PEFT adapter folder: the adapter instead of the model's weights.
    adapter = state.get("lora") is not None
    needed = ["adapter_config.json", "adapter_model.safetensors"] if adapter else ["config.json"]
    needed += ["rng.safetensors", "rng.json"]
    needed += [f"{name}.{ext}" for name in optimizer_names(layout) for ext in ("safetensors", "json")]
    for name in needed:
        if not (Path(folder) / name).is_file():
            raise CheckpointError(f"{folder}: partial checkpoint, {name} is missing")
    if not adapter and not list(Path(folder).glob("model*.safetensors")):
        raise CheckpointError(f"{folder}: partial checkpoint, no model*.safetensors")
    return state


def optimizer_layout(zero_stage: int, world_size: int) -> dict[str, int]:
    """How optimizer state is stored: ZeRO-0 ranks hold identical copies (one is stored); under
    ZeRO >= 1 each rank writes a share of the parameters' whole state (actors/zero_state.py), which
    any number of ranks at any stage >= 1 can load."""
    return {"zero_stage": zero_stage, "shards": world_size if zero_stage > 0 else 1}


def optimizer_names(layout: dict[str, int]) -> list[str]:
    if layout["zero_stage"] == 0:
        return ["optimizer"]
    return [f"optimizer_rank{r}" for r in range(layout["shards"])]


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """run.resume: None or "never" -> fresh; "auto" -> latest complete checkpoint, or fresh; else a path."""
    if resume in (None, "never"):
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"run.resume: {path}: no such checkpoint folder")
    return path


# ---------------------------------------------------------------------------------------------
# Nested state (optimizer state dicts, RNG states) <-> safetensors + JSON, without pickle.


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested structure with {"__tensor__": key}; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, prefix), flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__": [flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, _JSON_LEAVES):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def storable(obj: Any) -> bool:
    """Whether flatten() can hold obj (checked without copying any tensor)."""
    if isinstance(obj, (torch.Tensor, *_JSON_LEAVES)):
        return True
    if isinstance(obj, dict):
        return all(storable(k) and storable(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(storable(v) for v in obj)
    return False


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def save_nested(obj: Any, folder: Path, name: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(obj, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_nested(folder: Path, name: str) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
        skeleton = json.loads((folder / f"{name}.json").read_text())
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: cannot read {name} state ({str(e).splitlines()[0]})") from None
    try:
        return unflatten(skeleton, tensors)
    except KeyError as e:
        raise CheckpointError(f"{folder}: {name}.json names tensor {e} that is not stored") from None


PENDING_DIR = "pending_rollouts"


def save_pending(folder: Path, tables: dict[int, Any]) -> list[int]:
    """ROLLOUTS tables generated ahead for later steps (step index -> table), as Parquet."""
    import pyarrow.parquet as pq

    if tables:
        (folder / PENDING_DIR).mkdir()
    for step, table in sorted(tables.items()):
        pq.write_table(table, folder / PENDING_DIR / f"step_{step:06d}.parquet")
    return sorted(tables)


def load_pending(folder: Path, steps: list[int]) -> dict[int, Any]:
    import pyarrow.parquet as pq

    from rlsr_ray.contract import batch

    out = {}
    for step in steps:
        path = folder / PENDING_DIR / f"step_{step:06d}.parquet"
        if not path.exists():
            raise CheckpointError(f"{folder}: {PENDING_DIR}/{path.name} is missing")
        out[step] = batch.check(pq.read_table(path), batch.ROLLOUTS, str(path))
    return out
