import pytest

from rlsr_ray.config import Config, ConfigError, load_config, parse_override, preset_names
from rlsr_ray.plan.resources import step_plan


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads_and_plans(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    plan = step_plan(cfg)
    assert plan.micro_steps >= 1


def test_presets_include_default_and_tiny():
    assert {"default", "tiny"} <= set(preset_names())


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["--run.steps=7", "--train.lr=3e-6", "--pools.reward.resources={gpu_l4: 1}",
                               "--data.path=/x/y.jsonl", "--rollout.temperature=0"])
    assert cfg.run.steps == 7 and cfg.train.lr == 3e-6 and cfg.data.path == "/x/y.jsonl"
    assert cfg.pools.reward.resources == {"gpu_l4": 1.0}
    assert cfg.rollout.temperature == 0.0


@pytest.mark.parametrize("args, message", [
    (["--run.stepz=3"], "unknown config key 'run.stepz'"),
    (["--nosuch.key=3"], "unknown config key 'nosuch'"),
    (["--run.steps=many"], "run.steps: expected an integer"),
    (["--rollout.backend=sglang"], "rollout.backend: 'sglang' is not allowed; choose one of 'transformers', 'vllm'"),
    (["--train.zero_stage=4"], "train.zero_stage"),
    (["--rollout.top_p=1.5"], "rollout.top_p"),
    (["--train.mini_batch_prompts=3"], "must divide"),
    (["--run.steps=-1"], "run.steps"),
    (["--algo.advantage_std_norm=maybe"], "expected true or false"),
    (["run.steps=3"], "bad argument"),
    (["--steps=3"], "expected section.key"),
    (["--rollout.backend=vllm"], "needs GPUs"),
    (["--rollout.backend=vllm", "--pools.rollout.num_gpus=1", "--rollout.top_p=0.9"],
     "rollout.top_p: 0.9 is out of range; the vllm backend with top_p < 1 needs algo.recompute_old_logprobs=true"),
    (["--model.compute_dtype=float16"], "model.compute_dtype: 'float16' is not allowed"),
    (["--train.optimizer=adam"], "train.optimizer: 'adam' is not allowed"),
    (["--algo.max_staleness=2", "--rollout.weight_sync=group"],
     "algo.max_staleness: 2 is out of range; k >= 2 overlaps only with rollout.weight_sync=object_store"),
    (["--algo.max_staleness=2", "--pools.learner.num_gpus=1", "--pools.rollout.num_gpus=1"],
     "k >= 2 overlaps only"),  # auto on CUDA: the route
    (["--pools.reward.call_timeout_s=0"], "pools.reward.call_timeout_s: 0.0 is out of range; must be > 0"),
    (["--eval.judge_retries=-1"], "eval.judge_retries"),
    (["--ray.startup_timeout_s=0"], "ray.startup_timeout_s: 0.0 is out of range; must be > 0"),
    (["--train.logprob_chunk_tokens=-1"], "train.logprob_chunk_tokens: -1 is out of range"),
    (["--train.offload_params=true"], "train.offload_params: True is out of range; needs train.zero_stage=3"),
    (["--train.offload_optimizer=true"], "train.offload_optimizer: True is out of range; needs train.zero_stage >= 1"),
    (["--rollout.backend=vllm", "--pools.rollout.num_gpus=1", "--rollout.vllm_tensor_parallel_size=2"],
     "pools.rollout.num_gpus: 1.0 is out of range; a rollout actor holds one GPU per tensor-parallel shard"),
    (["--model.attn_implementation=flash"], "model.attn_implementation: 'flash' is not allowed"),
])
def test_bad_input_is_one_clear_line(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")) as e:
        load_config("tiny", args)
    assert "\n" not in str(e.value)


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped presets: .*default.*tiny"):
        load_config("nonexistent")


def test_parse_override_yaml_scalars():
    assert parse_override("--a.b=3") == (["a", "b"], 3)
    assert parse_override("--a.b=true") == (["a", "b"], True)
    assert parse_override("--a.b=hello") == (["a", "b"], "hello")


def test_vllm_with_top_p_is_accepted_when_learners_recompute_old_logprobs():
    cfg = load_config("tiny", ["--rollout.backend=vllm", "--pools.rollout.num_gpus=1", "--rollout.top_p=0.9",
                               "--algo.recompute_old_logprobs=true"])
    assert cfg.rollout.top_p == 0.9


def test_compute_dtype_auto_follows_the_hardware(monkeypatch):
    import torch

    from rlsr_ray.modeling import policy

    assert policy.resolve_compute_dtype("float32", "cuda") == "float32"  # an explicit choice stands
    assert policy.resolve_compute_dtype("auto", "cuda") == "bfloat16"
    for amx, avx512_bf16, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"),
                                      (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert policy.resolve_compute_dtype("auto", "cpu") == expected
    assert "float32 on CPU actors" in policy.describe_compute_dtype("auto")  # the AVX2-only case just set
    assert load_config("default").model.compute_dtype == "auto"


def test_a_learner_group_shrinks_only_to_sizes_that_split_a_mini_batch():
    from rlsr_ray.config.pool_sizes import learner_sizes

    assert learner_sizes(load_config("gpu_a100")) == [8, 4]  # 2048 sequences a mini-batch
    assert learner_sizes(load_config("gpu_hetero")) == [4, 2, 1]
    assert learner_sizes(load_config("tiny")) == [1]
    assert learner_sizes(load_config("tiny", ["--pools.learner.num_actors=2", "--pools.learner.min_actors=1"])) == [2, 1]
    # Growth (max_actors) is opt-in: 4 sequences a mini-batch split over 4, 2 or 1 learners, not 3.
    assert learner_sizes(load_config("tiny", ["--pools.learner.num_actors=2", "--pools.learner.max_actors=4",
                                              "--pools.learner.min_actors=1"])) == [4, 2, 1]
