"""Bad input through the real entry point: exit code 2, one line naming file/row/field or key,
and nothing written to the output dir. Runs `rlsr_ray.driver.run.main` in-process (no Ray is started:
every check happens before)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsr_ray.driver.run import main

GOOD = {"prompt": "What is 2 + 2?", "response": "2 + 2 is 4."}


def jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


PADDING = [GOOD] * 10  # enough rows that the held-out split (8 in tiny) leaves training data

CONFIG_CASES = [
    (["--run.stepz=1"], "unknown config key 'run.stepz'"),
    (["--nosuch.x=1"], "unknown config key 'nosuch'"),
    (["--run.steps=abc"], "run.steps: expected an integer"),
    (["--rollout.backend=sglang"], "rollout.backend: 'sglang' is not allowed"),
    (["--rollout.top_p=0"], "rollout.top_p"),
    (["--train.lr=-1"], "train.lr"),
    (["--algo.clip_eps=1.5"], "algo.clip_eps"),
    (["--run.keep_checkpoints=-1"], "run.keep_checkpoints"),
    (["--train.zero_stage=5"], "train.zero_stage"),
    (["--rollout.samples_per_prompt=0"], "rollout.samples_per_prompt"),
    (["--pools.learner.num_actors=2", "--rollout.samples_per_prompt=3", "--train.mini_batch_prompts=1",
      "--train.prompts_per_step=1"], "divide evenly over 2 learners"),
    (["run.steps=3"], "bad argument"),
    (["--pools.reward.device=tpu"], "pools.reward.device: 'tpu' is not allowed"),
    (["--pools.learner.num_actors=2", "--pools.learner.min_actors=3"],
     "pools.learner.min_actors: 3 is out of range; must be in [1, pools.learner.num_actors=2]"),
    (["--pools.rollout.num_actors=2", "--pools.rollout.min_actors=3"],
     "pools.rollout.min_actors: 3 is out of range; must be in [1, pools.rollout.num_actors=2]"),
    (["--pools.reward.num_actors=2", "--pools.reward.max_actors=1"],
     "pools.reward.max_actors: 1 is out of range; must be >= pools.reward.num_actors=2"),
    (["--pools.reference.num_actors=0", "--pools.reference.max_actors=2"],
     "pools.reference.num_actors: 0 is out of range; a pool with min_actors/max_actors runs in Ray actors"),
    (["--pools.learner.num_actors=2", "--pools.learner.max_actors=1"],
     "pools.learner.max_actors: 1 is out of range; must be >= pools.learner.num_actors=2"),
    (["--pools.learner.num_actors=2", "--pools.learner.max_actors=3"],
     "pools.learner.max_actors: 3 is out of range; no larger learner group splits a mini-batch"),
    (["--pools.learner.num_actors=3", "--pools.learner.min_actors=2", "--rollout.samples_per_prompt=3",
      "--train.mini_batch_prompts=1", "--train.prompts_per_step=2"], "no smaller learner group splits a mini-batch"),
]

DATA_CASES = [
    ("d.jsonl", jsonl([GOOD, b'{"prompt": "x", "response": '] + PADDING), "d.jsonl:2: malformed JSON"),
    ("d.jsonl", jsonl(PADDING + [{"prompt": "x"}]), "d.jsonl:11: missing field 'response'"),
    ("d.jsonl", jsonl([{"prompt": "x", "response": ""}] + PADDING), "d.jsonl:1: field 'response' is empty"),
    ("d.jsonl", jsonl([{"prompt": 7, "response": "y"}]), "d.jsonl:1: field 'prompt' must be a string"),
    ("d.jsonl", jsonl([GOOD, GOOD, b'{"prompt": "\xff", "response": "y"}']), "d.jsonl:3: not valid UTF-8"),
    ("d.jsonl", b"\n\n", "the dataset is empty"),
    ("d.jsonl", jsonl([[1, 2]]), "d.jsonl:1: expected a JSON object"),
    ("d.jsonl", jsonl([{"question": "q", "answer": "a"}]), "d.jsonl:1: unrecognised row"),
    ("d.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), "d.jsonl:1: field 'messages' has no "),
    ("d.jsonl", jsonl([{"messages": [{"role": "user", "content": 3}]}]), "d.jsonl:1: messages[0]"),
    ("d.jsonl", jsonl([{"instruction": "do", "output": None}]), "d.jsonl:1: missing field 'output'"),
    ("d.csv", b"a,b\n", "unknown data format '.csv'"),
    ("d.parquet", b"not parquet at all", "cannot read Parquet"),
    ("d.jsonl", jsonl(PADDING[:3]), "data.heldout_size=8 leaves no training data"),
]


def run_main(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("rlsr_ray: error:")]
    return code, errors, err


@pytest.mark.parametrize("args, fragment", CONFIG_CASES)
def test_bad_config(args, fragment, tmp_path, capsys):
    out = tmp_path / "out"
    code, errors, _ = run_main(["tiny", f"--run.output_dir={out}", *args], capsys)
    assert code == 2 and len(errors) == 1 and fragment in errors[0], errors
    assert not out.exists()


def test_unknown_preset(tmp_path, capsys):
    code, errors, _ = run_main(["nopreset"], capsys)
    assert code == 2 and "unknown preset 'nopreset'" in errors[0]


@pytest.mark.parametrize("name, content, fragment", DATA_CASES)
def test_bad_data(name, content, fragment, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    code, errors, _ = run_main(["tiny", f"--run.output_dir={out}", f"--data.path={path}"], capsys)
    assert code == 2 and len(errors) == 1 and fragment in errors[0], errors
    if ":" in fragment.split()[0]:
        assert errors[0].startswith(f"rlsr_ray: error: {path}:")  # names the file and the row
    assert not out.exists()


def test_missing_data_file(tmp_path, capsys):
    code, errors, _ = run_main(["tiny", f"--data.path={tmp_path / 'none.jsonl'}"], capsys)
    assert code == 2 and errors == [f"rlsr_ray: error: {tmp_path / 'none.jsonl'}: no such data file"]


def test_every_prompt_too_long(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(PADDING * 2))
    code, errors, _ = run_main(["tiny", f"--data.path={path}", "--data.max_prompt_tokens=4",
                                f"--run.output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and "longer than data.max_prompt_tokens=4" in errors[0]


@pytest.mark.parametrize("arg, fragment", [
    ("--model.policy=/no/such/model", "model.policy: /no/such/model: no such folder"),
    ("--model.reward_model=/no/such/embedder", "model.reward_model: /no/such/embedder: no such folder"),
])
def test_missing_model_path(arg, fragment, tmp_path, capsys):
    code, errors, _ = run_main(["tiny", arg, f"--run.output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and errors == [f"rlsr_ray: error: {fragment}"]
    assert not (tmp_path / "o").exists()


def test_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code, errors, _ = run_main(["tiny", f"--model.policy={tmp_path / 'm'}"], capsys)
    assert code == 2 and "neither an HF model folder (no config.json) nor a PEFT adapter folder" in errors[0]


def _checkpoint_dir(tmp_path, state_text: str | None):
    d = tmp_path / "out" / "checkpoints" / "step_2"
    d.mkdir(parents=True)
    if state_text is not None:
        (d / "trainer_state.json").write_text(state_text)
    return d


@pytest.mark.parametrize("state_text, fragment", [
    (None, "not a complete checkpoint"),
    ("{broken", "corrupt"),
    (json.dumps({"format": 2, "step": 2, "policy_version": 2, "cursor": {}, "reference_policy": "x",
                 "optimizer": {"zero_stage": 0, "shards": 1}}), "partial checkpoint"),
])
def test_bad_checkpoint(state_text, fragment, tmp_path, capsys):
    d = _checkpoint_dir(tmp_path, state_text)
    code, errors, _ = run_main(["tiny", f"--run.output_dir={tmp_path / 'out'}", f"--run.resume={d}"], capsys)
    assert code == 2 and len(errors) == 1 and fragment in errors[0] and str(d) in errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]  # nothing new written


def _whole_checkpoint(tmp_path, reference: str, layout: dict):
    from rlsr_ray import checkpoint

    d = _checkpoint_dir(tmp_path, None)
    names = ["config.json", "model.safetensors", "rng.safetensors", "rng.json"]
    names += [f"{n}.{e}" for n in checkpoint.optimizer_names(layout) for e in ("safetensors", "json")]
    for name in names:
        (d / name).write_text("{}")
    checkpoint.write_state(d, {"step": 2, "policy_version": 2, "cursor": {"epoch": 0, "position": 8},
                               "reference_policy": reference, "optimizer": layout})
    return d


def test_checkpoint_of_another_reference(tmp_path, capsys):
    d = _whole_checkpoint(tmp_path, "/elsewhere/model", {"zero_stage": 0, "shards": 1})
    code, errors, _ = run_main(["tiny", f"--run.output_dir={tmp_path / 'out'}", f"--run.resume={d}"], capsys)
    assert code == 2 and len(errors) == 1 and "trained against reference '/elsewhere/model'" in errors[0]


def test_checkpoint_of_zero_state_into_zero_0(tiny_policy, tmp_path, capsys):
    """ZeRO >= 1 state loads at any stage >= 1 and any number of learners, but not into ZeRO-0."""
    d = _whole_checkpoint(tmp_path, tiny_policy, {"zero_stage": 2, "shards": 2})
    code, errors, _ = run_main(["tiny", f"--run.output_dir={tmp_path / 'out'}", f"--run.resume={d}",
                                f"--model.cache_dir={os.path.dirname(tiny_policy)}"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "optimizer state is ZeRO-2, but this run has train.zero_stage=0; ZeRO-0 state resumes" in errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]  # nothing new written


def test_missing_checkpoint_folder(tmp_path, capsys):
    code, errors, _ = run_main(["tiny", f"--run.output_dir={tmp_path / 'o'}", f"--run.resume={tmp_path / 'x'}"],
                               capsys)
    assert code == 2 and "no such checkpoint folder" in errors[0]


def test_parquet_wrong_types(tmp_path, capsys):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 10, "response": [1] * 10}), path)
    code, errors, _ = run_main(["tiny", f"--data.path={path}"], capsys)
    assert code == 2 and errors == [f"rlsr_ray: error: {path}:1: field 'response' must be a string, got int"]
