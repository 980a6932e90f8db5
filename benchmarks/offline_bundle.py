"""Everything `benchmarks/gpu_ray_check.py` needs on a GPU machine that has torch, transformers and
sentence-transformers but no package index, in one folder (about 54 MB):

    python benchmarks/offline_bundle.py --python 3.12 --out bundle/
    # on the GPU machine, in this repository:
    pip install --no-index --no-deps --target /tmp/site bundle/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python benchmarks/gpu_ray_check.py --tiny bundle/tiny --out gpu_ray_check_out

Ray without its jars and web client (benchmarks/pruned_ray_wheel.py), DeepSpeed as the
pure-Python wheel pip builds from its source, the small packages those two need beyond such a
machine's (found on an H200 image with torch 2.11, transformers 5.17, sentence-transformers 6.0),
and the tiny policy's tokenizer files and config.json, which is all the check reads of it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Ray's and DeepSpeed's requirements that a CUDA image with torch, transformers and
# sentence-transformers did not hold (the rest, e.g. msgpack, protobuf, psutil, ninja, it did).
MISSING = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
           "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TINY_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def bundle(out: Path, python: str, ray_version: str, deepspeed_version: str, tiny: str) -> list[Path]:
    from pruned_ray_wheel import download, prune

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prune(download(ray_version, python, Path(tmp)), out)
    pip("wheel", "-q", "--no-deps", "-w", str(out), f"deepspeed=={deepspeed_version}")
    target = ["--python-version", python, "--implementation", "cp"]
    for p in PLATFORMS:
        target += ["--platform", p]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(out), *MISSING)
    (out / "tiny").mkdir(exist_ok=True)
    for name in TINY_FILES:
        if (Path(tiny) / name).exists():
            shutil.copy2(Path(tiny) / name, out / "tiny" / name)
    return sorted(out.glob("*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bundle")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (wheels are picked for it)")
    ap.add_argument("--ray", default="2.60.0")
    ap.add_argument("--deepspeed", default="0.19.8")
    ap.add_argument("--tiny", help="the tiny policy's folder (default: built from the SmolLM2 GGUF package)")
    args = ap.parse_args()
    tiny = args.tiny
    if tiny is None:
        from rlsr_ray.modeling.models import TINY, resolve_policy

        tiny = resolve_policy(TINY, "~/.cache/rlsr_ray")
    wheels = bundle(Path(args.out), args.python, args.ray, args.deepspeed, tiny)
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(f"{len(wheels)} wheels and the tiny policy's tokenizer in {args.out}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
