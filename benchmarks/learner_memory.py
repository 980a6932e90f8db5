"""Peak memory per token of one learner update and one reference pass, measured against the plan.

Each configuration runs in a fresh process through the pool classes (actors/pool.py with the role
in-process: LearnerActor.train_step, ReferenceActor.logprobs), SmolLM2-135M-Instruct in float32,
one micro-batch of `--rows` sequences of `--prompt` prompt tokens and answers of T tokens (the
second row's answer a quarter shorter, so rows are padded as in a real batch). Each role first
makes one small call (the learner's allocates AdamW's moments, and both set up their kernels);
then the kernel's peak-RSS mark is reset (/proc/self/clear_refs) and the measured call runs.
`peak_bytes` is the peak RSS above the RSS before the call; `predicted_bytes` is rlsr_ray.plan.memory's
figure for the same call (activations, plus the gradients a ZeRO-0 step allocates afresh).
glibc's mmap threshold is fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the
RSS at once and the peak RSS is the peak of live memory, not of the allocator's cache. With
`--device cuda`: bf16 compute, and torch's peak allocated bytes instead of the RSS (the last stage
of benchmarks/gpu_ray_check.py runs it so).

    python benchmarks/learner_memory.py --out benchmarks/results/learner_memory_cpu.jsonl

One JSON object per line and configuration: role, tokens, features, peak_bytes, predicted_bytes,
per_token_bytes, cpu.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FEATURES = {"off": [], "on": ["gradient_checkpointing", "chunked_logprobs"]}
CHUNK = 1024


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _table(rows: int, prompt: int, answer: int):
    import numpy as np
    import pyarrow as pa

    from rlsr_ray.contract import batch

    rng = np.random.default_rng(0)
    lengths = [answer if i % 2 == 0 else answer * 3 // 4 for i in range(rows)]
    cols = {
        "group_id": list(range(rows)), "sample_idx": [0] * rows,
        "prompt_ids": [rng.integers(100, 40000, prompt).tolist() for _ in range(rows)],
        "reference_text": ["r"] * rows, "prompt_text": ["p"] * rows, "data_json": ["{}"] * rows,
        "response_ids": [rng.integers(100, 40000, n).tolist() for n in lengths], "response_text": ["a"] * rows,
        "rollout_logprobs": [[-1.0] * n for n in lengths], "finish_reason": ["length"] * rows,
        "policy_version": [0] * rows, "reward": [0.5] * rows, "ref_logprobs": [[-1.0] * n for n in lengths],
        "advantage": [1.0 if i % 2 else -1.0 for i in range(rows)],
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in batch.TRAIN}, schema=batch.TRAIN)


def measure(role: str, rows: int, prompt: int, answer: int, features: list[str], policy: str = "smollm2-135m-instruct",
            device: str = "cpu") -> dict:
    """In this (fresh) process: one call of the role, its peak above the memory before it (the
    RSS on CPU; on CUDA torch's peak allocated bytes, with bf16 compute as the GPU presets run)."""
    import torch

    from actors.pool import Pool
    from rlsr_ray.contract import batch
    from rlsr_ray.config import PoolConfig
    from rlsr_ray.plan.memory import Batch, ModelShape, learner_activation_bytes, reference_activation_bytes, state_bytes
    from rlsr_ray.modeling.models import resolve_policy

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    path = resolve_policy(policy, os.path.expanduser("~/.cache/rlsr_ray"))
    cuda = device.startswith("cuda")
    dtype, b = ("bfloat16", 2) if cuda else ("float32", 4)
    ckpt, chunk = "gradient_checkpointing" in features, CHUNK if "chunked_logprobs" in features else 0
    table = _table(rows, prompt, answer)
    shape = ModelShape.from_config(json.load(open(os.path.join(path, "config.json"))))
    m = Batch(rows, prompt + answer, answer, padded=rows > 1)
    if role == "learner":
        from actors.learner import LearnerActor, LearnerSettings
        from rlsr_ray.algo.loss import LossSettings

        s = LearnerSettings(lr=1e-6, adam_betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, zero_stage=0,
                            micro_batch_size=rows, micro_steps=1, loss=LossSettings(), temperature=1.0,
                            compute_dtype=dtype, recompute_old_logprobs=False, gradient_checkpointing=ckpt,
                            logprob_chunk_tokens=chunk)
        pool = Pool("learner", LearnerActor, PoolConfig(num_actors=0), dict(policy_path=path, settings=s,
                                                                             device=device))
        pool.call("setup", [(pool.call("rendezvous", [()])[0],)])
        small = _table(rows, 8, 8)
        pool.call("train_step", [([small], [16.0])])  # AdamW's moments exist from here on
        call = ("train_step", [([table], [float(sum(len(x) for x in table.column("response_ids").to_pylist()))])])
        predicted = learner_activation_bytes(shape, m, b, checkpointing=ckpt, chunk_tokens=chunk,
                                             device=device)["total"]
        if b == 2:  # ZeRO-0 bf16 on CUDA: autocast over float32 weights keeps bf16 copies for backward
            predicted += 2 * shape.params
        # ZeRO-0 frees the gradients after each step, so the measured call allocates them again:
        # planned as a model state; their exact size is the trainable parameters' bytes.
        grads = state_bytes(shape, 0, 1, 4)["gradients"]
        fresh = sum(p.numel() * p.element_size() for p in pool.actors[0].model.parameters() if p.requires_grad)
    else:
        from actors.reference import ReferenceActor

        pool = Pool("reference", ReferenceActor, PoolConfig(num_actors=0),
                    dict(policy_path=path, micro_batch_size=rows, logprob_chunk_tokens=chunk, device=device,
                         compute_dtype=dtype))
        pool.call("logprobs", [(_table(rows, 8, 8).select(batch.ROLLOUTS.names),)])  # one-time set-up, as above
        call = ("logprobs", [(table.select(batch.ROLLOUTS.names),)])
        predicted = reference_activation_bytes(shape, m, b, chunk_tokens=chunk, device=device)["total"]
        grads = fresh = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pool.call(*call)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        before = _rss("VmRSS")
        pool.call(*call)
        peak = _rss("VmHWM") - before
    # Per token: the activations alone (the gradients are a model state, the same at any length).
    return {"role": role, "tokens": m.tokens, "rows": rows, "prompt_tokens": prompt, "answer_tokens": answer,
            "features": features, "peak_bytes": peak, "predicted_bytes": int(predicted + grads),
            "gradient_bytes": fresh, "per_token_bytes": round((peak - fresh) / m.tokens),
            "predicted_per_token_bytes": round(predicted / m.tokens), "ratio": round(peak / (predicted + grads), 3),
            "cpu": torch.backends.cpu.get_cpu_capability(), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "policy": os.path.basename(path.rstrip("/"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", default="1024,2048,4096", help="answer lengths T, comma-separated")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--roles", default="learner,reference")
    ap.add_argument("--features", default="off,on", help="off (today's path) and/or on (checkpointing + chunks)")
    ap.add_argument("--out", help="also append the lines to this file")
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="a shipped policy name or a model folder")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 compute, torch's peak allocated bytes)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a single configuration, in this process
    a = ap.parse_args()
    if a.one:
        role, answer, feats = a.one.split(":")
        print(json.dumps(measure(role, a.rows, a.prompt, int(answer), FEATURES[feats], a.policy, a.device)), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for role in a.roles.split(","):
        for feats in a.features.split(","):
            for answer in a.answers.split(","):
                cmd = [sys.executable, __file__, f"--one={role}:{answer}:{feats}", f"--rows={a.rows}",
                       f"--prompt={a.prompt}", f"--policy={a.policy}", f"--device={a.device}"]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{role} {answer} {feats} failed:\n{out.stderr[-3000:]}")
                line = out.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
