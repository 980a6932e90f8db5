"""Shared fixtures: a tiny random policy built locally (never the hub) and the shipped MiniLM."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One shared cache: the tiny model and DeepSpeed's JIT-built comm op are made once per machine.
CACHE = os.environ.setdefault("RLSR_TEST_CACHE", os.path.expanduser("~/.cache/rlsr_ray"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(CACHE, "torch_extensions"))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_policy() -> str:
    from rlsr_ray.models import TINY, resolve_policy

    return resolve_policy(TINY, CACHE)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from rlsr_ray.models import MINILM, resolve_reward_model

    return resolve_reward_model(MINILM)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_policy):
    from rlsr_ray.policy import load_tokenizer

    return load_tokenizer(tiny_policy)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray started in this process as rlsr_ray starts one: single-node, loopback only."""
    from rlsr_ray.run import _single_node_mode

    _single_node_mode()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
