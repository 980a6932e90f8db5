"""The docs site builds strictly (every internal link and anchor resolves) and its configuration
reference, generated from the schema at build time, holds every key with a description."""
from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from rlsr_ray.config import Config
from rlsr_ray.config.reference import Key, keys, markdown

ROOT = Path(__file__).resolve().parents[1]


def leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, walked independently of reference.py's own walk."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if f.name == "pools" and cls is Config:
            out += [f"pools.<role>.{g.name}" for g in dataclasses.fields(typing.get_type_hints(t)["rollout"])]
        elif dataclasses.is_dataclass(t):
            out += leaf_paths(t, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def missing_from(page_html: str, paths: list[str]) -> list[str]:
    """The keys not shown as a code cell of the built page."""
    cells = {html.unescape(c) for c in re.findall(r"<td><code>(.*?)</code></td>", page_html)}
    return [p for p in paths if p not in cells]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_every_key_is_in_the_reference_with_a_description():
    ks = keys()
    assert [k.path for k in ks if "[]" not in k.path] == leaf_paths()
    assert [k.path for k in ks if not k.doc] == []
    assert {"train.lora.rank", "pools.<role>.num_cpus", "reward.terms[].weight"} <= {k.path for k in ks}


def test_defaults_and_types_come_from_the_schema():
    by = {k.path: k for k in keys()}
    assert by["train.lr"] == Key("train.lr", "float", "1e-06", by["train.lr"].doc)
    assert by["model.compute_dtype"].type == "Literal['auto', 'float32', 'bfloat16']"
    assert by["reward.terms"].default == '[{name: "similarity"}, {name: "copy_penalty"}]'
    assert by["algo.lcs_min_chars"].doc.startswith("penalise when the longest common substring")


def test_the_built_site_shows_every_key(site):
    page = (site / "configuration" / "index.html").read_text()
    assert missing_from(page, [k.path for k in keys()]) == []
    assert missing_from(page, ["train.no_such_key"]) == ["train.no_such_key"]  # the check can fail
    assert "<!-- config-reference -->" not in page


def test_the_site_has_its_pages(site):
    for page in ("getting-started", "concepts", "configuration", "presets", "data", "rewards",
                 "sft-eval-compare", "elastic", "clusters", "serving", "benchmarks", "reliability",
                 "development"):
        assert (site / page / "index.html").is_file(), page


def test_generated_pages_follow_their_sources(site):
    from rlsr_ray.config import preset_names

    presets = (site / "presets" / "index.html").read_text()
    assert [n for n in preset_names() if f'id="{n}"' not in presets] == []
    home = (site / "index.html").read_text()
    readme = (ROOT / "README.md").read_text()
    for heading in re.findall(r"^## (.+)$", readme, re.M):
        assert html.escape(heading, quote=False) in home, heading
    assert 'href="getting-started/"' in home  # README's docs/ links, made relative to the site


def test_reference_markdown_is_one_table_per_section():
    md = markdown()
    sections = re.findall(r"^## `(\w+)`$", md, re.M)
    assert sections == [f.name for f in dataclasses.fields(Config)]
