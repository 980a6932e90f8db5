import pytest

from rlsr_ray.config import ConfigError, load_config
from rlsr_ray.plan.resources import bundle, bundles, local_num_cpus, step_plan, total_resources


def test_bundle_carries_gpu_accelerator_and_custom_resources():
    cfg = load_config("tiny", ["--pools.rollout.num_gpus=1", "--pools.rollout.accelerator_type=L4",
                               "--pools.rollout.resources={rollout_node: 1}", "--pools.rollout.num_actors=2"])
    b = bundle(cfg.pools.rollout)
    assert b == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:L4": 0.001, "rollout_node": 1.0}
    assert len(bundles(cfg.pools.rollout)) == 2
    total = total_resources(cfg)
    assert total["CPU"] == 5.0 and total["GPU"] == 2.0 and total["rollout_node"] == 2.0


def test_in_process_pools_ask_nothing():
    cfg = load_config("tiny", [f"--pools.{r}.num_actors=0" for r in ("rollout", "reward", "reference", "learner")])
    assert total_resources(cfg) == {}
    assert local_num_cpus(cfg) == 1


@pytest.mark.parametrize("prompts, mini, n, micro, learners, expect", [
    (1024, 256, 8, 8, 8, dict(rows_per_step=8192, minibatches_per_step=4, rows_per_learner=256, micro_steps=32)),
    (8, 8, 4, 8, 1, dict(rows_per_step=32, minibatches_per_step=1, rows_per_learner=32, micro_steps=4)),
    (4, 2, 2, 3, 2, dict(rows_per_step=8, minibatches_per_step=2, rows_per_learner=2, micro_steps=1)),
    (4, 2, 3, 4, 1, dict(rows_per_step=12, minibatches_per_step=2, rows_per_learner=6, micro_steps=2)),
])
def test_step_plan_arithmetic(prompts, mini, n, micro, learners, expect):
    cfg = load_config("tiny", [f"--train.prompts_per_step={prompts}", f"--train.mini_batch_prompts={mini}",
                               f"--rollout.samples_per_prompt={n}", f"--train.micro_batch_size={micro}",
                               f"--pools.learner.num_actors={learners}"])
    plan = step_plan(cfg)
    for k, v in expect.items():
        assert getattr(plan, k) == v, k
    assert plan.learner_world_size == learners


def test_uneven_learner_split_is_rejected_when_loading():
    with pytest.raises(ConfigError, match="divide evenly over 2 learners"):
        load_config("tiny", ["--train.mini_batch_prompts=1", "--train.prompts_per_step=1",
                             "--rollout.samples_per_prompt=3", "--pools.learner.num_actors=2"])
