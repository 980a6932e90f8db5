"""DeepSpeed's CPU shared-memory comm op, which the learners do without.

`deepspeed.init_distributed` JIT-builds it on a CPU machine (about a minute) under a `lock` file
that torch's FileBaton waits on with no deadline, on every load, even when nothing needs building:
a build killed midway (Ctrl-C on a first run) left the lock, and every later run waited forever.
The op serves only DeepSpeed's inference all-reduce (`dist.inference_all_reduce`, its AutoTP
layers); the learners' gradient and ZeRO collectives go through torch.distributed (gloo on CPU)
whether it is built or not. So it is marked incompatible before the group is joined, and nothing is
built, loaded or waited on: two runs starting together build nothing, and a first run is a minute
shorter. DeepSpeed keeps its probe of compatible ops in one module-level dict for this purpose
(`deepspeed.ops.__compatible_ops__`: "edits to it persist").
"""
from __future__ import annotations

import os
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def extensions_dir(cache_dir: Path) -> Path:
    """Where a build of the op would have gone: TORCH_EXTENSIONS_DIR, else the folder earlier
    rlsr_ray versions built it in."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache_dir / "torch_extensions")


def without_shm_op(cache_dir: Path) -> str:
    """Keep DeepSpeed from building or loading the op in this process; returns what was done, for
    the run's log (a lock left by an interrupted build is named: it is not waited on)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False
    lock = extensions_dir(cache_dir) / SHM_OP / "lock"
    said = (f"DeepSpeed's shared-memory comm op ({SHM_OP}) is not built or loaded: gloo carries the "
            "learners' collectives")
    if lock.exists():
        said += f"; the build lock {lock}, left by an interrupted build, is not waited on"
    return said
