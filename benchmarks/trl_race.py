"""rlsr_ray against Hugging Face TRL's GRPOTrainer at equal settings, on the same box, in one run.

Equal: model (SmolLM2-135M-Instruct), compute dtype (bf16 autocast where the CPU has AMX or
AVX512-BF16, else float32, as rlsr_ray's `auto`), group size 8, 4 prompts per step, 48 new
tokens, temperature 0.8, two optimizer steps per generation of 32 completions, lr 3e-5 constant,
AdamW betas (0.9, 0.95), clip 0.2, KL coefficient 0.001 to the initial policy, gradient clip 1.0,
token-mean loss, and the same reward (MiniLM cosine + LCS copy penalty, rlsr_ray.algo.terms' code).
TRL runs in this process on both cores; rlsr_ray runs its default preset (pools on Ray).
rlsr_ray runs twice (VARIANTS below). Each side's time is its training loop only (model loading and Ray start excluded): rlsr_ray's
summed `step_s`, TRL's on_train_begin -> on_train_end.

    pip install -e ".[cpu,bench]"
    python benchmarks/trl_race.py --steps 6 --out benchmarks/results/trl_race_cpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

TRL_VERSION = "1.16.0"
SETTINGS = dict(prompts_per_step=4, group=8, max_new_tokens=48, temperature=0.8, lr=3e-5, kl=0.001)


# rlsr_ray's side, two ways: the default preset as shipped (on-policy; rollout and learner take
# turns on both cores), and one-step off-policy overlap with one core per pool (rollout and
# learner then run at once, each on its own core; benchmarks/async_vs_sync.py).
VARIANTS = {
    "on_policy": [],
    "off_policy_own_cores": ["--algo.max_staleness=1"] + [
        f"--pools.{role}.{key}=1" for role in ("rollout", "reward", "reference", "learner")
        for key in ("num_cpus", "torch_threads")],
}


def run_rlsr(steps: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlsr_ray.run", "default", "--ray.address=local", "--run.progress=false",
           "--run.eval_before_after=false", f"--run.steps={steps}", f"--run.output_dir={out}", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["step_s"] for r in rows)
    samples = sum(r["samples"] for r in rows)
    tokens = sum(r["samples"] * r["response_length_mean"] for r in rows)
    return {"seconds": seconds, "samples": samples, "tokens": tokens, "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds, "reward_mean_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]],
            # shares of the loop's time, for the README's overhead table
            "weight_sync_share": sum(r["weight_sync_s"] for r in rows) / seconds,
            "driver_advantage_share": sum(r["advantage_s"] for r in rows) / seconds}


def run_trl(steps: int, out: Path) -> dict:
    import numpy as np
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from rlsr_ray import data
    from rlsr_ray.modeling.models import resolve_policy, resolve_reward_model
    from rlsr_ray.modeling.policy import resolve_compute_dtype
    from rlsr_ray.algo import terms as T

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"trl {trl.__version__} is installed; this race is pinned to {TRL_VERSION}")
    torch.set_num_threads(2)
    policy = resolve_policy("smollm2-135m-instruct", "~/.cache/rlsr_ray")
    bf16 = resolve_compute_dtype("auto", "cpu") == "bfloat16"
    train, _ = data.split_heldout(data.load_examples(None), 60, 0)
    ds = Dataset.from_list([{"prompt": list(e.messages), "reference": e.reference} for e in train])
    specs = T.paper(resolve_reward_model("minilm-l6-v2"))
    terms = [T.build(s) for s in specs]

    def rlsr_reward(completions, reference, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in T.score(specs, terms, [""] * len(texts), texts, list(reference), {})[0]]

    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["begin"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

    cfg = trl.GRPOConfig(
        output_dir=str(out), max_steps=2 * steps, per_device_train_batch_size=16, gradient_accumulation_steps=1,
        steps_per_generation=2, num_generations=SETTINGS["group"], max_completion_length=SETTINGS["max_new_tokens"],
        temperature=SETTINGS["temperature"], learning_rate=SETTINGS["lr"], lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        beta=SETTINGS["kl"], epsilon=0.2, loss_type="dapo", num_iterations=1, use_cpu=True, bf16=bf16,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=rlsr_reward, args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Clock()])
    trainer.train()
    logs = [x for x in trainer.state.log_history if "completions/mean_length" in x]
    seconds = times["end"] - times["begin"]
    samples = 2 * steps * 16
    # Logged once per generation (every steps_per_generation=2 optimizer steps), over its 32 completions.
    tokens = float(np.sum([x["completions/mean_length"] * 32 for x in logs]))
    return {"seconds": seconds, "samples": samples, "tokens": tokens, "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds, "bf16": bf16, "trl": trl.__version__,
            "reward_mean_first_last": [logs[0].get("reward"), logs[-1].get("reward")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="RL steps of 4 prompts x 8 samples each")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: dict = {"settings": SETTINGS, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            result[f"rlsr_ray/{name}"] = run_rlsr(args.steps, Path(tmp) / name, extra)
            print(f"rlsr_ray/{name}", json.dumps(result[f"rlsr_ray/{name}"]), flush=True)
        trl_side = run_trl(args.steps, Path(tmp) / "trl")
        print("trl", json.dumps(trl_side), flush=True)
    result["trl"] = trl_side
    for name in VARIANTS:
        ours = result[f"rlsr_ray/{name}"]
        result[f"ratio/{name}"] = {"samples_per_s": ours["samples_per_s"] / trl_side["samples_per_s"],
                                   "tokens_per_s": ours["tokens_per_s"] / trl_side["tokens_per_s"]}
        print(name, json.dumps(result[f"ratio/{name}"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
