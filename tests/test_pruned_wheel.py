"""The pruned Ray wheel keeps everything but Java jars and the dashboard's web client, with a
RECORD whose hashes match the files it holds."""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from pruned_ray_wheel import prune  # noqa: E402

FILES = {
    "ray/__init__.py": b"version = '2.60.0'\n",
    "ray/jars/ray_dist.jar": b"\0" * 1000,
    "ray/dashboard/client/build/index.html": b"<html></html>",
    "ray/dashboard/modules/job/job_head.py": b"# kept: the job API server is Python\n",
    "ray-2.60.0.dist-info/WHEEL": b"Wheel-Version: 1.0\n",
}


def test_prune_drops_jars_and_web_client_and_rewrites_record(tmp_path):
    wheel = tmp_path / "in" / "ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in FILES.items():
            z.writestr(name, data)
        z.writestr("ray-2.60.0.dist-info/RECORD", "\n".join(f"{n},," for n in FILES) + "\n")
    out = prune(wheel, tmp_path / "out")
    assert out.name == wheel.name
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert names == {"ray/__init__.py", "ray/dashboard/modules/job/job_head.py", "ray-2.60.0.dist-info/WHEEL",
                         "ray-2.60.0.dist-info/RECORD"}
        rows = [line.split(",") for line in z.read("ray-2.60.0.dist-info/RECORD").decode().splitlines()]
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                assert (digest, size) == ("", "")
                continue
            data = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
