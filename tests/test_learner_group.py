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
def local_ray():
    from rlsr_ray.run import _single_node_mode

    _single_node_mode()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def train(tiny_policy, tiny_tokenizer, minilm_path):
    from actors.reward import RewardActor
    from actors.rollout import RolloutActor
    from rlsr_ray import data
    from rlsr_ray.reward import PenaltyRule

    tok = data.tokenize(data.load_examples(None)[:4], tiny_tokenizer, 128, "drop")
    prompts = data.prompts_table(tok, [0, 1, 2, 3], first_group_id=0)
    return _train_table(tiny_policy, RolloutActor(tiny_policy, generate_batch_size=16),
                        RewardActor(minilm_path, PenaltyRule()), prompts)


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
