"""Rollout backend on `transformers.generate`: runs on CPU and GPU, the default on CPU machines."""
from __future__ import annotations

from typing import Sequence

import torch

from actors.sampling import Sample, SamplingSpec, cut_at_eos
from rlsr_ray.modeling.policy import autocast, load_causal_lm, state_dict_to_torch


class TransformersBackend:
    def __init__(self, policy_path: str, tokenizer, compute_dtype: str, device: str, batch_size: int, lora=None):
        from transformers import GenerationConfig

        self.model = load_causal_lm(policy_path, device).eval()
        # Logits beyond the tokenizer's vocabulary (padded for the kernels) are no token: never
        # sampled, and out of the log-probs' support as in the learner's (policy.forward_logprobs).
        self.vocab_size = len(tokenizer)
        padded = range(self.vocab_size, self.model.config.get_text_config().vocab_size)
        # Sampling is what SamplingSpec says and nothing else. A model's generation_config.json may
        # carry repetition_penalty, no_repeat_ngram_size, min_length, suppressed tokens...: generate()
        # would apply them silently, so the tokens would come from another distribution than the
        # log-probs below (and the learner's) describe.
        self.model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, suppress_tokens=list(padded) or None)
        if lora is not None:
            # Adapters on the base (after the generation config: generate() reads the base model's).
            # B starts at zero, so until the first sync this samples from the base itself. They
            # stay separate matmuls rather than merged into W: a sync then replaces them exactly,
            # with no rounding left behind in W by un-merging the previous ones.
            from rlsr_ray.modeling import lora as adapters

            self.model = adapters.wrap(self.model, lora).eval()
        self.lora = lora is not None
        self.tok = tokenizer
        self.compute_dtype, self.device, self.batch_size = compute_dtype, device, batch_size
        self.eos_ids = {tokenizer.eos_token_id}
        self.route = None  # this actor's end of the weight route, once joined

    weight_dtype = "float32"  # load_causal_lm keeps float32 weights; compute_dtype is autocast only

    def join_route(self, address: str, rank: int, settings, specs: list) -> None:
        from rlsr_ray.modeling.weight_group import WeightGroup

        self.close_route()
        self.route, self.route_specs = WeightGroup(address, rank, settings), specs

    def in_route(self) -> bool:
        return self.route is not None

    def receive_weights(self) -> None:
        if self.route is None:
            raise RuntimeError("not in the weight route")
        state: dict = {}
        for bucket in self.route.receive(self.route_specs):
            state.update(bucket)
        self.load_weights(state)

    def close_route(self) -> None:
        self.route = None

    def load_weights(self, state_dict: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict_to_torch(state_dict), strict=False)
        if self.lora:  # the adapters alone: every adapter tensor must be among them, the base is kept
            from rlsr_ray.modeling.lora import adapter_tensors

            missing = [k for k in adapter_tensors(self.model) if k not in state_dict]
        # Tied embeddings may appear once; anything else missing means a mismatched model.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the rollout model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 keys: Sequence[int] | None = None) -> list[list[Sample]]:
        """Sample k of the prompt keyed g draws from its own stream, seeded by (spec.seed, g, k)
        (keyed_sampler.py), so it does not depend on the actor, the batch or the chunking; without
        keys, a prompt's position in this call is its key."""
        keys = list(range(len(prompts))) if keys is None else list(keys)
        flat = [(p, (spec.seed, key, k)) for p, key in zip(prompts, keys) for k in range(spec.n)]
        samples: list[Sample] = []
        for s in range(0, len(flat), self.batch_size):
            chunk = flat[s:s + self.batch_size]
            samples.extend(self._generate_chunk([p for p, _ in chunk], spec, [row for _, row in chunk]))
        return [samples[i * spec.n:(i + 1) * spec.n] for i in range(len(prompts))]

    def _generate_chunk(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                        rows: Sequence[tuple[int, int, int]]) -> list[Sample]:
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = spec.temperature == 0
        kwargs: dict = dict(do_sample=False)  # sampling, too, is an argmax: of one token left (keyed_sampler)
        if not greedy:
            from transformers import LogitsProcessorList

            from actors.keyed_sampler import KeyedSampler

            kwargs["logits_processor"] = LogitsProcessorList(
                [KeyedSampler(rows, spec.temperature, spec.top_p, self.device)])
        with autocast(self.device, self.compute_dtype):
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=spec.max_new_tokens, pad_token_id=pad, eos_token_id=sorted(self.eos_ids),
                output_logits=True, return_dict_in_generate=True, **kwargs,
            )
        tokens = out.sequences[:, width:]  # [B, T]
        # Raw logits (before temperature/top-p) -> log-probs at the sampling temperature.
        logits = torch.stack(out.logits, dim=1)[..., :self.vocab_size].float()  # [B, T, V]
        if not greedy and spec.temperature != 1.0:
            logits = logits / spec.temperature
        lp = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        return [cut_at_eos(t.tolist(), l.tolist(), self.eos_ids) for t, l in zip(tokens.cpu(), lp.cpu())]
