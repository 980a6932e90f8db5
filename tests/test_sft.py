"""Supervised fine-tuning on Ray Train: batches cut for workers, and SFT -> RLSR on its output."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from listeners import LOOPBACK, own_ray_env, session_listeners
from processes import in_own_session

from rlsr_ray.contract import batch
from rlsr_ray.sft import worker_shares


def test_a_global_batch_is_length_sorted_and_split_over_workers():
    lengths = [(3, 9), (1, 1), (2, 4), (5, 5), (1, 2)]  # (prompt, answer) tokens
    rows = pa.table({"group_id": pa.array(range(5), pa.int64()),
                     "prompt_ids": pa.array([[7] * p for p, _ in lengths], pa.list_(pa.int32())),
                     "response_ids": pa.array([[8] * r for _, r in lengths], pa.list_(pa.int32()))})
    shares, tokens, passes = worker_shares(batch.check(rows, batch.SFT, "t"), [0, 1, 2, 3, 4], 2, 2)
    assert [s.column("group_id").to_pylist() for s in shares] == [[1, 4, 2], [3, 0]]  # totals 2 3 6 | 10 12
    assert tokens == 21.0  # every answer token of the batch: the normaliser on both workers
    assert passes == 2  # 3 rows in micro-batches of 2


def test_sft_rows_drop_overlong_prompts_as_run_does_and_cut_answers_without_eos(tmp_path, tiny_policy, tiny_tokenizer):
    from rlsr_ray.config import load_config
    from rlsr_ray.sft import sft_rows

    long_prompt, long_answer = "word " * 300, "many words " * 200
    lines = [{"prompt": long_prompt, "response": "fine"}, {"prompt": "Hi?", "response": long_answer},
             {"prompt": "Why?", "response": "Because."}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = load_config("tiny", [f"--data.path={path}", "--data.heldout_size=0", "--data.max_prompt_tokens=64",
                               "--data.prompt_overflow=drop", "--sft.max_answer_tokens=16"])
    rows = sft_rows(cfg, tiny_policy)
    answers = rows.column("response_ids").to_pylist()
    eos = tiny_tokenizer.eos_token_id
    assert len(rows) == 2  # the overlong prompt is dropped, the rest kept and still paired
    by_len = sorted(answers, key=len)
    assert by_len[0][-1] == eos and tiny_tokenizer.decode(by_len[0][:-1]) == "Because."
    assert len(by_len[1]) == 16 and eos not in by_len[1]  # cut: no EOS, which would teach stopping mid-answer


def test_each_worker_drives_the_gpu_ray_train_gave_it(monkeypatch):
    """Ray Train's GPU workers on one node share CUDA_VISIBLE_DEVICES; get_device() names each
    one's own (CUDA cannot run here: a STAND-IN get_device answers as it would on a worker)."""
    import ray.train.torch
    import torch

    from actors.learner import cuda_index
    from rlsr_ray.sft import worker_device

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 5))
    assert worker_device("cuda") == "cuda:5" and cuda_index(worker_device("cuda")) == 5
    assert worker_device("cpu") == "cpu" and cuda_index("cpu") == 0 and cuda_index("cuda") == 0


def test_a_skipped_update_is_reported_with_its_reason_not_a_zero_norm():
    from rlsr_ray.sft import progress_line

    row = {"step": 2, "loss": 10.27, "tokens": 215.0, "skipped": 0.0, "grad_norm": 5.8, "step_s": 3.0}
    assert progress_line(row, 4, []) == "sft step 2/4: loss 10.2700 over 215 answer tokens, grad norm 5.800, 3.0s"
    skipped = {**row, "skipped": 1.0, "grad_norm": 0.0}
    line = progress_line(skipped, 4, ["non-finite gradient", "non-finite gradient"])
    assert line == "sft step 2/4: loss 10.2700 over 215 answer tokens, update skipped (non-finite gradient), 3.0s"


def test_a_final_policy_written_on_another_node_is_named_not_assumed(tmp_path):
    from rlsr_ray.sft import SftError, require_final

    with pytest.raises(SftError, match=r"SFT run sft-1 finished, but .*final is not on this machine.*run.output_dir"):
        require_final(tmp_path / "final", "sft-1")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    require_final(tmp_path / "final", "sft-1")


SFT_ARGS = ["tiny", "--ray.address=local", "--sft.batch_examples=16", "--sft.lr=1e-3", "--sft.save_every=1",
            "--train.micro_batch_size=1", "--pools.learner.num_actors=2", "--train.zero_stage=2"]


def _sft(out, *args):
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.sft", *SFT_ARGS, f"--run.output_dir={out}", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _steps(out) -> list[dict]:
    from rlsr_ray.tracking.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []


def _sft_with_a_worker_killed(out, log, *args) -> tuple[str, list]:
    """SIGKILL one Ray Train worker once Ray Train's controller has recorded a checkpoint (its
    snapshot file: a report it has not collected yet is lost with the group); Ray Train
    (sft.max_failures) restarts the group from the newest recorded checkpoint and the run finishes.
    Also gives the sockets the command's session listened on just before the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "rlsr_ray.sft", *SFT_ARGS, f"--run.output_dir={out}", *args],
                            env=own_ray_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("ray_train/*/checkpoint_manager_snapshot.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a worker could be killed: " + log.read_text()[-3000:]
        listeners = session_listeners(proc.pid)  # Ray, its agents, the controller and both workers
        found = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "ray::RayTrainWorker"], capture_output=True, text=True)
        victims = [int(x) for x in found.stdout.split()]
        assert victims, log.read_text()[-3000:]
        os.kill(victims[-1], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return log.read_text(), listeners


@pytest.mark.slow
def test_sft_on_two_workers_survives_a_killed_worker_resumes_exactly_and_writes_a_transformers_folder(tmp_path):
    """Two Ray Train workers (ZeRO-2), ten steps in one go; and eight steps with one worker
    SIGKILLed once a checkpoint is recorded (Ray Train restarts the group from it), then
    `run.resume=auto` on to ten (get_checkpoint on the same run name in a new invocation). The
    ZeRO-2 shards, RNG and data cursor come back both times, so the weights are bitwise equal and
    metrics.jsonl holds each step once with the same losses. Plain transformers loads the result,
    and its weights moved. (RLSR from an SFT policy: tests/test_compare.py.)"""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlsr_ray.modeling.models import resolve_policy

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # The ten steps in one go alongside the interrupted run, in a session (and local Ray) of its
    # own: the killed worker is looked up in the other run's session only.
    whole_log = tmp_path / "whole.log"
    with in_own_session(["-m", "rlsr_ray.sft", *SFT_ARGS, f"--run.output_dir={whole}", "--sft.steps=10"],
                        whole_log) as one_go:
        log, listeners = _sft_with_a_worker_killed(parts, tmp_path / "killed.log", "--sft.steps=8")
        assert one_go.wait(timeout=600) == 0, whole_log.read_text()[-3000:]
    text = whole_log.read_text()
    # Progress: one line per step, once each; no Ray Train helper noise on the Ray started here.
    assert [int(m) for m in re.findall(r"sft step (\d+)/10: loss", text)] == list(range(1, 11)), text[-3000:]
    assert "State API may be temporarily unavailable" not in text, text[-3000:]
    assert "Reporting training result" not in text, text[-3000:]  # Ray Train's own line for every report
    tuned = AutoModelForCausalLM.from_pretrained(whole / "final", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_policy("tiny-random", "~/.cache/rlsr_ray"),
                                                dtype=torch.float32).state_dict()
    moved = max(float((tuned[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-4, moved

    assert re.search(r"resumed from step [1-7]\b", log), log[-3000:]
    # The local Ray this command started (after importing Ray Train) listens on loopback only.
    assert len(listeners) >= 5, listeners
    assert [(a, pid) for a, pid in listeners if a not in LOOPBACK] == [], log[-3000:]
    assert [r["step"] for r in _steps(parts)] == list(range(1, 9))
    done = _sft(parts, "--sft.steps=10", "--run.resume=auto")
    assert "resumed from step 8" in done.stdout + done.stderr
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(parts / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert [r["step"] for r in _steps(parts)] == list(range(1, 11))
    assert [r["loss"] for r in _steps(parts)] == [r["loss"] for r in _steps(whole)]
    assert len(list((parts / "ray_train").iterdir())) == 1  # one Ray Train run, gone on from


@pytest.mark.parametrize("uri", [False, True])
def test_resume_auto_picks_the_newest_run_that_reported_a_checkpoint(tmp_path, uri):
    """run.resume=auto lists the storage path through pyarrow (a local path or a URI) and skips
    runs that never reported a checkpoint; a fresh run gets a name of its own."""
    from rlsr_ray.config import ConfigError, load_config
    from rlsr_ray.sft import train_run_name

    for name, reported in [("sft-20261101-000000-000", True), ("sft-20261102-000000-000", True),
                           ("sft-20261103-000000-000", False)]:
        (tmp_path / name).mkdir()
        if reported:
            (tmp_path / name / "checkpoint_manager_snapshot.json").write_text("{}")
    storage = f"file://{tmp_path}" if uri else str(tmp_path)
    cfg = load_config("tiny", ["--run.resume=auto"])
    assert train_run_name(cfg, storage) == "sft-20261102-000000-000"
    fresh = train_run_name(load_config("tiny", []), storage)
    assert fresh.startswith("sft-") and not (tmp_path / fresh).exists()
    assert train_run_name(load_config("tiny", ["--run.resume=sft-20261101-000000-000"]), storage) == \
        "sft-20261101-000000-000"
    with pytest.raises(ConfigError, match="no SFT run named 'nope'"):
        train_run_name(load_config("tiny", ["--run.resume=nope"]), storage)


def test_on_a_local_ray_sft_runs_without_the_placement_group_cleaner():
    """The cleaner asks the State API, absent on the local Ray (no dashboard), every second and
    holds the end of the run for its last ask; on a cluster the run joined it stays. Either way
    Ray Train sets up no torch process group (its TCP store would listen on every interface): the
    workers meet at the learner's own rendezvous (sockets read in the test above)."""
    from ray.train import BackendConfig, RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from rlsr_ray.sft import trainer

    def built(local: bool):
        return trainer(local, lambda job: None, scaling_config=ScalingConfig(num_workers=1),
                       run_config=RunConfig(name="x", storage_path="/tmp/rlsr_ray_unused"))

    joined, local = ([type(c).__name__ for c in built(x)._create_default_callbacks()] for x in (False, True))
    assert PlacementGroupCleanerCallback.__name__ in joined
    assert local == [k for k in joined if k != PlacementGroupCleanerCallback.__name__]
    assert type(built(True).backend_config) is BackendConfig  # not TorchConfig


@pytest.mark.slow
def test_sft_with_lora_writes_an_adapter_peft_loads_and_a_merged_folder(tmp_path):
    """Two workers (ZeRO-2) train rank-4 adapters for three steps: final/ is a PEFT adapter folder
    of the base, final/merged a plain transformers folder, and the two compute the same policy,
    which is not the base's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlsr_ray.modeling.models import resolve_policy

    out = tmp_path / "lora"
    done = _sft(out, "--sft.steps=3", "--train.lora.enabled=true", "--train.lora.rank=4")
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["merged_model"] == str(out / "final" / "merged"), done.stdout[-2000:]
    base_path = resolve_policy("tiny-random", "~/.cache/rlsr_ray")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out / "final"))
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.no_grad():
        a, m, b = adapted(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(a, m, atol=1e-4)  # float32 rounding of the merge's sum, logits of order 1
    assert (a - b).abs().max() > 1e-4  # the adapters learned something
    assert not list((out / "final").glob("model*.safetensors"))  # the base is not copied
