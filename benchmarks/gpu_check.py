"""GPU check: the actor roles in-process on one CUDA device, correctness first, then throughput.

    python benchmarks/gpu_check.py --tiny PATH_TO_TINY_POLICY [--out DIR]

Runs without Ray (pools of size 0 use the same actor classes), so it needs only torch,
transformers, pyarrow and DeepSpeed on the GPU machine. Checks:
  1. rollout (transformers backend), reference and learner log-probs agree on CUDA (fp32, bf16);
  2. a DeepSpeed learner (NCCL, ZeRO-2, bf16) step changes the weights and the rollout loads them;
  3. throughput with a SmolLM2-135M-shaped random policy: generation, reference scoring, training.
Prints a table last and writes gpu_check.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.learner import LearnerActor, LearnerSettings  # noqa: E402
from actors.reference import ReferenceActor  # noqa: E402
from actors.rollout import RolloutActor  # noqa: E402
from actors.sampling import SamplingSpec  # noqa: E402
from rlsr_ray.contract import batch  # noqa: E402
from rlsr_ray.algo.grpo import group_advantages  # noqa: E402
from rlsr_ray.algo.loss import LossSettings  # noqa: E402

DEVICE = "cuda"  # --device cpu runs the same script as a smoke test on machines without a GPU


def settings(dtype: str, micro: int, steps: int, zero: int = 2) -> LearnerSettings:
    return LearnerSettings(lr=1e-4, adam_betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, zero_stage=zero,
                           micro_batch_size=micro, micro_steps=steps,
                           loss=LossSettings(0.2, 0.001, "k3", "token_mean"), temperature=1.0,
                           compute_dtype=dtype, recompute_old_logprobs=False)


def learner(path: str, s: LearnerSettings) -> LearnerActor:
    lrn = LearnerActor(path, s, device=DEVICE, cache_dir="/tmp/rlsr_cache")
    lrn.setup(lrn.rendezvous())
    return lrn


def prompts_table(tok, n: int) -> pa.Table:
    qs = ["Why is the sky blue?", "How do plants make food?", "What is gravity?", "Name three colors.",
          "Write a haiku about rain.", "What is 12 times 8?", "How do I boil an egg?", "What is a volcano?"]
    ids = [tok.apply_chat_template([{"role": "user", "content": qs[i % len(qs)]}], add_generation_prompt=True,
                                   tokenize=True) for i in range(n)]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "input_ids") else list(x) for x in ids]
    return pa.table({"group_id": pa.array(range(n), pa.int64()), "prompt_ids": pa.array(ids, pa.list_(pa.int32())),
                     "reference_text": pa.array(["ref"] * n), "prompt_text": pa.array(qs[:1] * n),
                     "data_json": pa.array(["{}"] * n)})


def fake_train_table(rolled: pa.Table, ref: pa.Table) -> pa.Table:
    """Rewards from response length (no embedding model on this machine): enough to drive a step."""
    n = len(rolled)
    lengths = np.array([len(x) for x in rolled.column("response_ids").to_pylist()], np.float32)
    reward = (lengths / max(lengths.max(), 1)).astype(np.float32)
    rewards = pa.table({"group_id": rolled.column("group_id"), "sample_idx": rolled.column("sample_idx"),
                        "reward": reward})
    joined = batch.join(batch.join(rolled, rewards, "r"), ref, "ref")
    adv = group_advantages(reward, rolled.column("group_id").to_numpy(), True)
    adv = adv + np.random.default_rng(0).normal(0, 0.5, n).astype(np.float32)  # ties would zero every group
    return batch.check(joined.append_column("advantage", pa.array(adv, pa.float32())), batch.TRAIN, "train")


def agreement(path: str, tok, dtype: str) -> dict:
    rollout = RolloutActor(path, compute_dtype=dtype, device=DEVICE, generate_batch_size=64)
    rolled = rollout.generate(prompts_table(tok, 8), SamplingSpec(4, 32, 1.0, 1.0, 0))
    ref = ReferenceActor(path, compute_dtype=dtype, device=DEVICE, micro_batch_size=8).logprobs(rolled)
    lrn = learner(path, settings(dtype, 8, 4, zero=0))
    rl = np.concatenate(rolled.column("rollout_logprobs").to_numpy(zero_copy_only=False))
    rf = np.concatenate(ref.column("ref_logprobs").to_numpy(zero_copy_only=False))
    le = np.concatenate(lrn.logprobs(rolled))
    return {"dtype": dtype, "tokens": int(rl.size), "max_abs_rollout_vs_reference": float(np.abs(rl - rf).max()),
            "max_abs_rollout_vs_learner": float(np.abs(rl - le).max()),
            "mean_abs_rollout_vs_learner": float(np.abs(rl - le).mean())}


def learner_step(path: str, tok) -> dict:
    rollout = RolloutActor(path, compute_dtype="bfloat16", device=DEVICE, generate_batch_size=64)
    rolled = rollout.generate(prompts_table(tok, 8), SamplingSpec(4, 32, 1.0, 1.0, 1))
    ref = ReferenceActor(path, compute_dtype="bfloat16", device=DEVICE).logprobs(rolled)
    train = fake_train_table(rolled, ref)
    lrn = learner(path, settings("bfloat16", 8, 4, zero=2))
    w0 = lrn.export_weights()
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    stats = lrn.train_step([train], [norm])
    w1 = lrn.export_weights()
    moved = max(float(np.abs(w1[k] - w0[k]).max()) for k in w0)
    rollout.load_weights(w1, 1)
    after = rollout.generate(prompts_table(tok, 2), SamplingSpec(2, 8, 1.0, 1.0, 2))
    return {"zero_stage": 2, "bf16": True, "grad_norm": stats["grad_norm"], "max_weight_change": moved,
            "rollout_policy_version_after_load": sorted(set(after.column("policy_version").to_pylist()))}


def checkpoint_roundtrip(path: str, tok, work: Path) -> dict:
    """ZeRO-2 bf16: train, checkpoint, train on. A learner restored from the checkpoint (fp32 master
    partition and AdamW moments) should take the same second step; one started from the saved
    weights alone (fresh optimizer) is the control that shows what a lost optimizer costs."""
    rollout = RolloutActor(path, compute_dtype="bfloat16", device=DEVICE, generate_batch_size=64)
    rolled = rollout.generate(prompts_table(tok, 8), SamplingSpec(4, 32, 1.0, 1.0, 3))
    train = fake_train_table(rolled, ReferenceActor(path, compute_dtype="bfloat16", device=DEVICE).logprobs(rolled))
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    s = settings("bfloat16", 8, 4, zero=2)
    first = learner(path, s)
    first.train_step([train], [norm])
    state = {"step": 1, "policy_version": 1, "cursor": {"epoch": 0, "position": 0}, "reference_policy": path}
    saved = first.save_pretrained(str(work / "step_1"), state)
    first.train_step([train], [norm])
    want = first.export_weights()
    restored = learner(path, s)
    restored.load_checkpoint(saved)
    restored.train_step([train], [norm])
    control = learner(saved, s)
    control.train_step([train], [norm])
    diff = lambda w: max(float(np.abs(w[k] - want[k]).max()) for k in want)  # noqa: E731
    return {"zero_stage": 2, "bf16": True, "max_abs_restored_vs_uninterrupted": diff(restored.export_weights()),
            "max_abs_weights_only_vs_uninterrupted": diff(control.export_weights())}


def smollm2_shaped(tok, out: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    t = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - t


def throughput(path: str, tok, prompts: int, n: int, new_tokens: int) -> dict:
    rollout = RolloutActor(path, compute_dtype="bfloat16", device=DEVICE, generate_batch_size=prompts * n)
    table = prompts_table(tok, prompts)
    spec = SamplingSpec(n, new_tokens, 1.0, 1.0, 0)
    rollout.generate(prompts_table(tok, 2), SamplingSpec(2, 8, 1.0, 1.0, 0))  # warm-up
    rolled, gen_s = timed(lambda: rollout.generate(table, spec))
    gen_tokens = int(sum(len(x) for x in rolled.column("response_ids").to_pylist()))
    refa = ReferenceActor(path, compute_dtype="bfloat16", device=DEVICE, micro_batch_size=32)
    refa.logprobs(rolled.slice(0, 8))
    ref, ref_s = timed(lambda: refa.logprobs(rolled))
    train = fake_train_table(rolled, ref)
    micro = 16
    lrn = learner(path, settings("bfloat16", micro, len(train) // micro, zero=2))
    norm = float(gen_tokens)
    lrn.train_step([train], [norm])  # warm-up step (allocations, NCCL)
    _, train_s = timed(lambda: lrn.train_step([train], [norm]))
    w, sync_s = timed(lambda: rollout.load_weights(lrn.export_weights(), 1))
    return {"policy": "SmolLM2-135M-shaped random Llama, bf16 autocast", "sequences": len(rolled),
            "new_tokens_max": new_tokens, "generated_tokens": gen_tokens,
            "generate_s": gen_s, "generate_tokens_per_s": gen_tokens / gen_s,
            "generate_samples_per_s": len(rolled) / gen_s, "reference_s": ref_s, "train_s": train_s,
            "train_tokens_per_s": gen_tokens / train_s, "weight_sync_s": sync_s,
            "step_samples_per_s": len(rolled) / (gen_s + ref_s + train_s + sync_s)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="small sizes, for a CPU dry run of the script")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from rlsr_ray.modeling.policy import load_tokenizer

    tok = load_tokenizer(args.tiny)
    report = {"device": torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu",
              "torch": torch.__version__}
    report["agreement"] = [agreement(args.tiny, tok, d) for d in ("float32", "bfloat16")]
    report["learner_step"] = learner_step(args.tiny, tok)
    report["checkpoint"] = checkpoint_roundtrip(args.tiny, tok, out / "ckpt")
    if args.smoke:
        report["throughput"] = [throughput(args.tiny, tok, 4, 4, 16)]
    else:
        big = smollm2_shaped(tok, Path("/tmp/smollm2_shaped"))
        report["throughput"] = [throughput(big, tok, 64, 8, 256)]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    a = report["agreement"]
    print(f"\n{'check':42s} value")
    for r in a:
        print(f"{'logprob max|rollout-learner| ' + r['dtype']:42s} {r['max_abs_rollout_vs_learner']:.2e}")
        print(f"{'logprob max|rollout-reference| ' + r['dtype']:42s} {r['max_abs_rollout_vs_reference']:.2e}")
    print(f"{'learner ZeRO-2 bf16 max weight change':42s} {report['learner_step']['max_weight_change']:.2e}")
    c = report["checkpoint"]
    print(f"{'ZeRO-2 bf16 resume: max|restored-straight|':42s} {c['max_abs_restored_vs_uninterrupted']:.2e}")
    print(f"{'  control, weights only: max|.-straight|':42s} {c['max_abs_weights_only_vs_uninterrupted']:.2e}")
    for t in report["throughput"]:
        for k in ("generate_tokens_per_s", "generate_samples_per_s", "reference_s", "train_tokens_per_s",
                  "weight_sync_s", "step_samples_per_s"):
            print(f"{k:42s} {t[k]:.2f}")
    ok = all(r["max_abs_rollout_vs_learner"] < (1e-3 if r["dtype"] == "float32" else 0.5) for r in a)
    ok = ok and report["learner_step"]["max_weight_change"] > 0
    ok = ok and c["max_abs_restored_vs_uninterrupted"] <= 0.01 * c["max_abs_weights_only_vs_uninterrupted"]
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
