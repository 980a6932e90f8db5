"""LoRA in-process (no Ray): adapters on the tiny random policy with the real peft and DeepSpeed."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_actors import SPEC, learner, settings

from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.rollout import RolloutActor
from rlsr_ray.contract import batch
from rlsr_ray import data
from rlsr_ray.modeling import lora
from rlsr_ray.algo.terms import paper
from rlsr_ray.config import ConfigError, load_config
from rlsr_ray.driver.step import build_train_table

# alpha / rank = 2, the adapters on attention and MLP projections (all of Llama's).
LORA = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.0,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    tok = data.tokenize(data.load_examples(None)[:4], tiny_tokenizer, 128, "drop")
    return data.prompts_table(tok, [0, 1, 2, 3], first_group_id=0)


@pytest.fixture(scope="module")
def reward(minilm_path):
    return RewardActor(paper(minilm_path))


@pytest.fixture(scope="module")
def rolled(tiny_policy, prompts):
    return RolloutActor(tiny_policy, generate_batch_size=16).generate(prompts, SPEC)


@pytest.fixture(scope="module")
def trained(tiny_policy, rolled, reward):
    """A LoRA learner after one AdamW step (B moves off zero), and the TRAIN table it took."""
    train = build_train_table(rolled, reward.score(rolled), ReferenceActor(tiny_policy).logprobs(rolled), True)
    lrn = learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2, lora=LORA))
    base = {k: v.clone() for k, v in lrn.engine.module.state_dict().items() if ".lora_" not in k}
    stats = lrn.train_step([train], [float(sum(len(x) for x in train.column("response_ids").to_pylist()))])
    assert stats["tokens"] > 0 and np.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    return lrn, base, train


def _logprobs(table) -> np.ndarray:
    return np.concatenate(table.column("rollout_logprobs").to_numpy(zero_copy_only=False))


def test_adapters_start_at_zero_effect(tiny_policy, prompts, rolled):
    """B = 0: each adapted layer adds exactly 0.0 to its base output, so rollout and learner with
    fresh adapters compute the base's numbers and sample the same tokens. The learner's are equal
    bit for bit. generate() is another matter: the wrapped model's activations are other buffers,
    and the BLAS may take another code path for them (MKL is reproducible across buffers only in
    its CNR mode), which may sum a dot product in another order. A float32 sum of n terms in
    another order moves by at most about n*u of the terms' magnitude (Higham's gamma_n, u = 2^-24):
    n is the model's longest reduction (its MLP width), and the log-probs are of order 1e1, so the
    bound is n*u*|logprob|. The tokens stay exact."""
    adapted = RolloutActor(tiny_policy, generate_batch_size=16, lora=LORA).generate(prompts, SPEC)
    assert adapted.column("response_ids").equals(rolled.column("response_ids"))
    config = json.loads((Path(tiny_policy) / "config.json").read_text())
    n = max(config["hidden_size"], config["intermediate_size"])
    base = _logprobs(rolled)
    np.testing.assert_allclose(_logprobs(adapted), base, rtol=0, atol=n * 2.0**-24 * np.abs(base).max())
    full = learner(tiny_policy, settings(micro_batch_size=8))
    fresh = learner(tiny_policy, settings(micro_batch_size=8, lora=LORA))
    np.testing.assert_array_equal(np.concatenate(fresh.logprobs(rolled)), np.concatenate(full.logprobs(rolled)))
    ref = ReferenceActor(tiny_policy, micro_batch_size=8).logprobs(rolled)
    np.testing.assert_array_equal(np.concatenate(fresh.reference_logprobs(rolled).column("ref_logprobs").to_pylist()),
                                  np.concatenate(ref.column("ref_logprobs").to_pylist()))


def test_training_moves_the_adapters_only(trained):
    lrn, base, _ = trained
    now = lrn.engine.module.state_dict()
    for k, v in base.items():
        assert torch.equal(now[k], v), k  # the base is the reference: never touched
    b = [v for k, v in now.items() if ".lora_B." in k]
    assert b and all(v.abs().max() > 0 for v in b)
    # Optimizer states for the adapters alone: two moments per adapter tensor.
    opt = lrn.engine.optimizer
    stepped = [p for g in opt.param_groups for p in g["params"]]
    assert len(stepped) == len(lora.adapter_tensors(lrn.engine.module))
    assert all(set(opt.state[p]) >= {"exp_avg", "exp_avg_sq"} for p in stepped)


def test_reference_under_lora_is_the_base_bit_for_bit(tiny_policy, trained, rolled):
    """Adapters off, peft calls each base layer alone: the same weights through the same code as
    a plain base-model pass with the same micro-batches, so the same bits."""
    lrn, _, _ = trained
    ours = lrn.reference_logprobs(rolled)
    assert ours.schema.equals(batch.REF_LOGPROBS)
    plain = ReferenceActor(tiny_policy, micro_batch_size=8).logprobs(rolled)
    assert ours.column("ref_logprobs").equals(plain.column("ref_logprobs"))
    # ... and the adapters do change the policy itself.
    assert np.abs(np.concatenate(lrn.logprobs(rolled)) - np.concatenate(ours.column("ref_logprobs").to_pylist())
                  ).max() > 1e-6


def test_a_sync_moves_the_adapters_and_the_rollout_computes_the_learners_policy(tiny_policy, trained, prompts):
    lrn, _, _ = trained
    sent = lrn.export_weights()
    assert set(sent) == set(lora.adapter_tensors(lrn.engine.module))
    # rank x (in + out) float32 values per adapted layer: 4 x (64 + 64) x 4 attention ones
    # (k, v: 64 -> 32), 4 x (64 + 128) x 3 MLP ones, over two layers.
    per_layer = 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert sum(v.nbytes for v in sent.values()) == 2 * per_layer * 4
    rollout = RolloutActor(tiny_policy, generate_batch_size=16, lora=LORA)
    rollout.load_weights(sent, version=1)
    # Effective weights: the same float32 adapter values through the same merge arithmetic
    # (W + (B A) x scale) on both sides, so equal bit for bit; and equal to peft's own merge.
    mine, theirs = lora.merged_state_dict(rollout.backend.model), lora.merged_state_dict(lrn.engine.module)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    peft_merged = copy.deepcopy(lrn.engine.module).merge_and_unload().state_dict()
    assert all(torch.equal(peft_merged[k], theirs[k]) for k in theirs)
    new = rollout.generate(prompts, SPEC)
    # float32, KV-cached decoding against one padded pass: rounding only (test_actors' bound).
    np.testing.assert_allclose(np.concatenate(lrn.logprobs(new)), _logprobs(new), atol=2e-4)
    with pytest.raises(ValueError, match="do not fit the rollout model"):
        rollout.load_weights({k: v for k, v in list(sent.items())[1:]}, version=2)


def test_checkpoint_is_a_peft_adapter_with_a_merged_folder_and_resumes_exactly(tiny_policy, trained, rolled,
                                                                               tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lrn, _, train = trained
    state = {"step": 1, "policy_version": 1, "cursor": {"epoch": 0, "position": 4}, "reference_policy": tiny_policy}
    folder = tmp_path / "step_1"
    lrn.save_pretrained(str(folder), state, merged=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == tiny_policy
    assert not list(folder.glob("model*.safetensors"))  # the adapter only: the base is model.policy
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy), str(folder))
    want = lrn.engine.module.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in peft_model.state_dict().items() if ".lora_" in k)
    merged = AutoModelForCausalLM.from_pretrained(str(folder / lora.MERGED)).state_dict()
    folded = lora.merged_state_dict(lrn.engine.module)
    assert all(torch.equal(merged[k], folded[k]) for k in merged)
    # Either folder loads where a policy is taken (eval, serve): the adapter one merged on load.
    from rlsr_ray.modeling.policy import load_causal_lm

    via_adapter = load_causal_lm(str(folder)).state_dict()
    assert all(torch.equal(via_adapter[k], merged[k]) for k in merged)

    resumed = learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2, lora=LORA, seed=5))
    assert resumed.load_checkpoint(str(folder))["lora"] == LORA.to_dict()
    norm = [float(sum(len(x) for x in train.column("response_ids").to_pylist()))]
    a, b = lrn.train_step([train], norm), resumed.train_step([train], norm)
    assert a["pg_sum"] == b["pg_sum"] and a["grad_norm"] == b["grad_norm"]
    theirs = lora.adapter_tensors(resumed.engine.module)
    assert all(torch.equal(v, theirs[k]) for k, v in lora.adapter_tensors(lrn.engine.module).items())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_stages_with_the_memory_features_train_the_same_adapters(tiny_policy, trained, zero_stage):
    """ZeRO-2 and ZeRO-3 (which partitions the frozen base too and gathers only the adapters to
    sync) with gradient checkpointing and chunked log-probs (the LM head found under peft's
    wrapper; under ZeRO-3 a frozen head, gathered for the chunks' recompute in backward by
    policy._zero3_chunked): what is kept changes, not the gradient. With plain SGD one step is the
    plain ZeRO-0 step up to float32 rounding (test_actors' UPDATE_RTOL)."""
    from test_actors import assert_same_update

    _, _, train = trained
    norm = [float(sum(len(x) for x in train.column("response_ids").to_pylist()))]
    deltas = []
    for stage, lean in ((0, False), (zero_stage, True)):
        lrn = learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2, lr=1.0, optimizer="sgd",
                                            zero_stage=stage, lora=LORA, gradient_checkpointing=lean,
                                            logprob_chunk_tokens=5 if lean else 0))
        before = lrn.export_weights()
        lrn.train_step([train], norm)
        deltas.append({k: v - before[k] for k, v in lrn.export_weights().items()})
    assert deltas[0].keys() == deltas[1].keys()
    assert_same_update(*deltas)


@pytest.mark.parametrize("override, message", [
    ("--train.lora.rank=0", "train.lora.rank: 0 is out of range; must be >= 1"),
    ("--train.lora.target_modules=[lm_head]", "train.lora.target_modules: 'lm_head' is out of range; adapters go "
                                              "on the decoder's linear layers"),
])
def test_bad_lora_settings_get_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["--train.lora.enabled=true", override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_an_unknown_target_module_is_named_before_any_weights_load(tiny_policy):
    bad = lora.LoraSpec(4, 8.0, 0.0, ("q_proj", "qkv_proj"))
    with pytest.raises(lora.LoraError) as e:
        lora.check_targets(tiny_policy, bad)
    assert str(e.value).startswith(f"train.lora.target_modules: 'qkv_proj' is no linear layer of {tiny_policy} "
                                   "(its layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)")
    lora.check_targets(tiny_policy, LORA)
