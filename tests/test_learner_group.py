"""Two learners on a real Ray + DeepSpeed (gloo) group make the same update as one learner.

Each rank gets half of the mini-batch's rows and the mini-batch's global token count as the loss
normaliser; DeepSpeed averages gradients over ranks and the learner multiplies its loss by the world
size to undo that. Compared with plain SGD so that the update is linear in the gradient (the
tolerance is explained in test_actors.UPDATE_RTOL).
"""
from __future__ import annotations

import dataclasses

import pytest

from actors.learner import LearnerActor
from actors.pool import Pool
from rlsr_ray import batch
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


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_two_learners_make_the_one_learner_update(local_ray, tiny_policy, train, zero_stage):
    norm = float(sum(len(x) for x in train.column("response_ids").to_pylist()))
    one = settings(micro_batch_size=8, micro_steps=2, lr=1.0, optimizer="sgd", zero_stage=zero_stage)
    single = _update(learner(tiny_policy, one), [train], [norm])

    two = dataclasses.replace(one, micro_steps=1)  # 8 of the 16 rows on each rank
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
    assert_same_update(single, {k: w1[k] - w0[k] for k in w0})


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
