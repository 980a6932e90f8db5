"""Shared fixtures: a tiny random policy built locally (never the hub) and the shipped MiniLM."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One shared cache: the tiny model is made once per machine.
CACHE = os.environ.setdefault("RLSR_TEST_CACHE", os.path.expanduser("~/.cache/rlsr_ray"))
# Ray Train's controller takes a worker's report only when it polls (every 2 s by default), and the
# worker's next report waits for that (a queue of one): SFT steps of well under a second on the
# tiny model would each wait out the poll. Results do not depend on it; commands run by tests
# inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
torch.set_num_threads(1)

RESOLVES = pytest.StashKey[dict]()  # tests/test_install.py's resolver runs, started with the session


def pytest_collection_modifyitems(session, config, items):
    """Modules without a slow test run first, each module's tests kept together (its fixtures are
    built once). Those tests use about one core; pip's resolver runs for tests/test_install.py
    (minutes of mostly one core, waiting on nothing else) start now, on the other."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ in slow)  # stable: the order within each kept
    if not config.option.collectonly and any(item.originalname == "test_install_line_resolves" for item in items):
        import tempfile
        from pathlib import Path

        import test_install

        config.stash[RESOLVES] = test_install.start_resolves(Path(tempfile.mkdtemp(prefix="rlsr-resolves-")))


def pytest_sessionfinish(session, exitstatus):
    for proc, _ in session.config.stash.get(RESOLVES, {}).values():
        if proc.poll() is None:  # the session ended before its test collected it
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_policy() -> str:
    from rlsr_ray.modeling.models import TINY, resolve_policy

    return resolve_policy(TINY, CACHE)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from rlsr_ray.modeling.models import MINILM, resolve_reward_model

    return resolve_reward_model(MINILM)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_policy):
    from rlsr_ray.modeling.policy import load_tokenizer

    return load_tokenizer(tiny_policy)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray started in this process as rlsr_ray starts one: single-node, loopback only."""
    from rlsr_ray.driver.ray_session import single_node_mode

    single_node_mode()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# The paper's reward plus a user's term (tests/reward_fns.py, importable as a user's module is:
# on the path of the command and so of its Ray workers).
USER_TERMS = ('--reward.terms=[{name: similarity}, {name: copy_penalty}, '
              '{name: brevity, fn: "reward_fns:brevity", weight: 0.1}]')
TESTS_ON_PATH = {"PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`python -m rlsr_ray.run tiny --run.steps=3` with USER_TERMS once per session, on the local
    Ray it starts, with a Ray auth token of its own: (output folder, log text, token, every socket
    its session listened on, read each second through the run). tests/test_e2e.py checks it;
    tests/test_reward_service.py compares a run through the reward service with it.
    Its DeepSpeed extensions folder (TORCH_EXTENSIONS_DIR) holds the lock of a comm-op build that
    was killed (processes.killed_comm_op_build), as an interrupted first run left it."""
    from listeners import command_listeners
    from processes import killed_comm_op_build

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    killed_comm_op_build(out.parent / "torch_extensions")
    secret = "5ecre7" + os.urandom(13).hex()
    log = out.parent / "driver.log"
    code, seen = command_listeners(["rlsr_ray.run", "tiny", f"--run.output_dir={out}", "--run.steps=3", USER_TERMS],
                                   log, timeout_s=900, PYTHONUNBUFFERED="1", RAY_AUTH_TOKEN=secret,
                                   TORCH_EXTENSIONS_DIR=str(out.parent / "torch_extensions"), **TESTS_ON_PATH)
    assert code == 0, log.read_text()[-3000:]
    return out, log.read_text(), secret, seen
