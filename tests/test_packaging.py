"""The wheel (and so a cluster node's install from the sdist) holds every module of the checkout:
a wing left out of the package list would import here, from the checkout, and fail only there."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    # Built from a copy of the tracked files: a build/ folder left in the checkout would hand
    # setuptools the modules of an earlier build.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    wanted = [p for p in tracked
              if p.startswith(("rlsr_ray/", "actors/")) and p.endswith((".py", ".yaml", ".jsonl", ".txt"))]
    assert len(wanted) > 50 and [p for p in wanted if p not in names] == []
