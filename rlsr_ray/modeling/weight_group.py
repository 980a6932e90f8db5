"""Weights from learner rank 0 to every rollout actor over a process group of their own.

The route is a torch.distributed group separate from the learners' DeepSpeed group: rank 0 is
learner rank 0, ranks 1..R the rollout actors (or, with vLLM, the worker inside each engine).
Weights travel as broadcasts of flat buckets in the rollout's dtype, in the fixed order of the
policy's `TensorSpec`s, so every member slices the same buckets out of the same stream; the only
things that go through Ray are the address, the specs (names and shapes) and the version.

gloo on CPU, NCCL where both sides are on CUDA. On a loopback-only Ray the members meet in a file
store (a TCP store would listen on every interface), as the learners do.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    name: str  # state-dict key on the learner (transformers naming)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RouteSettings:
    world_size: int  # 1 + number of rollout actors
    backend: str  # "gloo" or "nccl"
    dtype: str  # the rollout's weight dtype: what travels
    bucket_bytes: int  # one broadcast carries at most this much (a larger tensor goes alone)
    timeout_s: float  # a member that neither sends nor receives fails the others after this

    def to_list(self) -> list:
        """Plain values for an RPC that only carries msgpack types (vLLM's collective_rpc)."""
        return [self.world_size, self.backend, self.dtype, self.bucket_bytes, self.timeout_s]


def tensor_specs(state_dict: dict[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs in state-dict order; tied weights (lm_head = embeddings) travel once."""
    specs, seen = [], set()
    for name, t in state_dict.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        specs.append(TensorSpec(name, tuple(t.shape)))
    return specs


def bucket_plan(specs: Sequence[TensorSpec], itemsize: int, bucket_bytes: int) -> list[list[int]]:
    """Consecutive spec indices per bucket, each at most bucket_bytes (a larger tensor goes alone)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, s in enumerate(specs):
        nbytes = s.numel * itemsize
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device: str) -> torch.Tensor:
    """One flat buffer of `dtype` on `device` holding the tensors back to back."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    at = 0
    for t in tensors:
        flat[at:at + t.numel()].copy_(t.detach().reshape(-1))
        at += t.numel()
    return flat


def unpack(flat: torch.Tensor, specs: Sequence[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat`, one per spec, in order."""
    out, at = [], 0
    for s in specs:
        out.append((s.name, flat[at:at + s.numel].view(s.shape)))
        at += s.numel
    if at != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} values, specs need {at}")
    return out


class WeightGroup:
    """One member of a route. Rank 0 sends, the others receive; every call is collective."""

    def __init__(self, address: str, rank: int, settings: RouteSettings):
        import torch.distributed as dist

        self.rank, self.s = rank, settings
        world_size = settings.world_size
        self.device = "cuda" if settings.backend == "nccl" else "cpu"
        timeout = datetime.timedelta(seconds=settings.timeout_s)
        if address.startswith("file://"):
            store = dist.FileStore(address[len("file://"):], world_size)
        elif address.startswith("tcp://"):
            host, _, port = address[len("tcp://"):].rpartition(":")
            store = dist.TCPStore(host.strip("[]"), int(port), world_size, rank == 0, timeout)
        else:
            raise ValueError(f"weight route address {address!r} is neither file:// nor tcp://")
        if settings.backend == "nccl":
            self.pg = nccl_group(dist, store, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            # A file store means every member is on this machine: gloo's pairs then listen on
            # loopback, not on the address the host name resolves to.
            host = "127.0.0.1" if address.startswith("file://") else None
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if host
                                else dist.ProcessGroupGloo.create_default_device()]
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, options)
        self.barrier()  # every member is connected: the file store is no longer read
        if rank == 0 and address.startswith("file://"):
            Path(address[len("file://"):]).unlink(missing_ok=True)

    def barrier(self) -> None:
        t = torch.zeros(1, device=self.device)
        self.pg.allreduce([t]).wait()

    def _buckets(self, specs: Sequence[TensorSpec]) -> list[list[int]]:
        itemsize = torch.empty(0, dtype=DTYPES[self.s.dtype]).element_size()
        return bucket_plan(specs, itemsize, self.s.bucket_bytes)

    def send(self, tensors: Mapping[str, torch.Tensor], specs: Sequence[TensorSpec]) -> int:
        """Rank 0: broadcast the tensors named by `specs`; returns the bytes sent."""
        wire = DTYPES[self.s.dtype]
        sent = 0
        for idx in self._buckets(specs):
            flat = pack([tensors[specs[i].name] for i in idx], wire, self.device)
            self.pg.broadcast([flat], _root0()).wait()
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, specs: Sequence[TensorSpec]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ranks 1..R: the buckets as they arrive, as (name, tensor) views into a fresh buffer."""
        wire = DTYPES[self.s.dtype]
        for idx in self._buckets(specs):
            chunk = [specs[i] for i in idx]
            flat = torch.empty(sum(s.numel for s in chunk), dtype=wire, device=self.device)
            self.pg.broadcast([flat], _root0()).wait()
            yield unpack(flat, chunk)


def nccl_group(dist, store, rank: int, world_size: int, timeout: datetime.timedelta):
    """An NCCL group whose collectives fail after `timeout`, as torch's own
    `_new_process_group_helper` builds one. Without options NCCL takes torch's default (10 min),
    and its watchdog then ends the whole process (a vLLM engine) instead of failing the broadcast."""
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def _root0():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts

