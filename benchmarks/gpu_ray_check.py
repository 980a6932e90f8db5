"""GPU check through Ray: the real pools and driver (`python -m rlsr_ray.run`) on one CUDA device.

    python benchmarks/gpu_ray_check.py --out gpu_ray_check_out                 # one GPU
    python benchmarks/gpu_ray_check.py --device cpu --smoke --out /tmp/dry     # dry run, no GPU
    python benchmarks/gpu_ray_check.py --tiny DIR --out gpu_ray_check_out      # tiny policy given

Every pool is a Ray actor holding a share of the one GPU (rollout on the transformers backend,
reward, reference, learner with DeepSpeed ZeRO-2 bf16 on NCCL), and weights go learner ->
rollout over the weight route, with gloo: NCCL refuses two ranks on one device, which is also
why there is one learner here (two NCCL learners need two GPUs). Nothing is downloaded: the
policy is a random Llama of SmolLM2-135M's shape (--smoke: the tiny one) and the reward a small
random sentence-transformers model, both built here; the check measures the machinery, not
learning. Ray may be the pruned wheel of benchmarks/pruned_ray_wheel.py.

Prints per-step samples/s, weight-sync seconds and MB, learner MFU and peak memory, and
writes gpu_ray_check.json under --out. Then `rlsr_ray.sft` runs 4 steps through Ray Train on the
same device (ZeRO-0, bf16 on CUDA), which must skip no step and lower the loss. Last, the memory
plan on the GPU: benchmarks/learner_memory.py on a random policy of Qwen2.5-0.5B's shape (its
151,936-row head included) at 1 x (256 + 4,096) tokens, learner and reference, memory features off
and on; each peak must be within 25 % of rlsr_ray.plan.memory's figure (--smoke: tiny sizes, no bound).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense bf16 peak of the GPUs this check is run on (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_embedder(tokenizer_path: str, out: Path) -> str:
    """A small random BERT behind sentence-transformers' mean pooling, with the policy's tokenizer."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(out / "bert")
    tok.save_pretrained(out / "bert")
    word = models.Transformer(str(out / "bert"), max_seq_length=256)
    dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension  # renamed in 6.x
    SentenceTransformer(modules=[word, models.Pooling(dim())]).save(str(out / "st"))
    return str(out / "st")


def run_args(policy: str, reward: str, out: Path, gpu: bool, smoke: bool) -> list[str]:
    share = "0.2" if gpu else "0"
    device = "cuda" if gpu else "cpu"
    args = [
        "tiny", f"--model.policy={policy}", f"--model.reward_model={reward}", f"--run.output_dir={out}",
        "--ray.address=local", "--run.eval_before_after=false", "--run.progress=false", "--run.steps=4",
        "--model.compute_dtype=" + ("bfloat16" if gpu else "float32"), "--train.zero_stage=2",
        "--rollout.weight_sync=group", "--rollout.weight_sync_backend=gloo",
        "--rollout.samples_per_prompt=8", "--rollout.temperature=1.0",
        f"--rollout.max_new_tokens={16 if smoke else 128}", f"--train.prompts_per_step={2 if smoke else 32}",
        f"--train.mini_batch_prompts={2 if smoke else 16}", f"--train.micro_batch_size={8 if smoke else 32}",
        f"--rollout.generate_batch_size={16 if smoke else 256}",
    ]
    for role in ("rollout", "reward", "reference", "learner"):
        args += [f"--pools.{role}.num_actors=1", f"--pools.{role}.num_gpus={share}", f"--pools.{role}.device={device}",
                 f"--pools.{role}.num_cpus=1"]
    return args


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_ray_check_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny policy and sizes (a CPU dry run of the script)")
    ap.add_argument("--tiny", help="the tiny policy's folder (default: built under --out from the SmolLM2 GGUF "
                    "package); without --smoke only its tokenizer is read, so tokenizer files and config.json do")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from gpu_check import smollm2_shaped

    from rlsr_ray.modeling.models import TINY, resolve_policy
    from rlsr_ray.modeling.policy import load_tokenizer

    tiny = args.tiny or resolve_policy(TINY, str(out / "cache"))
    policy = tiny if args.smoke else smollm2_shaped(load_tokenizer(tiny), out / "smollm2_shaped")
    reward = random_embedder(tiny, out / "embedder")
    gpu = args.device.startswith("cuda")
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "rlsr_ray.run", *run_args(policy, reward, run_dir, gpu, args.smoke)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "driver.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        print("GPU RAY CHECK FAILED (driver exit", proc.returncode, ")")
        return 1
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = summarise(rows[1:], policy, gpu)  # the first step includes one-time warm-up
    report.update(device=torch.cuda.get_device_name(0) if gpu else "cpu", torch=torch.__version__, steps=len(rows))
    (out / "gpu_ray_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = all(r["weight_sync_path"] == "group" for r in rows) and all(r.get("skipped_minibatches", 0) == 0 for r in rows)
    sft = sft_check(policy, out / "sft", gpu)
    report["sft_zero0"] = sft
    (out / "gpu_ray_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(sft, indent=2))
    ok = ok and sft["ok"]
    memory = memory_check(tiny, out / "memory", args.device, args.smoke)
    report["memory_plan"] = memory
    (out / "gpu_ray_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(memory, indent=2))
    ok = ok and memory["ok"]
    print("GPU RAY CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def qwen05b_shaped(tokenizer_path: str, out: Path) -> str:
    """A random Qwen2 of Qwen2.5-0.5B's shape (rlsr_ray.plan.memory_plan.KNOWN_SHAPES) with the tiny
    policy's tokenizer: its head has more rows than the tokenizer has tokens, as the real one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlsr_ray.plan.memory_plan import KNOWN_SHAPES
    from rlsr_ray.modeling.policy import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    cfg = Qwen2Config(**KNOWN_SHAPES["qwen2.5-0.5b"], max_position_embeddings=32768, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def memory_check(tiny: str, out: Path, device: str, smoke: bool) -> dict:
    """benchmarks/learner_memory.py on this device: measured peaks beside the plan's."""
    out.mkdir(parents=True, exist_ok=True)
    policy = tiny if smoke else qwen05b_shaped(tiny, out / "qwen05b_shaped")
    sizes = ["--answers=64", "--rows=2", "--prompt=16"] if smoke else ["--answers=4096", "--rows=1", "--prompt=256"]
    lines = out / "learner_memory.jsonl"
    lines.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learner_memory.py"), *sizes, f"--policy={policy}",
           f"--device={device}", f"--out={lines}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "learner_memory.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        return {"ok": False, "exit": proc.returncode}
    rows = [json.loads(x) for x in lines.read_text().splitlines()]
    within = all(0.75 <= r["ratio"] <= 1.25 for r in rows)
    return {"ok": smoke or within, "within_25_percent": within,
            "rows": [{k: r[k] for k in ("role", "tokens", "features", "peak_bytes", "predicted_bytes", "ratio")}
                     for r in rows]}


def sft_check(policy: str, out: Path, gpu: bool) -> dict:
    """`rlsr_ray.sft` through Ray Train on the same device: the tiny preset's SFT (ZeRO-0, lr 1e-3)
    in bf16 on CUDA, the learner precision that once skipped half its steps there. Passes when
    no step is skipped and the loss falls."""
    cmd = [sys.executable, "-m", "rlsr_ray.sft", "tiny", f"--model.policy={policy}", f"--run.output_dir={out}",
           "--ray.address=local", "--sft.steps=4", "--pools.learner.num_actors=1",
           "--model.compute_dtype=" + ("bfloat16" if gpu else "float32")]
    if gpu:
        cmd += ["--pools.learner.device=cuda", "--pools.learner.num_gpus=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out.parent / "sft.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        return {"ok": False, "exit": proc.returncode}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(r["skipped"] > 0 for r in rows)
    return {"ok": skipped == 0 and rows[-1]["loss"] < rows[0]["loss"], "steps": len(rows), "skipped_steps": skipped,
            "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
            "step_s": [r["step_s"] for r in rows]}


def summarise(rows: list[dict], policy: str, gpu: bool) -> dict:
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(policy).parameters())
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    flops = 6 * params * sum(r["train_sequence_tokens"] for r in rows) / sum(r["train_s"] for r in rows)
    report = {"policy_params": params, "samples_per_s": med("samples_per_s"), "step_s": med("step_s"),
              "rollout_s": med("rollout_s"), "train_s": med("train_s"), "weight_sync_s": med("weight_sync_s"),
              "weight_sync_mb": rows[0]["weight_sync_mb"], "learner_tflops": flops / 1e12}
    if gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        report["learner_mfu"] = flops / peak if peak else None
        report["learner_peak_memory_mb"] = max(r["learner_peak_memory_mb"] for r in rows)
    return report


if __name__ == "__main__":
    sys.exit(main())
