"""Two learners on a real Ray + DeepSpeed (gloo) group make the same update as one learner.

Each rank gets half of the mini-batch's rows and the mini-batch's global token count as the loss
normaliser; DeepSpeed averages gradients over ranks and the learner multiplies its loss by the world
size to undo that. Compared with plain SGD so that the update is linear in the gradient (the
tolerance is explained in test_actors.UPDATE_RTOL).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

import pytest

from actors.learner import LearnerActor
from actors.pool import Pool
from rlsr_ray.contract import batch
from rlsr_ray.config import PoolConfig
from test_actors import _train_table, _update, assert_same_update, learner, settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train(tiny_policy, tiny_tokenizer, minilm_path):
    from actors.reward import RewardActor
    from actors.rollout import RolloutActor
    from rlsr_ray import data
    from rlsr_ray.algo.terms import paper

    tok = data.tokenize(data.load_examples(None)[:4], tiny_tokenizer, 128, "drop")
    prompts = data.prompts_table(tok, [0, 1, 2, 3], first_group_id=0)
    return _train_table(tiny_policy, RolloutActor(tiny_policy, generate_batch_size=16),
                        RewardActor(paper(minilm_path)), prompts)


@pytest.mark.parametrize("zero_stage, budget, chunks", [(0, 0, 0), (2, 0, 0), (3, 0, 0), (2, 150, 0), (3, 0, 5)])
def test_two_learners_make_the_one_learner_update(local_ray, tiny_policy, train, zero_stage, budget, chunks):
    """budget: micro-batches packed by padded tokens (about two rows each here), so each rank makes
    as many passes as its own rows need and the group as many as the busiest rank's. chunks: the
    LM head on 5 tokens at a time with ZeRO-3, where ranks with different token counts make
    different numbers of chunks (the head is gathered per micro-batch, not per chunk)."""
    if chunks:
        train = _last_answer_cut(train, 3)
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    one = settings(micro_batch_size=8, micro_steps=2, lr=1.0, optimizer="sgd", zero_stage=zero_stage)
    single = _update(learner(tiny_policy, one), [train], [norm])

    two = dataclasses.replace(one, micro_steps=1, max_tokens_per_micro_batch=budget,  # 8 of the 16 rows on each rank
                              logprob_chunk_tokens=chunks, gradient_checkpointing=chunks > 0)
    group = Pool("learner", LearnerActor, PoolConfig(num_actors=2, num_cpus=1),
                 dict(policy_path=tiny_policy, settings=two, world_size=2), ray_restarts=False,
                 call_timeout_s=300)
    try:
        meet = group.call("rendezvous", [()] * 2)[0]
        group.call("setup", [(meet,)] * 2)
        w0 = group.call("export_weights", [()] * 2)[0]
        shards = batch.split(train, 2)
        stats = group.call("train_step", [([s], [norm]) for s in shards])
        w1 = group.call("export_weights", [()] * 2)[0]
    finally:
        group.shutdown()
    assert sum(s["tokens"] for s in stats) == norm
    if chunks:  # the ranks' chunk counts differ
        assert len({-(-int(s["tokens"]) // chunks) for s in stats}) == 2, [s["tokens"] for s in stats]
    assert_same_update(single, {k: w1[k] - w0[k] for k in w0})
    if budget:
        assert all(s["micro_batches"] > 1 for s in stats), stats


def _last_answer_cut(train, n: int):
    """The table with its last row's answer (and its log-probs) cut to n tokens."""
    import pyarrow as pa

    cols = {}
    for name in ("response_ids", "rollout_logprobs", "ref_logprobs"):
        values = train.column(name).to_pylist()
        values[-1] = values[-1][:n]
        cols[name] = pa.array(values, train.schema.field(name).type)
    for name, values in cols.items():
        train = train.set_column(train.schema.get_field_index(name), name, values)
    return batch.check(train, batch.TRAIN, "cut")


def _rollout_weights(ray, pool: Pool) -> list[dict]:
    def read(actor):  # runs inside the rollout actor
        return {k: v.detach().numpy().copy() for k, v in actor.backend.model.state_dict().items()}

    return ray.get([a.__ray_call__.remote(read) for a in pool.actors])


def test_weight_route_gives_every_rollout_actor_the_learner_weights_bit_for_bit(local_ray, tiny_policy, train):
    """Two ZeRO-3 learners (rank 0 gathers) -> two rollout actors over gloo; then one rollout actor
    is killed and restarted by Ray: that sync falls back to the object store and the route reopens."""
    import numpy as np

    from actors.rollout import RolloutActor
    from rlsr_ray.driver.step import Pools, sync_weights
    from rlsr_ray.driver.weight_route import WeightRoute

    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    s = settings(micro_batch_size=8, micro_steps=1, lr=1.0, optimizer="sgd", zero_stage=3)
    learners = Pool("learner", LearnerActor, PoolConfig(num_actors=2, num_cpus=0.5),
                    dict(policy_path=tiny_policy, settings=s, world_size=2), ray_restarts=False, call_timeout_s=300)
    rollouts = Pool("rollout", RolloutActor, PoolConfig(num_actors=2, num_cpus=0.5, max_restarts=1),
                    dict(policy_path=tiny_policy), call_timeout_s=300)
    pools = Pools(rollouts, None, None, learners, route=WeightRoute("gloo", bucket_bytes=1_000_000, timeout_s=60))
    try:
        meet = learners.call("rendezvous", [()] * 2)[0]
        learners.call("setup", [(meet,)] * 2)
        pools.route.open(learners, rollouts)
        paths = []
        for version in (1, 2, 3):
            learners.call("train_step", [([shard], [norm]) for shard in batch.split(train, 2)])
            if version == 2:  # SIGKILL-like: Ray restarts the actor, which holds initial weights again
                local_ray.kill(rollouts.actors[1], no_restart=False)
                # Until the restart is through: a call can still reach the dying process, and a
                # death during the broadcast itself is found only by weight_sync_timeout_s.
                deadline = time.monotonic() + 60
                while local_ray.get(rollouts.actors[1].in_weight_route.remote()):
                    assert time.monotonic() < deadline, "the killed rollout actor was not restarted"
                    time.sleep(0.1)
            stats = sync_weights(pools, version)
            paths.append(stats["weight_sync_path"])
            want = learners.call("export_weights", [()] * 2)[0]
            for got in _rollout_weights(local_ray, rollouts):
                for k, v in want.items():
                    np.testing.assert_array_equal(got[k], v, err_msg=f"version {version}: {k}")
            if version == 1:
                assert stats["weight_sync_mb"] == pytest.approx(sum(v.nbytes for v in want.values()) / 1e6)
    finally:
        learners.shutdown()
        rollouts.shutdown()
    assert paths == ["group", "object_store", "group"]


def test_object_store_sync_keeps_the_weights_out_of_the_driver(local_ray, tiny_policy, monkeypatch):
    """Learner rank 0 puts its export into the object store itself; the driver only ever fetches a
    reference and a byte count, never the state dict (12.9 MB for the tiny policy)."""
    import numpy as np

    from actors.rollout import RolloutActor
    from rlsr_ray.driver.step import Pools, sync_weights

    learners = Pool("learner", LearnerActor, PoolConfig(num_actors=1, num_cpus=0.5),
                    dict(policy_path=tiny_policy, settings=settings()), ray_restarts=False, call_timeout_s=300)
    rollouts = Pool("rollout", RolloutActor, PoolConfig(num_actors=1, num_cpus=0.5), dict(policy_path=tiny_policy),
                    call_timeout_s=300)
    fetched: list[int] = []
    real_get = local_ray.get

    def counting_get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        stack = [value]
        while stack:  # the bytes of every array the driver received
            v = stack.pop()
            if isinstance(v, np.ndarray):
                fetched.append(v.nbytes)
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
        return value

    try:
        meet = learners.call("rendezvous", [()])[0]
        learners.call("setup", [(meet,)])
        monkeypatch.setattr(local_ray, "get", counting_get)
        stats = sync_weights(Pools(rollouts, None, None, learners), version=1)
    finally:
        monkeypatch.undo()
        learners.shutdown()
        rollouts.shutdown()
    assert stats["weight_sync_path"] == "object_store" and stats["weight_sync_mb"] > 10
    assert sum(fetched) == 0


def test_zero_state_written_by_two_ranks_loads_on_one_and_on_three(local_ray, tiny_policy, train, tmp_path):
    """ZeRO-2 AdamW state written by two learners after a step loads into one learner (ZeRO-3) and
    into three (ZeRO-1): what each group then holds, gathered over its ranks, is the written state
    bit for bit (fp32 masters, both moments, the step count), and its weights are the masters."""
    import torch

    from actors import zero_state
    from rlsr_ray import checkpoint
    from test_actors import learner as in_process_learner

    def group(n: int, s) -> Pool:
        pool = Pool("learner", LearnerActor, PoolConfig(num_actors=n, num_cpus=0.5),
                    dict(policy_path=tiny_policy, settings=s, world_size=n), ray_restarts=False, call_timeout_s=300)
        meet = pool.call("rendezvous", [()] * n)[0]
        pool.call("setup", [(meet,)] * n)
        return pool

    def held(pool: Pool) -> dict:
        shares = local_ray.get([a.__ray_call__.remote(lambda lrn: zero_state.gather(lrn.engine, lrn.rank,
                                                                                   lrn.world_size))
                                for a in pool.actors])
        return {"step": shares[0]["step"], "params": {k: v for s in shares for k, v in s["params"].items()}}

    def assert_same(got: dict, want: dict) -> None:
        assert got["step"] == want["step"] == 1.0
        assert sorted(got["params"]) == sorted(want["params"])
        for name, tensors in want["params"].items():
            assert sorted(got["params"][name]) == ["exp_avg", "exp_avg_sq", "fp32"], name
            for k, v in tensors.items():
                assert torch.equal(got["params"][name][k], v), (name, k)

    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    two = settings(micro_batch_size=8, micro_steps=1, zero_stage=2)
    state = {"step": 1, "policy_version": 1, "cursor": {"epoch": 0, "position": 4}, "reference_policy": "p"}
    path = str(tmp_path / "step_1")
    writers = group(2, two)
    try:
        writers.call("train_step", [([s], [norm]) for s in batch.split(train, 2)])
        writers.call("save_pretrained", [(path, state)] * 2)
        before = held(writers)
    finally:
        writers.shutdown()
    names = checkpoint.optimizer_names(checkpoint.read_state(tmp_path / "step_1")["optimizer"])
    written = [checkpoint.load_nested(tmp_path / "step_1", n) for n in names]
    assert len(written) == 2 and all(w["params"] for w in written)  # each rank wrote its share
    assert_same({"step": written[0]["step"], "params": {k: v for w in written for k, v in w["params"].items()}},
                before)

    one = in_process_learner(tiny_policy, dataclasses.replace(two, zero_stage=3))
    one.load_checkpoint(path)
    assert_same(zero_state.gather(one.engine, 0, 1), before)
    weights = one.export_weights()
    assert all(np.array_equal(weights[k], v["fp32"].numpy()) for k, v in before["params"].items() if k in weights)

    three = group(3, dataclasses.replace(two, zero_stage=1))
    try:
        three.call("load_checkpoint", [(path,)] * 3)
        assert_same(held(three), before)
        weights = three.call("export_weights", [()] * 3)[0]
    finally:
        three.shutdown()
    assert all(np.array_equal(weights[k], v["fp32"].numpy()) for k, v in before["params"].items() if k in weights)
