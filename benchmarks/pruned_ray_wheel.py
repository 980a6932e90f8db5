"""Build a smaller Ray wheel for machines that can only receive a few tens of MB (the GPU check).

Drops what a Python-only, dashboard-less Ray never loads: `ray/jars/` (Java workers, ~32 MB) and
the dashboard's prebuilt web client (`ray/dashboard/client/`); RECORD is rewritten to match, so
pip installs the result as the same `ray` version. The Ray that rlsr_ray starts itself runs
without a dashboard, so nothing it runs needs either.

    python benchmarks/pruned_ray_wheel.py --python 3.12 --out wheels/     # downloads from PyPI
    python benchmarks/pruned_ray_wheel.py --wheel ray-2.60.0-....whl --out wheels/
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DROPPED = ("ray/jars/", "ray/dashboard/client/")


def pruned_names(names: list[str]) -> list[str]:
    return [n for n in names if not n.startswith(DROPPED)]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def prune(wheel: Path, out_dir: Path) -> Path:
    """Write the pruned copy of `wheel` into out_dir (same file name); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in pruned_names(names):
            if name == record:
                continue
            data = src.read(name)
            dst.writestr(src.getinfo(name), data)
            lines.append(_record_line(name, data))
        dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    return target


def download(version: str, python: str, out_dir: Path) -> Path:
    tag = python.replace(".", "")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--platform", "manylinux2014_x86_64", "-d", str(out_dir),
                    f"ray=={version}"], check=True)
    return next(out_dir.glob(f"ray-{version}-cp{tag}-*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", help="a Ray wheel; without it one is downloaded")
    ap.add_argument("--version", default="2.60.0")
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    ap.add_argument("--out", default="wheels")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(args.wheel) if args.wheel else download(args.version, args.python, Path(tmp))
        target = prune(wheel, Path(args.out))
        print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB -> {target} {target.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
