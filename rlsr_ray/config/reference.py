"""The configuration reference, generated from the schema itself: every key of `Config` with its
type (as written in schema.py), its default (read off `Config()`) and what it does (the comment
above the field and the one at its end). The docs site renders it at build time
(docs/hooks/generated.py), so no hand-kept table can drift from the code;
`python -m rlsr_ray.config.reference` prints it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from rlsr_ray.config import schema
from rlsr_ray.config.schema import Config, PoolConfig, PoolsConfig, RewardTerm

ROLES = tuple(f.name for f in dataclasses.fields(PoolsConfig))


@dataclass(frozen=True)
class Key:
    path: str  # dotted, as on the command line: train.lora.rank, pools.<role>.num_cpus
    type: str
    default: str
    doc: str


def _field_docs() -> dict[tuple[str, str], tuple[str, str]]:
    """(class, field) -> (annotation as written, comment text) for every field in schema.py."""
    source = inspect.getsource(schema)
    lines = source.splitlines()
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above: list[str] = []
            k = node.lineno - 2  # the line above, 0-based
            while k >= 0 and lines[k].strip().startswith("#"):
                above.insert(0, lines[k].strip().lstrip("#").strip())
                k -= 1
            trailing = [c for ln in lines[node.lineno - 1:node.end_lineno] if (c := _comment(ln))]
            out[(cls.name, node.target.id)] = (ast.unparse(node.annotation), " ".join(above + trailing))
    return out


def _comment(line: str) -> str:
    """The comment at the end of a line of code ('' if none), ignoring '#' inside strings."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return ""


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"' if v else '""'
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    if dataclasses.is_dataclass(v):  # only what differs from the field's own default
        return "{" + ", ".join(f"{f.name}: {_show(getattr(v, f.name))}" for f in dataclasses.fields(v)
                               if getattr(v, f.name) != _default(f)) + "}"
    return repr(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def keys() -> list[Key]:
    """Every leaf key, section by section in the schema's order. The pools' keys appear once as
    pools.<role>.KEY with each role's default; reward.terms' items as reward.terms[].KEY."""
    docs = _field_docs()
    out: list[Key] = []

    def walk(cls: type, value: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            v = getattr(value, f.name)
            path = f"{prefix}{f.name}"
            if cls is Config and f.name == "pools":
                _pools(v, docs, out)
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], v, path + ".")
                continue
            ann, doc = docs[(cls.__name__, f.name)]
            out.append(Key(path, ann, _show(v), doc))
            if cls.__name__ == "RewardConfig" and f.name == "terms":
                for t in dataclasses.fields(RewardTerm):
                    t_ann, t_doc = docs[("RewardTerm", t.name)]
                    d = _default(t)
                    default = "required" if d is dataclasses.MISSING else _show(d)
                    out.append(Key(f"{path}[].{t.name}", t_ann, default, t_doc))

    walk(Config, Config(), "")
    return out


def _pools(pools: Any, docs: dict, out: list[Key]) -> None:
    for f in dataclasses.fields(PoolConfig):
        ann, doc = docs[("PoolConfig", f.name)]
        values = {r: _show(getattr(getattr(pools, r), f.name)) for r in ROLES}
        same = len(set(values.values())) == 1
        default = values["rollout"] if same else ", ".join(f"{r}: {v}" for r, v in values.items())
        out.append(Key(f"pools.<role>.{f.name}", ann, default, doc))


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """One table per section: key, type, default, description."""
    parts: list[str] = []
    section = None
    for k in keys():
        top = k.path.split(".")[0]
        if top != section:
            section = top
            parts.append(f"\n## `{top}`\n\n| key | type | default | what it does |\n| --- | --- | --- | --- |")
        parts.append(f"| `{_cell(k.path)}` | `{_cell(k.type)}` | `{_cell(k.default)}` | {_cell(k.doc) or '—'} |")
    return "\n".join(parts).lstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown())
