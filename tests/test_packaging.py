"""The wheel (and so a cluster node's install from the sdist) holds every module of the checkout:
a wing left out of the package list would import here, from the checkout, and fail only there."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    tracked = subprocess.run(["git", "ls-files", "rlsr_ray", "actors"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    wanted = [p for p in tracked if p.endswith((".py", ".yaml", ".jsonl", ".txt"))]
    assert len(wanted) > 50 and [p for p in wanted if p not in names] == []
