"""The reward as a Ray Serve deployment gives the reward pool's rewards, for concurrent callers
whose tables it scores in one batch (their keys overlap, as two runs' would)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from actors.reward import RewardActor
from rlsr_ray.contract import batch
from rlsr_ray.algo.terms import paper

pytestmark = pytest.mark.slow

PAPER_COLUMNS = ["group_id", "sample_idx", "reward", "similarity", "copy_penalty"]  # REWARDS of paper()
REF = "Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit. " * 2


def rollouts(responses: list[str], refs: list[str]) -> pa.Table:
    n = len(responses)
    return pa.Table.from_pydict({
        "group_id": [0] * n, "sample_idx": list(range(n)), "prompt_ids": [[1]] * n, "reference_text": refs,
        "prompt_text": ["q"] * n, "data_json": ["{}"] * n, "response_ids": [[5]] * n, "response_text": responses,
        "rollout_logprobs": [[-1.0]] * n,
        "finish_reason": ["stop"] * n, "policy_version": [0] * n,
    }, schema=batch.ROLLOUTS)


@pytest.fixture(scope="module")
def service(local_ray, minilm_path):
    from ray import serve

    from rlsr_ray.serving.reward_service import deployment

    try:
        # A long batch wait so that the two concurrent requests below land in one batch.
        yield serve.run(deployment(paper(minilm_path), max_batch_size=4, batch_wait_timeout_s=1.0),
                        name="rlsr_reward", route_prefix=None)
    finally:
        serve.shutdown()


def test_service_rewards_equal_the_pool_rewards(service, minilm_path):
    a = rollouts(["It boils at 100 C.", "Bananas are yellow.", REF], [REF] * 3)
    b = rollouts(["Paris is the capital of France.", "Lyon."], ["The capital of France is Paris."] * 2)
    pending = [service.score.remote(a), service.score.remote(b)]  # concurrent: one batch
    got = [p.result(timeout_s=120) for p in pending]
    pool = RewardActor(paper(minilm_path))
    for table, served in zip((a, b), got):
        want = pool.score(table)
        assert served.schema.equals(want.schema)  # the key, the reward and each term's column
        assert served.select(["group_id", "sample_idx", "copy_penalty"]).equals(
            want.select(["group_id", "sample_idx", "copy_penalty"]))
        # Embedding in one batch pads to another length: float32 rounding only.
        for col in ("reward", "similarity"):
            np.testing.assert_allclose(served.column(col).to_numpy(), want.column(col).to_numpy(), atol=1e-6)
    assert got[0].column("reward").to_pylist()[2] == -1.0  # the copy penalty
    stats = service.stats.remote().result(timeout_s=30)
    assert {k: stats[k] for k in ("batches", "tables", "rows")} == {"batches": 1, "tables": 2, "rows": 5}


def test_a_run_joins_a_running_service_and_leaves_it_running(service, minilm_path):
    from rlsr_ray.config import load_config
    from rlsr_ray.serving.reward_service import connect

    cfg = load_config("tiny", ["--reward_service.enabled=true", "--reward_service.app_name=rlsr_reward"])
    shared = connect(cfg, "cpu", paper(minilm_path))
    assert not shared.owned  # found, not deployed
    out = shared.call("score", [(rollouts(["It boils at 100 C."], [REF]),)])[0]
    assert out.column_names == PAPER_COLUMNS
    shared.shutdown()  # this run is done; the service is not its to delete
    assert service.stats.remote().result(timeout_s=30)["tables"] >= 3


def test_service_refuses_a_table_off_the_contract(service):
    bad = pa.table({"group_id": [0]})
    with pytest.raises(Exception, match="reward service input: missing column"):
        service.score.remote(bad).result(timeout_s=60)


def test_a_tiny_run_with_the_service_matches_the_run_with_the_pool(tmp_path, tiny_run):
    """The shared tiny run again, scored by the service, with the reference and learner roles in
    the driver (num_actors: 0): those read the rollout tables the remote rollout pool left in the
    object store (their references fetched for them, as Ray fetches a remote call's arguments).
    Every step's numbers are the all-actor run's."""
    import json
    import subprocess
    import sys

    def rows_and_summary(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, json.loads((out / "summary.json").read_text())

    pool_rows, pool_summary = rows_and_summary(tiny_run[0])  # the same preset and steps, with the pool
    out = tmp_path / "service"
    from conftest import TESTS_ON_PATH, USER_TERMS

    # The same reward terms, a user's among them, built in the service's replicas.
    proc = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "tiny", "--ray.address=local", "--run.steps=3",
                           "--run.progress=false", f"--run.output_dir={out}", "--reward_service.enabled=true",
                           "--pools.reference.num_actors=0", "--pools.learner.num_actors=0", USER_TERMS],
                          env={**os.environ, **TESTS_ON_PATH}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    service_rows, service_summary = rows_and_summary(out)
    assert len(service_rows) == 3
    for a, b in zip(pool_rows, service_rows):
        for k in ("reward_mean", "reward_similarity_mean", "reward_copy_penalty_mean", "reward_brevity_mean", "loss",
                  "kl", "response_length_mean"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), (a["step"], k)
    for k in ("before_mean", "after_mean"):
        assert service_summary["heldout"][k] == pytest.approx(pool_summary["heldout"][k], abs=1e-6)


def test_one_runs_step_is_spread_over_two_replicas(service, minilm_path):
    """A run's table goes as several requests at once, so a second replica gets work from one run
    (with one request per step, it would need a second run). Both replicas answer; the rewards
    are the reward pool's, in the table's row order."""
    from ray import serve

    from rlsr_ray.serving.reward_service import RewardService, ServicePool

    answers = ["It boils at 100 C.", "Bananas are yellow.", REF, "Water is wet.", "212 F at sea level.",
               "Ice melts.", "Steam is hot.", "Boiling point: 100 C."]
    table = rollouts(answers, [REF] * len(answers))
    # One request per replica at a time, each held for the batch wait (a batch of 2 cannot fill
    # one request at a time): while the first request waits on its replica, the router must give
    # the next to the other one. With room for several requests per replica, as deployment() sets
    # it for batching, the router's choice between two idle replicas is a coin toss per request.
    app = RewardService.options(max_ongoing_requests=1, num_replicas=2, autoscaling_config=None,
                                ray_actor_options={"num_cpus": 0.5}).bind(paper(minilm_path), 2, 2.0)
    handle = serve.run(app, name="rlsr_reward_two", route_prefix=None)
    try:
        pool = ServicePool(handle, 120.0, True, "rlsr_reward_two", request_rows=2)
        (served,) = pool.call("score", [(table,)])
        want = RewardActor(paper(minilm_path)).score(table)
        assert served.column("sample_idx").to_pylist() == list(range(8))
        np.testing.assert_allclose(served.column("reward").to_numpy(), want.column("reward").to_numpy(), atol=1e-6)
        seen: dict[str, dict] = {}
        for _ in range(40):  # the router picks a replica per call: ask until both have answered
            st = handle.stats.remote().result(timeout_s=30)
            seen[st.pop("replica")] = st
            if len(seen) == 2:
                break
        assert len(seen) == 2 and all(st["tables"] > 0 for st in seen.values()), seen
        assert sum(st["rows"] for st in seen.values()) == 8
    finally:
        serve.delete("rlsr_reward_two")


def test_a_killed_replica_is_replaced_and_the_call_still_answered(service, local_ray):
    """Serve's own recovery plays the part of a pool's restart and retry."""
    names = [a for a in local_ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::rlsr_reward#")]
    assert len(names) == 1, names
    local_ray.kill(local_ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    out = service.score.remote(rollouts(["It boils at 100 C."], [REF])).result(timeout_s=180)
    assert out.column_names == PAPER_COLUMNS and out.num_rows == 1
