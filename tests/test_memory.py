"""rlsr_ray.plan.memory against what the real code path keeps: the bytes autograd saves for backward,
counted with saved-tensor hooks on the tiny policy (each storage once, parameters left out)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rlsr_ray.plan.memory import Batch, ModelShape, learner_activation_bytes, reference_activation_bytes, state_bytes
from rlsr_ray.modeling.policy import enable_checkpointing, forward_logprobs, load_causal_lm, pad_batch

SMOLLM2_135M = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


def test_parameter_count_from_the_shape_matches_the_model(tiny_policy):
    model = load_causal_lm(tiny_policy)
    shape = ModelShape.from_config(json.load(open(os.path.join(tiny_policy, "config.json"))))
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied head counted once
    # SmolLM2-135M's published size: 134,515,008 parameters.
    assert ModelShape.from_config(SMOLLM2_135M).params == 134_515_008


def _saved_bytes(model, batch, chunk: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_logprobs(model, batch, 1.0, "float32", None, chunk)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [0, 16])
def test_the_plan_counts_what_autograd_keeps(tiny_policy, checkpointing, chunk):
    """Kept bytes (all but the backward working set) within 25 % of the saved tensors' bytes,
    with and without each memory feature, at two answer lengths."""
    model = load_causal_lm(tiny_policy).train()
    if checkpointing:
        enable_checkpointing(model)
    shape = ModelShape.from_config(json.load(open(os.path.join(tiny_policy, "config.json"))))
    for answer in (32, 96):
        b = pad_batch([[5] * 16, [6] * 10], [[7] * answer, [8] * (answer // 2)], 2)
        plan = learner_activation_bytes(shape, Batch(2, 16 + answer, answer), 4, checkpointing=checkpointing,
                                        chunk_tokens=chunk)
        kept = plan["total"] - plan["working"]
        saved = _saved_bytes(model, b, chunk)
        assert abs(kept - saved) <= 0.25 * saved, (answer, kept, saved)


def test_features_make_kept_activations_flat_in_the_answer_length():
    """With checkpointing and chunks, a 4k answer keeps per token what a 1k answer keeps (the
    logits chunk is a constant), and far less than without them."""
    s = ModelShape.from_config(SMOLLM2_135M)
    per_token = {}
    for on in (False, True):
        for t in (1024, 4096):
            p = learner_activation_bytes(s, Batch(2, 256 + t, t), 4, checkpointing=on, chunk_tokens=1024 if on else 0)
            per_token[on, t] = (p["total"] - p["working"]) / (2 * (256 + t))
    assert per_token[True, 4096] == pytest.approx(per_token[True, 1024], rel=0.05)
    assert per_token[True, 4096] < per_token[False, 4096] / 10


def test_zero_partitions_states_as_the_zero_paper_counts():
    """Mixed-precision AdamW: 2 + 2 + 12 bytes per parameter; ZeRO-1/2/3 divide 12, 14, 16 of them."""
    s = ModelShape.from_config(SMOLLM2_135M)
    n = s.params
    assert state_bytes(s, 0, 8, 2)["total"] == 16 * n
    assert state_bytes(s, 1, 8, 2)["total"] == pytest.approx(4 * n + 12 * n / 8)
    assert state_bytes(s, 2, 8, 2)["total"] == pytest.approx(2 * n + 14 * n / 8)
    assert state_bytes(s, 3, 8, 2)["total"] == pytest.approx(16 * n / 8)
    assert state_bytes(s, 0, 1, 4)["total"] == 16 * n  # float32: weights, gradients, two moments
    assert state_bytes(s, 3, 8, 2, offload_optimizer=True, offload_params=True)["total"] == pytest.approx(2 * n / 8)


def test_a_scoring_pass_keeps_nothing_and_chunks_bound_its_logits():
    s = ModelShape.from_config(SMOLLM2_135M)
    whole = reference_activation_bytes(s, Batch(4, 4352, 4096), 4)
    chunked = reference_activation_bytes(s, Batch(4, 4352, 4096), 4, chunk_tokens=1024)
    assert chunked["total"] < whole["total"] / 2
    assert reference_activation_bytes(s, Batch(4, 4352, 4096), 4, chunk_tokens=1024)["working"] >= \
        1024 * s.vocab * 8  # one chunk's float32 logits and their exp()
