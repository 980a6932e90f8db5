"""The weight route's pure parts: specs, bucket plans, packing, and what crosses vLLM's RPC."""
from __future__ import annotations

import msgpack
import pytest
import torch

from actors.vllm_backend import specs_from_rpc, specs_to_rpc
from rlsr_ray.weight_sync import RouteSettings, TensorSpec, bucket_plan, pack, tensor_specs, unpack


def test_tensor_specs_keep_order_and_send_tied_weights_once():
    emb = torch.zeros(10, 4)
    sd = {"embed.weight": emb, "layer.weight": torch.zeros(4, 4), "lm_head.weight": emb}
    assert tensor_specs(sd) == [TensorSpec("embed.weight", (10, 4)), TensorSpec("layer.weight", (4, 4))]


def test_bucket_plan_is_consecutive_bounded_and_complete():
    specs = [TensorSpec(f"t{i}", (n,)) for i, n in enumerate([3, 3, 10, 1, 1, 1, 2])]
    plan = bucket_plan(specs, itemsize=4, bucket_bytes=24)  # 6 values per bucket
    assert plan == [[0, 1], [2], [3, 4, 5, 6]]  # t2 (40 bytes) goes alone
    assert [i for b in plan for i in b] == list(range(len(specs)))
    assert bucket_plan(specs, 4, 10**9) == [list(range(len(specs)))]


def test_pack_unpack_round_trip_in_the_wire_dtype():
    a, b = torch.randn(2, 3), torch.randn(5)
    flat = pack([a, b], torch.bfloat16, "cpu")
    assert flat.dtype == torch.bfloat16 and flat.shape == (11,)
    (na, ua), (nb, ub) = unpack(flat, [TensorSpec("a", (2, 3)), TensorSpec("b", (5,))])
    assert (na, nb) == ("a", "b")
    assert torch.equal(ua, a.to(torch.bfloat16)) and torch.equal(ub, b.to(torch.bfloat16))
    with pytest.raises(ValueError, match="holds 11 values, specs need 6"):
        unpack(flat, [TensorSpec("a", (2, 3))])


def test_only_plain_values_cross_vllms_rpc():
    """vLLM's multiprocess engine msgpack-encodes collective_rpc arguments and decodes them untyped:
    what the backend sends must come back equal from a plain msgpack round trip."""
    specs = [TensorSpec("model.embed_tokens.weight", (151936, 896)), TensorSpec("model.norm.weight", (896,))]
    settings = RouteSettings(world_size=3, backend="nccl", dtype="bfloat16", bucket_bytes=256_000_000, timeout_s=300.0)
    payload = ["tcp://10.0.0.1:29500", 1, settings.to_list(), specs_to_rpc(specs)]
    decoded = msgpack.unpackb(msgpack.packb(payload))
    assert decoded == payload
    assert specs_from_rpc(decoded[3]) == specs and RouteSettings(*decoded[2]) == settings


def test_the_nccl_route_fails_after_the_configured_timeout_not_torchs_ten_minutes():
    """NCCL needs CUDA: a STAND-IN for torch.distributed's ProcessGroupNCCL records what it is
    built with, as torch's own _new_process_group_helper builds it (Options, then the group)."""
    import datetime
    from types import SimpleNamespace

    from rlsr_ray.weight_sync import nccl_group

    class StandInNCCL:
        Options = SimpleNamespace  # torch: ProcessGroupNCCL.Options(), then attributes set on it

        def __init__(self, store, rank, size, options):
            self.args = (store, rank, size, options)

    pg = nccl_group(SimpleNamespace(ProcessGroupNCCL=StandInNCCL), "store", 1, 3, datetime.timedelta(seconds=42))
    store, rank, size, options = pg.args
    assert (store, rank, size) == ("store", 1, 3)
    assert options._timeout == datetime.timedelta(seconds=42) and options.is_high_priority_stream is False
