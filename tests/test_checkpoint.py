import json

import pytest
import torch

from rlsr_ray import checkpoint
from rlsr_ray.tracking.metrics import read_metrics, truncate_metrics


def test_optimizer_state_roundtrips_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    checkpoint.save_nested(opt.state_dict(), tmp_path, "optimizer")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    restored = checkpoint.load_nested(tmp_path, "optimizer")
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    fresh.load_state_dict(restored)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["state"][k][name], b["state"][k][name])


def test_unstorable_objects_are_refused():
    with pytest.raises(TypeError, match="cannot store object"):
        checkpoint.flatten({"x": object()}, {})


def _fake_checkpoint(root, step, complete=True):
    d = checkpoint.step_dir(root, step)
    d.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "rng.safetensors", "rng.json", "optimizer.safetensors",
                 "optimizer.json"):
        (d / name).write_text("{}")
    if complete:
        checkpoint.write_state(d, {"step": step, "policy_version": step, "cursor": {"epoch": 0, "position": 0},
                                   "reference_policy": "p", "optimizer": {"zero_stage": 0, "shards": 1}})
    return d


def _rewrite_state(d, **fields):
    state = json.loads((d / "trainer_state.json").read_text())
    (d / "trainer_state.json").write_text(json.dumps({**state, **fields}))


def test_optimizer_names_follow_the_zero_layout():
    assert checkpoint.optimizer_names(checkpoint.optimizer_layout(0, 4)) == ["optimizer"]
    assert checkpoint.optimizer_names(checkpoint.optimizer_layout(2, 2)) == ["optimizer_rank0", "optimizer_rank1"]


def test_storable_matches_flatten():
    assert checkpoint.storable({"a": [torch.ones(2), (1, "x", None)], 3: 1.5})
    assert not checkpoint.storable({"a": [object()]})
    with pytest.raises(TypeError):
        checkpoint.flatten({"a": [object()]}, {})


def test_latest_ignores_partial_and_temp_dirs_and_prune_keeps_newest(tmp_path):
    for s in (1, 2, 10):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 11, complete=False)
    (tmp_path / "checkpoints" / "step_12.tmp").mkdir()
    assert checkpoint.latest(tmp_path).name == "step_10"  # numeric order, not text order
    checkpoint.prune(tmp_path, keep=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_10", "step_11", "step_2"]  # the partial one is not counted, the temp dir is gone


def test_resolve_resume(tmp_path):
    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing there: fresh start
    d = _fake_checkpoint(tmp_path, 3)
    assert checkpoint.resolve_resume("auto", tmp_path) == d
    assert checkpoint.resolve_resume(str(d), tmp_path) == d
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint folder"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "trainer_state.json").unlink(), "not a complete checkpoint"),
    (lambda d: (d / "trainer_state.json").write_text("{not json"), "corrupt"),
    (lambda d: (d / "trainer_state.json").write_bytes(b"\xff\xfe"), "corrupt"),
    (lambda d: (d / "trainer_state.json").write_text(json.dumps({"format": 1, "step": 1})), "missing field"),
    (lambda d: (d / "model.safetensors").unlink(), "no model"),
    (lambda d: (d / "optimizer.json").unlink(), "optimizer.json is missing"),
    (lambda d: (d / "trainer_state.json").write_text(json.dumps(
        {"format": 99, "step": 1, "policy_version": 1, "cursor": {}, "reference_policy": "p", "optimizer": {}})),
     "format 99"),
    (lambda d: _rewrite_state(d, optimizer={"zero_stage": 2, "shards": 0}), "field 'optimizer' is malformed"),
    (lambda d: _rewrite_state(d, optimizer={"zero_stage": 2, "shards": 2}), "optimizer_rank0.safetensors is missing"),
])
def test_damaged_checkpoints_fail_with_one_line(tmp_path, damage, message):
    d = _fake_checkpoint(tmp_path, 1)
    damage(d)
    with pytest.raises(checkpoint.CheckpointError, match=message) as e:
        checkpoint.read_state(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_tensor_file_is_a_checkpoint_error(tmp_path):
    checkpoint.save_nested({"a": torch.ones(3)}, tmp_path, "rng")
    (tmp_path / "rng.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read rng state"):
        checkpoint.load_nested(tmp_path, "rng")


def test_truncate_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 6)))
    assert truncate_metrics(tmp_path, 3) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_latest_at_most(tmp_path):
    for s in (2, 5, 9):
        _fake_checkpoint(tmp_path, s)
    assert checkpoint.latest(tmp_path, at_most=6).name == "step_5"
    assert checkpoint.latest(tmp_path, at_most=1) is None
