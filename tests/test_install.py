"""Every install line that README, the docs and the cluster files give users resolves with pip's resolver.

Runs `pip install --dry-run --ignore-installed --report` against the package registry (metadata
only, nothing is installed), so a version clash between the project's pins and an extra's (vLLM
pins its own torch and caps transformers) fails here instead of on a freshly started cluster.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SDIST = re.compile(r"[^\s\"']*rlsr_ray-[0-9.]+\.tar\.gz")


def _pip_commands(text: str) -> list[str]:
    """The `pip install ...` commands in shell text, one per `&&`-separated part."""
    found = []
    for line in text.splitlines():
        for part in line.split("&&"):
            part = part.strip().lstrip("- ").strip()
            if part.startswith("pip install "):
                found.append(part.split("#")[0].strip())
    return found


def _key(cmd: str) -> str:
    """pip's arguments, quiet flag dropped, in shell-quoted form."""
    return shlex.join(a for a in shlex.split(cmd)[2:] if a != "-q")


def install_lines() -> dict[str, list[str]]:
    """pip arguments -> where they come from; the sdist a cluster node installs is this checkout."""
    lines: dict[str, list[str]] = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for cmd in _pip_commands(page.read_text()):
            lines.setdefault(_key(cmd), []).append(str(page.relative_to(ROOT)))
    for cluster in sorted((ROOT / "clusters").glob("*.yaml")):
        commands = yaml.safe_load(cluster.read_text()).get("setup_commands", [])
        for cmd in _pip_commands("\n".join(commands)):
            lines.setdefault(_key(SDIST.sub(str(ROOT), cmd.replace("$HOME/", ""))), []).append(cluster.name)
    return lines


def test_the_install_lines_are_found():
    lines = install_lines()
    assert {"README.md", "docs/getting-started.md"} <= set(lines[shlex.join(["-e", ".[cpu]"])])  # quick start
    assert "README.md" in lines[shlex.join(["-e", ".[cpu,dev,vllm-api,docs]"])]  # the test command
    gpu = [args for args in lines if "[vllm]" in args]
    assert gpu and sorted(n for a in gpu for n in lines[a]) == ["a100.yaml", "heterogeneous.yaml", "p5.yaml"], lines


LOCAL_EXTRAS = re.compile(r"^\.\[([a-z0-9,-]+)\]$")


def lines_to_resolve() -> list[str]:
    """One resolver run per requirement set that no other line contains: `-e .[cpu]` resolves
    whenever `-e .[cpu,dev,vllm-api,docs]` does, to the same pins, so only the larger set is run."""
    lines = sorted(install_lines())
    extras = {}
    for a in lines:
        argv = shlex.split(a)
        if len(argv) == 2 and argv[0] == "-e" and (m := LOCAL_EXTRAS.match(argv[1])):
            extras[a] = set(m.group(1).split(","))
    return [a for a in lines if not any(a in extras and extras[a] < other for other in extras.values())]


def test_only_contained_requirement_sets_are_skipped():
    skipped = set(install_lines()) - set(lines_to_resolve())
    assert skipped == {shlex.join(["-e", ".[cpu]"])}, skipped


def start_resolves(folder: Path) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Every resolver run at once, so that one's waits on the registry overlap the other's work.
    conftest.py starts them as the session starts when this module's tests are selected."""
    runs = {}
    for i, args in enumerate(lines_to_resolve()):
        report = folder / f"resolve{i}" / "report.json"
        report.parent.mkdir(parents=True)
        proc = subprocess.Popen([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                                 "--disable-pip-version-check", "--report", str(report), *shlex.split(args)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[args] = (proc, report)
    return runs


@pytest.fixture(scope="module")
def resolved(request, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    from conftest import RESOLVES

    runs = request.config.stash.get(RESOLVES, None) or start_resolves(tmp_path_factory.mktemp("resolves"))
    done = {}
    for args, (proc, report) in runs.items():
        out, err = proc.communicate(timeout=900)
        done[args] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), report)
    return done


@pytest.mark.parametrize("args", lines_to_resolve())
def test_install_line_resolves(args, resolved):
    proc, report = resolved[args]
    errors = [x for x in proc.stderr.splitlines() if "ERROR" in x or "conflict" in x.lower()]
    assert proc.returncode == 0, f"pip install {args}: " + " | ".join(errors or proc.stderr.splitlines()[-5:])
    versions = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    if "[vllm]" in args:  # the GPU set: vLLM's own torch
        assert versions["vllm"] == "0.33.0" and versions["torch"] == "2.14.0", versions
    elif "[cpu" in args:  # the CPU set every CPU timing in the docs was measured with
        assert versions["torch"].startswith("2.13.0") and versions["transformers"] == "5.23.0", versions
