"""Rewards per second: plain SentenceTransformer.encode, the reward role in-process, the reward pool
(a Ray actor, tables through the object store), and the reward service (Ray Serve, batched).

The same rows for every mode: each built-in reference paired with another prompt's reference as
the "response" (so no generation is involved), `--rows` per call, MiniLM on one torch thread
everywhere, encode batch size 64. Each mode is called once to warm up (the reference-embedding
cache included), then timed over `--repeats` calls.

    python benchmarks/reward_throughput.py --rows 256 --repeats 5 --out benchmarks/results/reward_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlsr_ray import data  # noqa: E402
from rlsr_ray.contract import batch  # noqa: E402
from rlsr_ray.modeling.models import MINILM, resolve_reward_model  # noqa: E402
from rlsr_ray.algo.terms import paper  # noqa: E402


def rollouts(rows: int) -> pa.Table:
    refs = [ex.reference for ex in data.load_examples(None)]
    refs = (refs * (rows // len(refs) + 1))[:rows]
    responses = refs[1:] + refs[:1]
    return pa.Table.from_pydict({
        "group_id": list(range(rows)), "sample_idx": [0] * rows, "prompt_ids": [[1]] * rows,
        "reference_text": refs, "prompt_text": ["q"] * rows, "data_json": ["{}"] * rows, "response_ids": [[5]] * rows,
        "response_text": responses,
        "rollout_logprobs": [[-1.0]] * rows, "finish_reason": ["stop"] * rows, "policy_version": [0] * rows,
    }, schema=batch.ROLLOUTS)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="reward_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = resolve_reward_model(MINILM)
    table = rollouts(args.rows)
    responses = table.column("response_text").to_pylist()
    refs = table.column("reference_text").to_pylist()
    seconds: dict[str, float] = {}

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    encode = lambda texts: model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)  # noqa
    seconds["plain encode (responses + references)"] = timed(lambda: (encode(responses), encode(refs)), args.repeats)
    seconds["plain encode (responses only)"] = timed(lambda: encode(responses), args.repeats)

    from actors.reward import RewardActor

    actor = RewardActor(paper(path))
    seconds["reward role in-process (cached references)"] = timed(lambda: actor.score(table), args.repeats)

    from rlsr_ray.driver.ray_session import single_node_mode

    single_node_mode()
    import ray
    from ray import serve

    from actors.pool import Pool
    from rlsr_ray.config import PoolConfig
    from rlsr_ray.serving.reward_service import deployment

    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        pool = Pool("reward", RewardActor, PoolConfig(num_actors=1), dict(terms=paper(path)))
        seconds["reward pool (Ray actor, object store)"] = timed(
            lambda: pool.call("score", [(ray.put(table),)]), args.repeats)
        pool.shutdown()
        handle = serve.run(deployment(paper(path), max_batch_size=8, batch_wait_timeout_s=0.01),
                           name="rlsr_reward", route_prefix=None)
        seconds["reward service (Ray Serve, one caller)"] = timed(
            lambda: handle.score.remote(table).result(timeout_s=300), args.repeats)
        quarter = [table.slice(i * args.rows // 4, args.rows // 4) for i in range(4)]
        seconds["reward service (4 callers, a quarter each, batched)"] = timed(
            lambda: [r.result(timeout_s=300) for r in [handle.score.remote(q) for q in quarter]], args.repeats)
        serve.shutdown()
    finally:
        ray.shutdown()
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": args.rows,
              "repeats": args.repeats, "rewards_per_s": {k: args.rows / v for k, v in seconds.items()}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"CPU capability {report['cpu_capability']}, {args.rows} rows per call, median of {args.repeats}")
    for k, v in report["rewards_per_s"].items():
        print(f"{k:55s} {v:8.0f} rewards/s")
    assert np.isfinite(list(report["rewards_per_s"].values())).all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
