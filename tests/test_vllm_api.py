"""The vllm backend against vLLM 0.33's own Python code, on CPU.

vLLM's engine needs CUDA, but its argument classes, its RPC encoding, its worker-extension mixing,
its logits-processor loader and its client's error path are plain Python and import here when the
wheel is installed without its CUDA dependencies (docs/development.md, "The vLLM API tests"). Stand-ins
are used only for what needs a GPU: the model runner inside the worker (StandInGPUWorker's
__init__ skips CUDA set-up) and the engine behind `LLM` (StandInLLM).
"""
from __future__ import annotations

import importlib.util
import math
import os
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("vllm") is None:  # with the wheel, a missing module of its is an error
    pytest.skip("the vLLM API tests need the vllm wheel (docs/development.md, 'The vLLM API tests')", allow_module_level=True)
pytestmark = pytest.mark.vllm_api

import numpy as np  # noqa: E402
import torch  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.engine import UtilityOutput  # noqa: E402
from vllm.v1.engine.core_client import _process_utility_output  # noqa: E402
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.loader import (  # noqa: E402
    _load_v2_logitsprocs_by_fqcns, build_custom_logits_processors_params_validator)
from vllm.v1.worker.gpu_worker import Worker as GPUWorker  # noqa: E402
from vllm.v1.worker.worker_base import WorkerWrapperBase  # noqa: E402

from actors import vllm_backend as vb  # noqa: E402
from actors.sampling import SamplingSpec  # noqa: E402

QWEN_TOKENS, QWEN_LOGITS = 151_665, 151_936  # Qwen2.5: tokenizer vs output layer (padded)
SPEC = SamplingSpec(n=8, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=11)


def test_engine_args_accept_every_argument_the_backend_passes(tiny_policy):
    for mask in (False, True):
        kw = vb.engine_kwargs(tiny_policy, "bfloat16", 0.8, seed=123, mask_padded_vocab=mask)
        args = EngineArgs(**kw)
        assert args.worker_extension_cls == "actors.vllm_backend.WeightLoaderExtension"
        assert args.logprobs_mode == "processed_logprobs" and args.max_logprobs == 1 and args.seed == 123
        assert args.logits_processors == ([vb.VOCAB_MASK] if mask else None)


def test_engine_args_take_tensor_parallel_shards_and_the_run_s_sequence_limit(tiny_policy):
    """A 32B policy on 80 GB cards: four shards in the actor's own worker processes, and the KV
    cache sized for prompt + answer rather than the model's whole context."""
    args = EngineArgs(**vb.engine_kwargs(tiny_policy, "bfloat16", 0.85, seed=1, tensor_parallel_size=4,
                                         max_model_len=4096))
    assert args.tensor_parallel_size == 4 and args.max_model_len == 4096
    assert args.distributed_executor_backend == "mp"
    one = EngineArgs(**vb.engine_kwargs(tiny_policy, "bfloat16", 0.85, seed=1))
    assert one.tensor_parallel_size == 1 and one.distributed_executor_backend is None


def test_sampling_params_for_a_padded_vocabulary_construct_and_stay_within_vllms_limits():
    sp = SamplingParams(**vb.sampling_kwargs(SPEC, token_limit=QWEN_TOKENS, seed=5))
    assert sp.n == 8 and sp.logprobs == 0 and sp.seed == 5
    # No allowed_token_ids: vLLM's V2 runner takes at most 1,024 of them and raises in
    # execute_model, which ends the engine (vllm/v1/worker/gpu/sample/logit_bias.py).
    assert sp.allowed_token_ids is None
    assert sp.extra_args == {vb.VOCAB_MASK_ARG: QWEN_TOKENS}
    greedy = SamplingParams(**vb.sampling_kwargs(SamplingSpec(1, 8, 0.0, 1.0, 0), token_limit=QWEN_TOKENS, seed=5))
    assert greedy.temperature == 0.0 and greedy.seed is None


def test_the_old_whitelist_is_what_vllms_v2_sampler_refuses():
    from vllm.v1.worker.gpu.sample.logit_bias import MAX_NUM_ALLOWED_TOKEN_IDS

    assert QWEN_TOKENS > MAX_NUM_ALLOWED_TOKEN_IDS  # why the mask is a logits processor


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0, 2.5])
def test_config_refuses_exactly_the_temperatures_vllm_refuses(temperature):
    from rlsr_ray.config import ConfigError, load_config

    args = ["--rollout.backend=vllm", "--pools.rollout.num_gpus=1", f"--rollout.temperature={temperature}"]
    try:
        SamplingParams(**vb.sampling_kwargs(SamplingSpec(1, 8, temperature, 1.0, 0), seed=1))
        vllm_ok = True
    except VLLMValidationError:
        vllm_ok = False
    try:
        load_config("tiny", args)
        ours_ok = True
    except ConfigError:
        ours_ok = False
    assert ours_ok == vllm_ok


def _mask_on(limits: list[int], vocab: int):
    """The vocabulary mask as vLLM's sampler builds it: from the runner's request state."""
    from actors.vllm_logits import TokenizerVocabMask

    state = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=len(limits), vocab_size=vocab,
                                   all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
    mask = TokenizerVocabMask(SimpleNamespace(), state)
    for slot, limit in enumerate(limits):
        kwargs = vb.sampling_kwargs(SPEC, token_limit=limit or None, seed=slot)
        assert mask.add_request(slot, SamplingParams(**kwargs)) == (limit > 0)
    mask.apply_staged_writes()
    return mask


def test_vocabulary_mask_keeps_vllms_logprobs_on_the_learners_support():
    vocab, limit = 40, 31
    mask = _mask_on([limit, 0, limit], vocab)
    slots = np.array([2, 1, 0])  # the batch's rows in another order than the slots
    ctx = LogitsContext(expanded_idx_mapping=torch.from_numpy(slots), idx_mapping=torch.from_numpy(slots),
                        idx_mapping_np=slots, expanded_local_pos=torch.zeros(3, dtype=torch.int64),
                        input_ids=torch.zeros(3, dtype=torch.int64), pos=torch.zeros(3, dtype=torch.int64),
                        seq_lens_upper_bound_np=np.ones(3, dtype=np.int64))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 3
    out = mask.apply(logits.clone(), ctx)
    for row in (0, 2):  # masked requests: what the learner computes over the tokenizer's ids
        assert torch.isneginf(out[row, limit:]).all()
        torch.testing.assert_close(torch.log_softmax(out[row], -1)[:limit], torch.log_softmax(logits[row, :limit], -1))
    torch.testing.assert_close(out[1], logits[1])  # a request without the limit is untouched


def test_vllm_loads_the_mask_and_validates_its_argument():
    from actors import vllm_logits

    assert (vb.VOCAB_MASK, vb.VOCAB_MASK_ARG) == (vllm_logits.QUALNAME, vllm_logits.EXTRA_ARG)
    assert _load_v2_logitsprocs_by_fqcns([vb.VOCAB_MASK]) == [vllm_logits.TokenizerVocabMask]
    validate = build_custom_logits_processors_params_validator([vb.VOCAB_MASK])
    validate(SamplingParams(**vb.sampling_kwargs(SPEC, token_limit=QWEN_TOKENS, seed=1)))
    with pytest.raises(VLLMValidationError, match=vb.VOCAB_MASK_ARG):
        validate(SamplingParams(extra_args={vb.VOCAB_MASK_ARG: "all"}))


def test_a_padded_model_needs_vllms_v2_runner():
    env: dict = {}
    vb.use_v2_runner(env)
    assert env == {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        vb.use_v2_runner({"VLLM_USE_V2_MODEL_RUNNER": "0"})


def test_each_prompt_has_its_own_seed_whichever_actor_draws_it():
    seeds = vb.prompt_seeds(SPEC, [4, 9, 17])
    assert len(set(seeds)) == 3 and all(0 <= s < 2**62 for s in seeds)
    assert vb.prompt_seeds(SPEC, [17]) == seeds[2:]  # alone, or in another actor's batch
    assert vb.prompt_seeds(SamplingSpec(8, 64, 1.0, 1.0, seed=12), [17]) != seeds[2:]  # another step


class StandInRunner:  # the model runner needs CUDA: it only records what the extension loads
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}
        self.model = SimpleNamespace(load_weights=lambda weights: self.loaded.update(dict(weights)))


def _stand_in_init(self, **kwargs):
    self.rank = 0  # the engine rank vLLM's WorkerBase.__init__ sets (one worker, no tensor parallelism)
    self.model_runner = StandInRunner()


StandInGPUWorker = GPUWorker  # replaced per test by a fresh subclass: init_worker edits its bases


def _wrapper_with_extension(monkeypatch) -> WorkerWrapperBase:
    """vLLM's WorkerWrapperBase.init_worker resolves the worker and extension classes by name,
    checks for clashing names and appends the extension to the worker's bases."""
    # vLLM's own GPU worker class, minus the CUDA set-up in its __init__.
    monkeypatch.setattr(f"{__name__}.StandInGPUWorker", type("StandInGPUWorker", (GPUWorker,), {"__init__": _stand_in_init}))
    config = SimpleNamespace(
        enable_trace_function_call_for_thread=lambda: None,
        parallel_config=SimpleNamespace(worker_cls=f"{__name__}.StandInGPUWorker",
                                        worker_extension_cls="actors.vllm_backend.WeightLoaderExtension"),
        model_config=SimpleNamespace(supports_multimodal_inputs=False))
    wrapper = WorkerWrapperBase(rpc_rank=0)
    wrapper.init_worker([{"vllm_config": config}])
    return wrapper


def _rpc(wrapper: WorkerWrapperBase, method: str, args: tuple):
    """LLM.collective_rpc's trip: msgpack from the client to the engine core (vLLM's encoder and
    untyped decoder), then the worker's getattr dispatch (MultiprocExecutor's worker loop)."""
    wire = MsgpackEncoder().encode((0, 1, "collective_rpc", (method, None, args, None)))
    _, _, _, (name, _, decoded, kwargs) = MsgpackDecoder().decode(wire)
    return getattr(wrapper, name)(*decoded, **(kwargs or {}))


def test_weight_rpcs_cross_vllms_encoding_into_the_mixed_in_extension(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from rlsr_ray.modeling.weight_group import RouteSettings, TensorSpec

    wrapper = _wrapper_with_extension(monkeypatch)
    assert isinstance(wrapper.worker, vb.WeightLoaderExtension) and isinstance(wrapper.worker, GPUWorker)
    weights = {"model.embed_tokens.weight": torch.arange(6.0).view(2, 3)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    _rpc(wrapper, "rlsr_load_file", (str(tmp_path / "w.safetensors"),))
    torch.testing.assert_close(wrapper.worker.model_runner.loaded["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])

    joined = {}
    monkeypatch.setattr("rlsr_ray.modeling.weight_group.WeightGroup",
                        lambda address, rank, settings: joined.update(address=address, rank=rank, settings=settings))
    settings = RouteSettings(3, "nccl", "bfloat16", 64 << 20, 30.0)
    specs = [TensorSpec("lm_head.weight", (QWEN_LOGITS, 896))]
    _rpc(wrapper, "rlsr_join_route", ("tcp://10.0.0.1:1234", 2, settings.to_list(), vb.specs_to_rpc(specs)))
    assert joined == {"address": "tcp://10.0.0.1:1234", "rank": 2, "settings": settings}
    assert wrapper.worker.rlsr_specs == specs
    _rpc(wrapper, "rlsr_close_route", ())
    assert wrapper.worker.rlsr_route is None
    # A tensor-parallel shard joins at the engine's first rank plus its own (vLLM's Worker.rank).
    wrapper.worker.rank = 3
    _rpc(wrapper, "rlsr_join_route", ("tcp://10.0.0.1:1234", 5, settings.to_list(), vb.specs_to_rpc(specs)))
    assert joined["rank"] == 8


class StandInLLM:  # the engine needs CUDA; its client's failure path is vLLM's own
    def __init__(self):
        self.calls: list[str] = []

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        if method == "rlsr_receive_weights":
            future = _vllm_future_failing(f"Call to collective_rpc method failed: RuntimeError: [{method}] "
                                          "Connection closed by peer [127.0.0.1]:29500")
            return future.result()
        return [None]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def _vllm_future_failing(message: str):
    from concurrent.futures import Future

    future: Future = Future()
    _process_utility_output(UtilityOutput(call_id=7, failure_message=message), {7: future})
    return future


def test_a_torn_route_in_vllms_worker_falls_back_to_the_object_store(tiny_policy):
    from actors.rollout import RolloutActor

    failure = _vllm_future_failing("boom").exception()
    assert type(failure) is Exception  # not a RuntimeError: what the actor must still catch
    actor = RolloutActor(tiny_policy)
    backend = vb.VLLMBackend.__new__(vb.VLLMBackend)
    backend.llm, backend.joined = StandInLLM(), True
    actor.backend = backend
    result = actor.receive_weights(3)
    assert result["ok"] is False and "Connection closed by peer" in result["error"]
    assert result["error"].startswith("rollout[0]: ")
    assert backend.llm.calls == ["rlsr_receive_weights", "rlsr_close_route"] and not backend.in_route()
    assert actor.policy_version == 0  # the object store's sync sets it


def test_mixed_seed_spreads_nearby_inputs():
    from actors.sampling import mixed_seed

    seeds = {mixed_seed(0, r) for r in range(64)} | {mixed_seed(1, r) for r in range(64)}
    assert len(seeds) == 128 and max(seeds) < 2**62
    assert math.isclose(np.mean([s / 2**62 for s in seeds]), 0.5, abs_tol=0.15)  # not clustered near 0


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_engine_args_enable_lora_at_a_rank_vllm_sizes_for(tiny_policy):
    from vllm.config.lora import LoRAConfig

    args = EngineArgs(**vb.engine_kwargs(tiny_policy, "bfloat16", 0.85, seed=1, lora_rank=12))
    assert args.enable_lora and args.max_lora_rank == 16 and args.max_loras == 1
    LoRAConfig(max_lora_rank=args.max_lora_rank, max_loras=args.max_loras)  # vLLM's own validation
    assert [vb.max_lora_rank(r) for r in (1, 2, 8, 9, 320, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="over vLLM's largest max_lora_rank 512"):
        vb.max_lora_rank(513)
    assert not EngineArgs(**vb.engine_kwargs(tiny_policy, "bfloat16", 0.85, seed=1)).enable_lora


def test_each_syncs_adapters_load_through_vllms_own_lora_loader(tiny_policy, monkeypatch):
    """A sync's adapters as AdapterFiles writes them, read by vLLM's PEFTHelper (with its rank and
    bias checks) and LoRAModel.from_local_checkpoint as its worker reads them: every adapted layer
    of both decoder layers, A and B the learner's values, and vLLM's scale alpha / r. The punica
    kernels that apply them need CUDA (not run here). STAND-IN: pinned host memory (CUDA) is off."""
    import vllm.lora.lora_model as lora_model
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from rlsr_ray.modeling import lora
    from rlsr_ray.modeling.policy import load_causal_lm

    monkeypatch.setattr(lora_model, "PIN_MEMORY", False)
    spec = lora.LoraSpec(4, 8.0, 0.0, LORA_TARGETS)
    torch.manual_seed(0)
    model = lora.wrap(load_causal_lm(tiny_policy), spec)
    sent = {k: v.detach().clone().normal_() for k, v in lora.adapter_tensors(model).items()}  # a trained B != 0
    files = vb.AdapterFiles(spec, tiny_policy)
    try:
        assert files.request is None  # before the first sync: the base
        versions = []
        for _ in range(3):
            files.load(sent)
            versions.append(files.request)
        assert [r.lora_int_id for r in versions] == [1, 2, 3]  # a new id per sync: vLLM loads it afresh
        assert len({r.lora_name for r in versions}) == 3
        assert not os.path.exists(versions[0].lora_path) and os.path.exists(versions[1].lora_path)
        helper = PEFTHelper.from_local_dir(versions[-1].lora_path, 2048)
        helper.validate_legal(LoRAConfig(max_lora_rank=vb.max_lora_rank(spec.rank), max_loras=1))
        loaded = lora_model.LoRAModel.from_local_checkpoint(versions[-1].lora_path, set(LORA_TARGETS),
                                                            peft_helper=helper, lora_model_id=3, device="cpu",
                                                            dtype=torch.float32)
        assert len(loaded.loras) == 2 * len(LORA_TARGETS)
        for module, w in loaded.loras.items():
            name = f"base_model.model.{module}"
            assert torch.equal(w.lora_a, sent[f"{name}.lora_A.default.weight"])
            assert torch.equal(w.lora_b, sent[f"{name}.lora_B.default.weight"])
            assert w.scaling == spec.alpha / spec.rank
    finally:
        files.close()
    assert not os.path.exists(files.root)


def test_adapter_folders_of_dead_rollout_actors_are_removed(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()  # reaped: its pid names no process now
    (tmp_path / f"rlsr_lora_{dead.pid}_abc").mkdir()
    (tmp_path / f"rlsr_lora_{os.getpid()}_def").mkdir()  # alive: kept
    (tmp_path / "other").mkdir()
    assert vb.remove_orphans(str(tmp_path)) == [f"rlsr_lora_{dead.pid}_abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", f"rlsr_lora_{os.getpid()}_def"]


def test_config_refuses_lora_settings_vllm_cannot_take():
    from rlsr_ray.config import ConfigError, load_config

    base = ["--rollout.backend=vllm", "--pools.rollout.num_gpus=1", "--train.lora.enabled=true"]
    with pytest.raises(ConfigError, match="train.lora.rank: 600 is out of range; the vllm backend takes adapters"):
        load_config("tiny", [*base, "--train.lora.rank=600"])
    with pytest.raises(ConfigError, match="rollout.weight_sync: 'group' is out of range; under train.lora"):
        load_config("tiny", [*base, "--rollout.weight_sync=group"])
    from rlsr_ray.config import uses_weight_route

    assert not uses_weight_route(load_config("tiny", [*base, "--pools.learner.num_gpus=1"]))
