"""What the step's data path costs: the real step (rlsr_ray.driver.step.rlsr_step, with its Arrow tables,
checks, pieces, joins and object-store hand-offs between four Ray pools) with the models taken out.

The actors below build, check and pass tables exactly as the real ones do (same rlsr_ray.contract.batch /
selection code, same call signatures) but generate random tokens and rewards instead of running a
model, so a step's time here is Arrow conversion + object-store transfer + Ray call overhead.
Divide by a real step's time (metrics.jsonl `step_s`) for its share.

    python benchmarks/data_path.py --prompts 4 --samples 8 --prompt-tokens 60 --response-tokens 48
    python benchmarks/data_path.py --prompts 1024 --samples 8 --prompt-tokens 256 --response-tokens 1024 \
        --actors 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np
import pyarrow as pa


class DataOnlyRollout:
    def __init__(self, response_tokens: int, rank: int = 0):
        self.L, self.rank, self.version = response_tokens, rank, 0
        self.rng = np.random.default_rng(rank)

    def generate_summarised(self, prompts, spec):
        from rlsr_ray.contract import batch
        from rlsr_ray.contract.selection import rollout_summary

        prompts = batch.check(prompts, batch.PROMPTS, "rollout input")
        n, rows = spec.n, len(prompts) * spec.n
        resp = self.rng.integers(0, 49152, (rows, self.L), dtype=np.int32).tolist()
        lps = (-self.rng.random((rows, self.L), dtype=np.float32)).tolist()
        rep = lambda col: [x for x in prompts.column(col).to_pylist() for _ in range(n)]  # noqa: E731
        table = pa.Table.from_pydict({
            "group_id": rep("group_id"), "sample_idx": list(range(n)) * len(prompts), "prompt_ids": rep("prompt_ids"),
            "reference_text": rep("reference_text"), "prompt_text": rep("prompt_text"),
            "data_json": rep("data_json"), "response_ids": resp,
            "response_text": ["x" * (4 * self.L)] * rows, "rollout_logprobs": lps, "finish_reason": ["length"] * rows,
            "policy_version": [self.version] * rows}, schema=batch.ROLLOUTS)
        table = batch.check(table, batch.ROLLOUTS, "rollout output")
        return table, rollout_summary(table)

    def load_weights(self, state, version):
        self.version = version
        return version


class DataOnlyReward:
    def __init__(self, rank: int = 0):
        self.rng = np.random.default_rng(100 + rank)

    def score_parts(self, selection, *tables):
        from rlsr_ray.contract import batch
        from rlsr_ray.contract.selection import gather

        t = batch.check(gather(tables, selection, batch.ROLLOUTS), batch.ROLLOUTS, "reward input")
        r = self.rng.random(len(t), dtype=np.float32)
        out = pa.table({"group_id": t.column("group_id"), "sample_idx": t.column("sample_idx"),
                        "reward": pa.array(r), "similarity": pa.array(r)})
        return batch.check_rewards(out, "reward output")


class DataOnlyReference:
    def __init__(self, rank: int = 0):
        pass

    def logprobs_counted(self, selection, *tables):
        from rlsr_ray.contract import batch
        from rlsr_ray.contract.selection import gather

        t = batch.check(gather(tables, selection, batch.ROLLOUTS), batch.ROLLOUTS, "reference input")
        out = pa.table({"group_id": t.column("group_id"), "sample_idx": t.column("sample_idx"),
                        "ref_logprobs": t.column("rollout_logprobs")})
        out = batch.check(out, batch.REF_LOGPROBS, "reference output")
        return out, len(out)


class DataOnlyLearner:
    def __init__(self, rank: int = 0):
        self.rank = rank

    def train_parts(self, parts, rollout_tables, *tables):
        from rlsr_ray.contract import batch

        trains = batch.assemble_train(parts, tables[:rollout_tables], tables[rollout_tables:], "learner input")
        trains = [batch.check(t, batch.TRAIN, "learner") for t in trains]
        rows = sum(len(t) for t in trains)
        # The keys the real learner's optimise() returns, since the driver's step reads all of them.
        return {"tokens": float(rows), "pg_sum": 0.0, "kl_sum": 0.0, "clipped_sum": 0.0, "grad_norm": 0.0,
                "skipped": 0.0, "skip_reasons": [], "padding_tokens": 0.0, "micro_batches": float(len(trains)),
                "sequence_tokens": float(batch.sequence_tokens(trains))}

    def publish_weights(self):
        import ray

        return [ray.put({}), 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--response-tokens", type=int, default=48)
    ap.add_argument("--actors", type=int, default=1, help="actors per pool")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import ray

    from actors.pool import Pool
    from rlsr_ray import data
    from rlsr_ray.config import PoolConfig, load_config
    from rlsr_ray.driver.step import rlsr_step, sampling_spec
    from rlsr_ray.driver.pipeline import Pools, start_generation
    from rlsr_ray.plan.resources import step_plan

    k = args.actors
    mb = max(1, args.prompts // 2)
    cfg = load_config("tiny", [f"--train.prompts_per_step={args.prompts}", f"--train.mini_batch_prompts={mb}",
                               f"--rollout.samples_per_prompt={args.samples}", f"--pools.learner.num_actors={k}"])
    root = str(Path(__file__).resolve().parents[1])
    ray.init(address="local", num_cpus=4 * k + 1, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    pc = PoolConfig(num_actors=k, num_cpus=1)
    pools = Pools(Pool("rollout", DataOnlyRollout, pc, {"response_tokens": args.response_tokens}),
                  Pool("reward", DataOnlyReward, pc, {}), Pool("reference", DataOnlyReference, pc, {}),
                  Pool("learner", DataOnlyLearner, pc, {}))
    rng = np.random.default_rng(0)
    tok = data.Tokenized([rng.integers(0, 49152, args.prompt_tokens).tolist() for _ in range(args.prompts)],
                         ["a reference answer " * 20] * args.prompts, 0, 0, ["a question"] * args.prompts,
                         ["{}"] * args.prompts)
    times = []
    for step in range(args.steps):
        prompts = data.prompts_table(tok, list(range(args.prompts)), first_group_id=step * args.prompts)
        t0 = time.perf_counter()
        gen = start_generation(pools, prompts, sampling_spec(cfg, step), step)
        row = rlsr_step(cfg, pools, step_plan(cfg), gen, step, lambda n, r: None)
        times.append(time.perf_counter() - t0)
    ray.shutdown()
    rows = args.prompts * args.samples
    mb_bytes = rows * (args.prompt_tokens * 4 + args.response_tokens * 12) / 1e6
    result = {"shape": vars(args) | {"out": None}, "rows": rows, "token_payload_mb": mb_bytes,
              "step_s_median": statistics.median(times[1:]), "advantage_s_last": row["advantage_s"]}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
