"""The actor roles in-process (no Ray), with a tiny random policy and the real MiniLM and DeepSpeed."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from actors.learner import LearnerActor, LearnerSettings
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.rollout import RolloutActor
from actors.sampling import SamplingSpec
from rlsr_ray.contract import batch
from rlsr_ray import data
from rlsr_ray.driver.step import build_train_table
from rlsr_ray.algo.loss import LossSettings
from rlsr_ray.algo.terms import paper

SPEC = SamplingSpec(n=4, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3)


def settings(micro_batch_size=8, micro_steps=1, lr=1e-3, zero_stage=0, **kw):
    return LearnerSettings(lr=lr, adam_betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, zero_stage=zero_stage,
                           micro_batch_size=micro_batch_size, micro_steps=micro_steps,
                           loss=LossSettings(0.2, 0.001, "k3", "token_mean"), temperature=1.0,
                           compute_dtype="float32", recompute_old_logprobs=False, **kw)


def learner(tiny_policy, s):
    lrn = LearnerActor(tiny_policy, s)
    lrn.setup(lrn.rendezvous())
    return lrn


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    tok = data.tokenize(data.load_examples(None)[:4], tiny_tokenizer, 128, "drop")
    return data.prompts_table(tok, [0, 1, 2, 3], first_group_id=0)


@pytest.fixture(scope="module")
def rollout(tiny_policy):
    return RolloutActor(tiny_policy, generate_batch_size=6)


@pytest.fixture(scope="module")
def reward(minilm_path):
    return RewardActor(paper(minilm_path))


def test_rollout_rows_follow_contract(rollout, prompts):
    out = rollout.generate(prompts, SPEC)
    assert len(out) == 16 and out.schema.equals(batch.ROLLOUTS)
    assert out.column("sample_idx").to_pylist() == [0, 1, 2, 3] * 4
    lengths = [len(x) for x in out.column("response_ids").to_pylist()]
    reasons = out.column("finish_reason").to_pylist()
    assert all((n == 12) == (r == "length") or r == "stop" for n, r in zip(lengths, reasons))
    again = rollout.generate(prompts, SPEC)
    assert again.column("response_ids").equals(out.column("response_ids"))  # seeded per call


# float32: the three roles run the same maths on differently shaped batches (KV-cached decoding,
# micro-batches of 5 and 8), so they differ by rounding only, far below 2e-4. bfloat16 autocast
# rounds every matmul input to 8 significant bits (relative 2**-9); over the tiny model's two layers
# and the logsumexp a log-prob may move by a few times that relative to the logits' scale, so the
# bound is 2**-5 on any token and 2**-8 on average.
@pytest.mark.parametrize("temperature, dtype, atol, mean_atol", [
    (1.0, "float32", 2e-4, 2e-4), (0.8, "float32", 2e-4, 2e-4), (0.8, "bfloat16", 2**-5, 2**-8)])
def test_logprobs_agree_at_step_zero(tiny_policy, prompts, temperature, dtype, atol, mean_atol):
    rollout = RolloutActor(tiny_policy, generate_batch_size=6, compute_dtype=dtype)
    rolled = rollout.generate(prompts, SamplingSpec(4, 12, temperature, 1.0, seed=3))
    ref = ReferenceActor(tiny_policy, micro_batch_size=5, compute_dtype=dtype,
                         temperature=temperature).logprobs(rolled)
    lrn = learner(tiny_policy, LearnerSettings(**{**settings().__dict__, "temperature": temperature,
                                                 "compute_dtype": dtype}))
    ours = np.concatenate(lrn.logprobs(rolled))
    rl = np.concatenate(rolled.column("rollout_logprobs").to_numpy(zero_copy_only=False))
    rf = np.concatenate(ref.column("ref_logprobs").to_numpy(zero_copy_only=False))
    for other in (rf, ours):
        np.testing.assert_allclose(rl, other, atol=atol)
        assert np.abs(rl - other).mean() <= mean_atol


def test_reward_actor_scores_and_penalises(reward):
    ref = "Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit. " * 2
    t = pa.Table.from_pydict({
        "group_id": [0, 0, 0], "sample_idx": [0, 1, 2], "prompt_ids": [[1]] * 3, "reference_text": [ref] * 3,
        "prompt_text": ["q"] * 3, "data_json": ["{}"] * 3, "response_ids": [[5]] * 3,
        "response_text": ["It boils at 100 C.", "Bananas are yellow.", ref],
        "rollout_logprobs": [[-1.0]] * 3, "finish_reason": ["stop"] * 3, "policy_version": [0] * 3,
    }, schema=batch.ROLLOUTS)
    out = reward.score(t)
    sim = out.column("similarity").to_pylist()
    assert sim[0] > sim[1] + 0.2 and sim[2] == pytest.approx(1.0, abs=1e-5)
    assert out.column("copy_penalty").to_pylist() == [0.0, 0.0, 1.0]
    assert out.column("reward").to_pylist()[2] == -1.0


def _train_table(tiny_policy, rollout, reward, prompts):
    rolled = rollout.generate(prompts, SPEC)
    ref = ReferenceActor(tiny_policy).logprobs(rolled)
    return build_train_table(rolled, reward.score(rolled), ref, std_norm=True)


def test_learner_step_changes_weights_and_rollout_receives_them(tiny_policy, prompts, reward):
    rollout = RolloutActor(tiny_policy, generate_batch_size=16)
    train = _train_table(tiny_policy, rollout, reward, prompts)
    lrn = learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2))
    before = {k: v.copy() for k, v in lrn.export_weights().items()}
    stats = lrn.train_step([train], [float(sum(len(x) for x in train.column("response_ids").to_pylist()))])
    assert stats["tokens"] > 0 and np.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    after = lrn.export_weights()
    assert max(np.abs(after[k] - before[k]).max() for k in before) > 1e-5
    rollout.load_weights(after, version=1)
    for k, v in rollout.backend.model.state_dict().items():
        if k in after:
            np.testing.assert_array_equal(v.numpy(), after[k])
    new = rollout.generate(prompts, SPEC)
    assert set(new.column("policy_version").to_pylist()) == {1}
    np.testing.assert_allclose(np.concatenate(lrn.logprobs(new)),
                               np.concatenate(new.column("rollout_logprobs").to_numpy(zero_copy_only=False)),
                               atol=2e-4)


def _update(lrn, minibatches, norms) -> dict:
    w0 = {k: v.copy() for k, v in lrn.export_weights().items()}
    lrn.train_step(minibatches, norms)
    return {k: v - w0[k] for k, v in lrn.export_weights().items()}


# Layouts that should agree are compared with plain SGD, whose update -lr * clip(g) is linear in
# the gradient, so the only difference left is float32 rounding in the sums that make g. Those
# sums run over at most a few thousand terms here (tokens x hidden width, 64-128); the worst-case
# float32 bound n * 2**-24 is then below 1e-4 of the update's size. Bugs are far larger: a
# mis-scaled rank moves it by 2x, one lost sequence of 16 by about 1/16.
UPDATE_RTOL = 1e-4


def assert_same_update(a: dict, b: dict) -> None:
    scale = max(np.abs(v).max() for v in a.values())
    assert scale > 0
    worst = max(np.abs(a[k] - b[k]).max() for k in a)
    assert worst <= UPDATE_RTOL * scale, (worst, scale)


def test_learner_update_invariant_to_micro_batching(tiny_policy, prompts, reward, rollout):
    """One mini-batch of 16 sequences: 1 micro-batch of 16 == 16 micro-batches of 1."""
    train = _train_table(tiny_policy, rollout, reward, prompts)
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    deltas = [_update(learner(tiny_policy, settings(micro_batch_size=micro, micro_steps=steps, lr=1.0,
                                                    optimizer="sgd")), [train], [norm])
              for micro, steps in ((16, 1), (1, 16))]
    assert_same_update(*deltas)


@pytest.mark.parametrize("zero_stage, offload", [(0, False), (3, False), (3, True)])
def test_checkpointing_and_chunked_logprobs_give_the_same_update(tiny_policy, prompts, reward, rollout, zero_stage,
                                                                 offload):
    """The memory features change what is kept for backward, not the gradient: gradient
    checkpointing recomputes the same layers, chunked log-probs block the same sums differently
    (rounding only). Under ZeRO-3 too, whose parameter hooks see the LM head called chunk by
    chunk and again in backward, and with its parameters and optimizer offloaded to host memory."""
    train = _train_table(tiny_policy, rollout, reward, prompts)
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    plain = _update(learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2, lr=1.0, optimizer="sgd")),
                    [train], [norm])
    lean = _update(learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2, lr=1.0, optimizer="sgd",
                                                 zero_stage=zero_stage, gradient_checkpointing=True,
                                                 logprob_chunk_tokens=5, offload_optimizer=offload,
                                                 offload_params=offload)), [train], [norm])
    assert_same_update(plain, lean)


def test_token_budget_micro_batches_give_the_same_update_with_less_padding(tiny_policy, prompts, reward, rollout):
    """Rows packed longest first by padded tokens (train.max_tokens_per_micro_batch) against one
    micro-batch of all 16: the same update, and less padding computed on."""
    train = _train_table(tiny_policy, rollout, reward, prompts)
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    stats = {}

    def update(**kw):
        lrn = learner(tiny_policy, settings(micro_batch_size=16, micro_steps=1, lr=1.0, optimizer="sgd", **kw))
        w0 = {k: v.copy() for k, v in lrn.export_weights().items()}
        stats[kw.get("max_tokens_per_micro_batch", 0)] = lrn.train_step([train], [norm])
        return {k: v - w0[k] for k, v in lrn.export_weights().items()}

    assert_same_update(update(), update(max_tokens_per_micro_batch=150))
    assert stats[150]["micro_batches"] > 1 and stats[0]["micro_batches"] == 1
    assert stats[150]["padding_tokens"] < stats[0]["padding_tokens"]
    assert stats[150]["tokens"] == stats[0]["tokens"] == norm


def test_the_reference_scores_alike_in_chunks(tiny_policy, prompts, rollout):
    rows = rollout.generate(prompts, SPEC)
    whole, chunked = (ReferenceActor(tiny_policy, logprob_chunk_tokens=k).logprobs(rows) for k in (0, 7))
    # Rounding only, as between the roles in test_logprobs_agree_at_step_zero (float32: far below 2e-4).
    np.testing.assert_allclose(np.concatenate(chunked.column("ref_logprobs").to_pylist()),
                               np.concatenate(whole.column("ref_logprobs").to_pylist()), atol=2e-4)


def _with_logprobs(table: pa.Table, column: str, values: list) -> pa.Table:
    idx = table.schema.get_field_index(column)
    return table.set_column(idx, batch.TRAIN.field(column), pa.array([list(map(float, v)) for v in values],
                                                                        pa.list_(pa.float32())))


def test_old_logprobs_are_anchored_before_the_first_update(tiny_policy, prompts, reward, rollout):
    """recompute_old_logprobs with 2 mini-batches == rollout log-probs of the step's starting policy."""
    train = _train_table(tiny_policy, rollout, reward, prompts)
    halves = [train.slice(0, 8), train.slice(8, 8)]
    norms = [float(sum(len(x) for x in h.column("response_ids").to_pylist())) for h in halves]
    s = settings(micro_batch_size=8, micro_steps=1, lr=1.0, optimizer="sgd")
    recompute = learner(tiny_policy, LearnerSettings(**{**s.__dict__, "recompute_old_logprobs": True}))
    start = [recompute.logprobs(h) for h in halves]  # the starting policy's log-probs, exactly
    got = _update(recompute, halves, norms)
    given = learner(tiny_policy, s)
    want = _update(given, [_with_logprobs(h, "rollout_logprobs", lp) for h, lp in zip(halves, start)], norms)
    assert_same_update(want, got)


def test_learner_rejects_unplanned_micro_batches(tiny_policy, prompts, reward, rollout):
    train = _train_table(tiny_policy, rollout, reward, prompts)
    lrn = learner(tiny_policy, settings(micro_batch_size=4, micro_steps=2))
    with pytest.raises(ValueError, match="planned 2"):
        lrn.train_step([train], [1.0])


def test_checkpoint_loads_with_plain_transformers(tiny_policy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lrn = learner(tiny_policy, settings())
    path = lrn.save_pretrained(str(tmp_path / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt")
    assert model.generate(**enc, max_new_tokens=2).shape[-1] > enc["input_ids"].shape[-1]
    exported = lrn.export_weights()
    for k, v in model.state_dict().items():
        if k in exported:
            np.testing.assert_array_equal(v.numpy(), exported[k])


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_stages_train_and_export_full_weights(tiny_policy, prompts, reward, rollout, zero_stage):
    train = _train_table(tiny_policy, rollout, reward, prompts)
    s = settings(micro_batch_size=8, micro_steps=2)
    lrn = learner(tiny_policy, LearnerSettings(**{**s.__dict__, "zero_stage": zero_stage}))
    before = {k: v.copy() for k, v in lrn.export_weights().items()}
    stats = lrn.train_step([train], [float(sum(len(x) for x in train.column("response_ids").to_pylist()))])
    after = lrn.export_weights()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert max(np.abs(after[k] - before[k]).max() for k in before) > 1e-5
    assert np.isfinite(stats["grad_norm"])


def test_recomputed_old_logprobs_match_rollout_at_step_zero(tiny_policy, prompts, reward, rollout):
    train = _train_table(tiny_policy, rollout, reward, prompts)
    s = settings(micro_batch_size=16, micro_steps=1)
    lrn = learner(tiny_policy, LearnerSettings(**{**s.__dict__, "recompute_old_logprobs": True}))
    old = lrn.old_logprobs(train)
    np.testing.assert_allclose(np.concatenate(old),
                               np.concatenate(train.column("rollout_logprobs").to_numpy(zero_copy_only=False)),
                               atol=2e-4)
    stats = lrn.train_step([train], [float(sum(len(x) for x in old))])
    assert stats["clipped_sum"] == 0.0  # first update is on-policy: ratios are 1


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_non_finite_loss_is_never_applied(tiny_policy, prompts, reward, rollout, zero_stage):
    train = _train_table(tiny_policy, rollout, reward, prompts)
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    lps = train.column("rollout_logprobs").to_pylist()
    lps[3] = [float("nan")] * len(lps[3])  # an old log-prob gone bad poisons the ratio, hence the loss
    idx = train.schema.get_field_index("rollout_logprobs")
    poisoned = train.set_column(idx, batch.TRAIN.field("rollout_logprobs"), pa.array(lps, pa.list_(pa.float32())))
    lrn = learner(tiny_policy, settings(micro_batch_size=8, micro_steps=2, zero_stage=zero_stage))
    w0 = {k: v.copy() for k, v in lrn.export_weights().items()}
    stats = lrn.train_step([poisoned], [norm])
    assert stats["skipped"] == 1 and stats["skip_reasons"] == ["non-finite loss"]
    w1 = lrn.export_weights()
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k])
    stats = lrn.train_step([train], [norm])  # the next good mini-batch trains normally
    assert stats["skipped"] == 0 and np.isfinite(stats["grad_norm"])
    w2 = lrn.export_weights()
    assert max(np.abs(w2[k] - w1[k]).max() for k in w0) > 1e-5
    assert all(np.isfinite(v).all() for v in w2.values())


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_checkpoint_restores_training_exactly(tiny_policy, prompts, reward, rollout, zero_stage, tmp_path):
    """Train, checkpoint, train on: a fresh learner loaded from the checkpoint takes the same step."""
    train = _train_table(tiny_policy, rollout, reward, prompts)
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    s = settings(micro_batch_size=8, micro_steps=2, zero_stage=zero_stage)
    first = learner(tiny_policy, s)
    first.train_step([train], [norm])
    state = {"step": 1, "policy_version": 1, "cursor": {"epoch": 0, "position": 4}, "reference_policy": "p"}
    path = first.save_pretrained(str(tmp_path / "step_1"), state)
    expected = first.train_step([train], [norm])  # a second step: moments and weights matter now
    after = first.export_weights()

    second = learner(tiny_policy, s)
    assert second.load_checkpoint(path)["optimizer"] == {"zero_stage": zero_stage, "shards": 1}
    got = second.train_step([train], [norm])
    for k in ("pg_sum", "kl_sum", "grad_norm"):
        assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k
    for k, v in second.export_weights().items():
        np.testing.assert_allclose(v, after[k], rtol=0, atol=1e-7, err_msg=k)


def test_model_generation_config_does_not_change_sampling(tiny_policy, prompts, tmp_path):
    """A generation_config.json asking for a repetition penalty is ignored: greedy rollouts are the
    argmax of the policy's own logits, as the learner's log-probs assume."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from rlsr_ray.modeling.policy import pad_batch

    path = tmp_path / "policy"
    shutil.copytree(tiny_policy, path)
    gen = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").exists() else {}
    gen.update(repetition_penalty=1e4, no_repeat_ngram_size=1)
    (path / "generation_config.json").write_text(json.dumps(gen))
    rolled = RolloutActor(str(path)).generate(prompts, SamplingSpec(1, 12, 0.0, 1.0, seed=0))
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    prompt_ids, responses = rolled.column("prompt_ids").to_pylist(), rolled.column("response_ids").to_pylist()
    pb = pad_batch(prompt_ids, responses, 0)
    with torch.no_grad():
        logits = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids).logits
    argmax = logits[:, pb.prompt_width - 1:-1].argmax(-1)
    repeated = 0
    for i, r in enumerate(responses):
        assert r == argmax[i, :len(r)].tolist()
        repeated += len(r) - len(set(r))
    assert repeated > 0  # the penalty, had it been applied, would have forbidden these


def test_logits_beyond_the_tokenizer_are_never_sampled_and_out_of_every_logprob(tiny_policy, prompts, tmp_path):
    """A vocabulary padded for the kernels (Qwen2.5: 151,936 logits, 151,665 tokens): here two thirds
    of the logits are padding, initialised like real rows, so sampling them would be near certain."""
    from transformers import AutoModelForCausalLM

    from rlsr_ray.modeling.policy import load_tokenizer

    tok = load_tokenizer(tiny_policy)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    model.resize_token_embeddings(3 * len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    path = str(tmp_path)
    rolled = RolloutActor(path, generate_batch_size=16).generate(prompts, SPEC)
    sampled = np.concatenate(rolled.column("response_ids").to_numpy(zero_copy_only=False))
    assert len(sampled) > 20 and sampled.max() < len(tok)
    rl = np.concatenate(rolled.column("rollout_logprobs").to_numpy(zero_copy_only=False))
    ref = ReferenceActor(path, micro_batch_size=5).logprobs(rolled)
    rf = np.concatenate(ref.column("ref_logprobs").to_numpy(zero_copy_only=False))
    ours = np.concatenate(learner(path, settings()).logprobs(rolled))
    np.testing.assert_allclose(rl, rf, atol=2e-4)
    np.testing.assert_allclose(rl, ours, atol=2e-4)


def _sft_table(tok, prompts: pa.Table) -> pa.Table:
    answers = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
               for t in prompts.column("reference_text").to_pylist()]
    return batch.check(pa.table({"group_id": prompts.column("group_id"), "prompt_ids": prompts.column("prompt_ids"),
                                 "response_ids": pa.array([a[:20] for a in answers], pa.list_(pa.int32()))}),
                       batch.SFT, "sft")


def test_sft_scores_only_the_answer_and_lowers_its_nll(tiny_policy, tiny_tokenizer, prompts):
    """The SFT objective's NLL equals the answer tokens' NLL from a plain transformers forward of
    prompt + answer (the prompt's own tokens never counted), and SFT steps lower it."""
    import torch
    from transformers import AutoModelForCausalLM

    table = _sft_table(tiny_tokenizer, prompts)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    want = 0.0
    for p, r in zip(table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].float()
        logp = torch.log_softmax(logits[len(p) - 1:-1], -1)  # position i predicts token i + 1
        want -= float(logp.gather(-1, torch.tensor(r)[:, None]).sum())
    answer_tokens = float(sum(len(r) for r in table.column("response_ids").to_pylist()))
    lrn = learner(tiny_policy, settings(micro_batch_size=2, micro_steps=2, lr=1e-2))
    first = lrn.sft_step([table], [answer_tokens])
    assert first["tokens"] == answer_tokens
    # float32 sums of a few hundred log-probs: rounding is far below 1e-4 of the total
    assert first["nll_sum"] == pytest.approx(want, rel=1e-4)
    later = [lrn.sft_step([table], [answer_tokens])["nll_sum"] for _ in range(3)]
    assert later[-1] < 0.9 * first["nll_sum"], (first["nll_sum"], later)


def test_zero0_bf16_keeps_float32_weights_and_computes_in_bf16(tiny_policy, tiny_tokenizer, prompts, monkeypatch):
    """Without ZeRO, DeepSpeed's bf16 mode wraps its fp16 optimizer over bf16 weights; a CUDA learner
    under ZeRO-0 sends DeepSpeed's torch-autocast section over float32 weights instead. DeepSpeed's
    CPU accelerator runs that section with CPU autocast, so the sections the CUDA learner sends are
    checked here (the learner's own autocast off: compute_dtype float32): the optimizer is the plain
    AdamW, weights stay float32 and move, the Linear layers compute in bf16, no step is skipped."""
    import torch

    import actors.learner as learner_module

    cuda_zero0 = learner_module.precision_config(True, 0, "bfloat16")
    assert learner_module.precision_config(True, 2, "bfloat16")["bf16"]["enabled"]  # ZeRO >= 1: bf16 mode
    assert not any(sec["enabled"] for sec in learner_module.precision_config(False, 0, "bfloat16").values())
    monkeypatch.setattr(learner_module, "precision_config", lambda *_: cuda_zero0)
    lrn = learner(tiny_policy, settings(micro_batch_size=2, micro_steps=2, lr=1e-2))
    assert type(lrn.engine.optimizer) is torch.optim.AdamW
    linear = next(m for m in lrn.engine.module.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = {n: p.detach().clone() for n, p in lrn.engine.module.named_parameters()}
    table = _sft_table(tiny_tokenizer, prompts)
    stats = lrn.sft_step([table], [float(pc.sum(pc.list_value_length(table.column("response_ids"))).as_py())])
    assert stats["skipped"] == 0 and np.isfinite(stats["grad_norm"])
    assert seen and set(seen) == {torch.bfloat16}
    params = dict(lrn.engine.module.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert any(not torch.equal(before[n], p) for n, p in params.items())


def test_a_sample_is_drawn_alike_in_any_batch(tiny_policy, prompts):
    """Sample k of group g comes from a random stream keyed by (step seed, g, k), so a prompt's
    samples are the same drawn with three other prompts in one batch or alone in chunks of two
    (as on another actor after a failure); only its logits could differ, in the last bits."""
    spec = SamplingSpec(n=3, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    together = RolloutActor(tiny_policy, generate_batch_size=16).generate(prompts, spec)
    alone = RolloutActor(tiny_policy, generate_batch_size=2).generate(prompts.slice(2, 1), spec)
    mine = together.filter(pc.equal(together.column("group_id"), 2))
    assert mine.column("response_ids").to_pylist() == alone.column("response_ids").to_pylist()
    np.testing.assert_allclose(np.concatenate(mine.column("rollout_logprobs").to_pylist()),
                               np.concatenate(alone.column("rollout_logprobs").to_pylist()), atol=1e-5)
    other = RolloutActor(tiny_policy).generate(prompts.slice(2, 1), dataclasses.replace(spec, seed=12))
    assert other.column("response_ids").to_pylist() != alone.column("response_ids").to_pylist()


def test_keyed_draws_come_from_the_tempered_nucleus():
    """The row's own stream, inverted through the CDF, is a draw from softmax(logits / T) after
    top-p: the frequencies of 20,000 draws are within 5 standard errors of those probabilities,
    and tokens outside the nucleus never come."""
    import torch

    from actors.keyed_sampler import KeyedSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    sampler = KeyedSampler([(1, 2, 3)], temperature=0.7, top_p=0.9, device="cpu")
    draws = np.array([int(sampler(None, logits).argmax()) for _ in range(20_000)])
    p = torch.softmax(logits[0] / 0.7, -1).numpy().astype(np.float64)
    keep = np.cumsum(np.sort(p)) > 1 - 0.9  # HF's top-p: drop the smallest while their mass is <= 1 - p
    nucleus = np.argsort(p)[keep]
    want = np.zeros_like(p)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    got = np.bincount(draws, minlength=len(p)) / len(draws)
    se = np.sqrt(np.maximum(want * (1 - want), 1e-12) / len(draws))
    assert np.all(np.abs(got - want) <= 5 * se), (got, want)
    assert got[want == 0].sum() == 0 and (want == 0).any()
