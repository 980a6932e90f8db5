"""Rollout backend on vLLM (CUDA only; install with the `vllm` extra).

Written against vLLM 0.33's API: `LLM`, `SamplingParams`, `TokensPrompt`, `LLM.collective_rpc`
with a `worker_extension_cls` for in-place weight updates, and a V2 logits processor
(actors/vllm_logits.py) for models whose output layer is padded. vLLM has no CPU build, so the
engine itself only runs on GPU machines; the arguments built here are checked by the tests against
vLLM's own Python classes (SamplingParams, EngineArgs, its msgpack RPC encoding, the worker
extension mixing), which import on CPU.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from actors.reaper import child_pids, reap_with_this_process
from actors.sampling import Sample, SamplingSpec, cut_at_eos, mixed_seed
from rlsr_ray.modeling.weight_group import TensorSpec

# Names repeated from actors/vllm_logits.py, which imports vLLM and so loads only where it runs.
VOCAB_MASK = "actors.vllm_logits:TokenizerVocabMask"
VOCAB_MASK_ARG = "rlsr_token_limit"


# vLLM's max_lora_rank takes these values only (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM sizes its LoRA buffers for that holds adapters of `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} is over vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
    return fits[0]


def engine_kwargs(policy_path: str, compute_dtype: str, gpu_memory_utilization: float, seed: int,
                  mask_padded_vocab: bool = False, tensor_parallel_size: int = 1,
                  max_model_len: int | None = None, lora_rank: int | None = None) -> dict[str, Any]:
    """`vllm.LLM` arguments. `seed` is the engine's: it drives only requests that bring no seed
    of their own, and rlsr_ray's always bring one (sampling_kwargs).
    `max_model_len`: prompt + answer limit; without it vLLM sizes for the model's whole context
    (32k-128k), and refuses to start where one such sequence's KV cache does not fit.
    `tensor_parallel_size` > 1: the engine shards the policy over that many GPUs of this actor, in
    worker processes of its own (the "mp" executor: the actor's placement already holds the GPUs,
    so vLLM must not ask Ray for placement of its own)."""
    kwargs: dict[str, Any] = dict(
        model=policy_path, dtype=compute_dtype, gpu_memory_utilization=gpu_memory_utilization,
        seed=seed, enable_prefix_caching=True, tensor_parallel_size=tensor_parallel_size,
        # Log-probs after temperature scaling, matching what the learner computes (top_p < 1 also
        # renormalises them, which config.validate only allows when the learners recompute them).
        logprobs_mode="processed_logprobs",
        max_logprobs=1,  # only the sampled token's log-prob is ever asked for
        # vLLM's neutral sampling defaults, not the model's generation_config.json: a repetition
        # penalty or top_k from there would change what is sampled without changing the log-probs.
        generation_config="vllm",
        worker_extension_cls="actors.vllm_backend.WeightLoaderExtension",
    )
    if mask_padded_vocab:
        kwargs["logits_processors"] = [VOCAB_MASK]
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if lora_rank is not None:
        # One adapter at a time: each sync brings the policy's next version, and the requests of a
        # generate call all name the current one (an LRU of one slot drops the one before).
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(lora_rank), max_loras=1)
    return kwargs


def sampling_kwargs(spec: SamplingSpec, token_limit: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """SamplingParams arguments: n samples, the sampled token's log-prob only (logprobs=0).

    `token_limit`: the tokenizer's vocabulary size where the model has more logits (padded for
    the kernels); ids from there on are no token and must never be sampled. The vocabulary mask
    applies it before processed log-probs are taken, as the learner drops those logits too.
    `seed`: this request's (vLLM gives its i-th sample seed + i). In vLLM's V2 sampler every
    request draws from a seeded stream anyway; an explicit seed only rules out the fused
    FlashInfer sampler, which processed log-probs rule out already."""
    kwargs: dict[str, Any] = dict(n=spec.n, max_tokens=spec.max_new_tokens, logprobs=0)
    if token_limit is not None:
        kwargs["extra_args"] = {VOCAB_MASK_ARG: token_limit}
    if spec.temperature == 0:
        kwargs.update(temperature=0.0)
    else:
        kwargs.update(temperature=spec.temperature, top_p=spec.top_p, seed=seed)
    return kwargs


def prompt_seeds(spec: SamplingSpec, keys: Sequence[int]) -> list[int]:
    """One seed per prompt from the call's seed and the prompt's key (its group id), so a prompt's
    samples are the same whichever actor draws it and whatever else is in the batch."""
    return [mixed_seed(spec.seed, k) for k in keys]


def to_samples(request_output: Any, eos_ids: set[int]) -> list[Sample]:
    """One vLLM RequestOutput -> its samples (token ids, sampled-token log-probs, finish reason)."""
    samples = []
    for comp in request_output.outputs:
        if comp.finish_reason not in ("stop", "length"):  # abort / error: not a sample to train on
            raise RuntimeError(f"vLLM request {getattr(request_output, 'request_id', '?')} ended with finish_reason "
                               f"{comp.finish_reason!r}")
        ids = list(comp.token_ids)
        if comp.logprobs is None or len(comp.logprobs) != len(ids):
            raise ValueError("vLLM returned no per-token logprobs; SamplingParams(logprobs=0) is required")
        lps = [float(step[t].logprob) for t, step in zip(ids, comp.logprobs)]
        sample = cut_at_eos(ids, lps, eos_ids)
        if comp.finish_reason == "stop":  # a stop token vLLM did not echo still means "stop"
            sample.finish_reason = "stop"
        samples.append(sample)
    return samples


def specs_to_rpc(specs: Sequence[TensorSpec]) -> list:
    """TensorSpecs as plain lists: vLLM's multiprocess engine msgpack-encodes RPC arguments and
    decodes them untyped on the worker side, so only str/int/float/list survive the trip."""
    return [[s.name, list(s.shape)] for s in specs]


def specs_from_rpc(raw: list) -> list[TensorSpec]:
    return [TensorSpec(str(name), tuple(int(d) for d in shape)) for name, shape in raw]


class WeightLoaderExtension:
    """Mixed into vLLM's GPU worker (worker_extension_cls). collective_rpc carries only metadata
    (addresses, names, shapes, paths); tensors arrive over the weight route's process group or,
    for the object-store fallback, from a safetensors file the actor wrote."""

    def rlsr_join_route(self, address: str, rank: int, settings: list, specs: list) -> None:
        """rank: the engine's first rank in the route; each tensor-parallel worker takes the next
        (its engine rank, vLLM's `self.rank`). Every shard receives the full tensors and its
        model's load_weights keeps its own slice, as when it loads a checkpoint."""
        from rlsr_ray.modeling.weight_group import RouteSettings, WeightGroup

        self.rlsr_route = WeightGroup(address, rank + self.rank, RouteSettings(*settings))
        self.rlsr_specs = specs_from_rpc(specs)

    def rlsr_receive_weights(self) -> None:
        for bucket in self.rlsr_route.receive(self.rlsr_specs):  # HF names; vLLM fuses as it loads
            self.model_runner.model.load_weights(weights=bucket)

    def rlsr_close_route(self) -> None:
        self.rlsr_route = None

    def rlsr_load_file(self, path: str) -> None:
        from safetensors.torch import load_file

        self.model_runner.model.load_weights(weights=load_file(path).items())  # CPU tensors: copied into place


def use_v2_runner(environ: dict) -> None:
    """The vocabulary mask is a V2 logits processor: vLLM 0.33 picks its V2 model runner by
    default on CUDA, and this keeps a later default from switching it off under the mask."""
    if environ.get("VLLM_USE_V2_MODEL_RUNNER", "1").strip() == "0":  # vLLM reads it as bool(int(value))
        raise ValueError("this model's output layer is padded beyond its tokenizer, which the vllm backend masks "
                         "with a V2 logits processor; unset VLLM_USE_V2_MODEL_RUNNER=0")
    environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"


def remove_orphans(folder: str) -> list[str]:
    """Adapter folders of rollout actors that are gone (Ray ends an actor by SIGKILL, so none
    removes its own): shared memory is RAM. Their names carry the writer's pid."""
    import shutil

    removed = []
    for name in os.listdir(folder):
        parts = name.split("_")
        if name.startswith("rlsr_lora_") and len(parts) >= 4 and parts[2].isdigit() and not _alive(int(parts[2])):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class AdapterFiles:
    """LoRA under vLLM: each sync's adapters become a PEFT folder in shared memory (/dev/shm, RAM)
    and a LoRARequest naming it under the next id, which the engine's workers load at the first
    request that names it (vLLM's own loader and checks: PEFTHelper, LoRAModel.from_local_checkpoint).
    It is the adapter path vLLM 0.33's public API offers: an adapter in memory would need its
    private worker-side manager. Folders no request can name any more are removed."""

    def __init__(self, spec, base: str):
        import tempfile

        self.spec, self.base = spec, base
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        remove_orphans(shm)
        self.root = tempfile.mkdtemp(prefix=f"rlsr_lora_{os.getpid()}_", dir=shm)
        self.request = None  # None until the first sync: the base, as fresh adapters (B = 0) compute
        self.folders: list[str] = []

    def load(self, tensors: dict) -> None:
        import shutil

        from vllm.lora.request import LoRARequest

        from rlsr_ray.modeling import lora

        n = self.request.lora_int_id + 1 if self.request is not None else 1  # vLLM's ids start at 1
        folder = os.path.join(self.root, f"v{n}")
        lora.write_adapter(folder, tensors, self.spec, self.base)
        self.request = LoRARequest(f"rlsr-policy-{n}", n, folder)
        self.folders.append(folder)
        while len(self.folders) > 2:  # the one before may still be read by a load in flight
            shutil.rmtree(self.folders.pop(0), ignore_errors=True)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


class VLLMBackend:
    def __init__(self, policy_path: str, eos_ids: set[int], compute_dtype: str, gpu_memory_utilization: float,
                 vocab_size: int, seed: int = 0, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 lora=None):
        from transformers import AutoConfig

        from rlsr_ray.modeling.lora import MERGED, is_adapter

        if is_adapter(policy_path):
            raise ValueError(f"{policy_path}: the vllm backend loads a whole model, not a PEFT adapter folder; "
                             f"pass the merged folder ({os.path.join(policy_path, MERGED)} for a run's final checkpoint)")
        from vllm import LLM  # imported here: the package exists only on CUDA machines

        logits = AutoConfig.from_pretrained(policy_path).get_text_config().vocab_size
        self.token_limit = vocab_size if logits > vocab_size else None
        if self.token_limit is not None:
            use_v2_runner(os.environ)
        self.eos_ids, self.compute_dtype = eos_ids, compute_dtype
        self.joined = False  # whether the engine's worker holds an end of the weight route
        self.llm = LLM(**engine_kwargs(policy_path, compute_dtype, gpu_memory_utilization, seed,
                                       mask_padded_vocab=self.token_limit is not None,
                                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                                       lora_rank=lora.rank if lora is not None else None))
        self.adapters = AdapterFiles(lora, policy_path) if lora is not None else None
        # The engine runs in child processes: they must die with this actor, or a restarted actor
        # finds the GPU still full (actors/reaper.py).
        self.reaper = reap_with_this_process(child_pids())

    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 keys: Sequence[int] | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = prompt_seeds(spec, range(len(prompts)) if keys is None else keys)
        params = [SamplingParams(**sampling_kwargs(spec, self.token_limit, seed)) for seed in seeds]
        adapter = self.adapters.request if self.adapters is not None else None
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False,
                                 lora_request=adapter)
        return [to_samples(o, self.eos_ids) for o in outs]

    @property
    def weight_dtype(self) -> str:
        return self.compute_dtype

    def join_route(self, address: str, rank: int, settings, specs: list) -> None:
        self.joined = False
        self.llm.collective_rpc("rlsr_join_route", args=(address, rank, settings.to_list(), specs_to_rpc(specs)))
        self.joined = True

    def in_route(self) -> bool:
        return self.joined

    def receive_weights(self) -> None:
        self.llm.collective_rpc("rlsr_receive_weights")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close_route(self) -> None:
        self.joined = False
        self.llm.collective_rpc("rlsr_close_route")

    def load_weights(self, state_dict: dict) -> None:
        """Object-store fallback: the worker reads a safetensors file (tensors never go by RPC).
        Under LoRA the adapters alone, as the next adapter version (AdapterFiles)."""
        import tempfile

        from safetensors.torch import save_file

        from rlsr_ray.modeling.policy import state_dict_to_torch

        if self.adapters is not None:
            self.adapters.load(state_dict_to_torch(state_dict))
            return

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file({k: v.contiguous() for k, v in state_dict_to_torch(state_dict).items()}, path)
            self.llm.collective_rpc("rlsr_load_file", args=(path,))
        self.llm.reset_prefix_cache()
