"""Presets and overrides -> a checked Config: YAML presets shipped in rlsr_ray/presets/ or a user's
file, dotted command-line overrides merged on top, then built along the schema's types (build.py)
and range-checked (validate.py)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rlsr_ray.config.build import ConfigError, build, merge, parse_override
from rlsr_ray.config.schema import Config
from rlsr_ray.config.validate import validate


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
