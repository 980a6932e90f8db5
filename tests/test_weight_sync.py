"""The weight route's pure parts: specs, bucket plans, packing, the NCCL group's options. What
crosses vLLM's RPC is checked with vLLM's own encoder in test_vllm_api.py."""
from __future__ import annotations

import pytest
import torch

from rlsr_ray.modeling.weight_group import TensorSpec, bucket_plan, pack, tensor_specs, unpack


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


def test_the_nccl_route_fails_after_the_configured_timeout_not_torchs_ten_minutes():
    """NCCL needs CUDA: a STAND-IN for torch.distributed's ProcessGroupNCCL records what it is
    built with, as torch's own _new_process_group_helper builds it (Options, then the group)."""
    import datetime
    from types import SimpleNamespace

    from rlsr_ray.modeling.weight_group import nccl_group

    class StandInNCCL:
        Options = SimpleNamespace  # torch: ProcessGroupNCCL.Options(), then attributes set on it

        def __init__(self, store, rank, size, options):
            self.args = (store, rank, size, options)

    pg = nccl_group(SimpleNamespace(ProcessGroupNCCL=StandInNCCL), "store", 1, 3, datetime.timedelta(seconds=42))
    store, rank, size, options = pg.args
    assert (store, rank, size) == ("store", 1, 3)
    assert options._timeout == datetime.timedelta(seconds=42) and options.is_high_priority_stream is False
