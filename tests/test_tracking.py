"""run.report_to: the rows, config, checkpoints and outputs the driver hands its trackers, read back
from wandb's offline files (with wandb's own reader) and from an MLflow SQLite store (with
MlflowClient). The commands themselves report through them in tests/test_compare.py."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsr_ray.tracking import TrackingError, check_backends, open_trackers
from rlsr_ray.tracking.tail import MetricsTail
from rlsr_ray.tracking.trackers import flat_params, numeric


def wandb_records(run_dir: Path) -> dict:
    """A wandb run folder's records through wandb's own reader (its .wandb transaction log):
    {"run": RunRecord, "history": [{key: value}], "summary": {key: value}, "artifacts": {name: [paths]},
    "exit": code}."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    [log] = run_dir.glob("run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(log))
    found: dict = {"history": [], "summary": {}, "artifacts": {}, "exit": None}
    while (data := store.scan_data()) is not None:
        r = pb.Record()
        r.ParseFromString(data)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            found["run"] = r.run
        elif kind == "history":
            found["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            found["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "artifact":
            found["artifacts"][r.artifact.name] = sorted(m.path for m in r.artifact.manifest.contents)
        elif kind == "exit":
            found["exit"] = r.exit.exit_code
    return found


def wandb_run_dir(output_dir: Path, run_id: str) -> Path:
    [found] = (output_dir / "wandb").glob(f"offline-run-*-{run_id}")
    return found


def newest_per_step(history: list[dict], key: str) -> dict[int, float]:
    """What a chart shows at each step: the last value logged there (a resumed run logs the steps
    it does again a second time)."""
    return {int(h["step"]): h[key] for h in history if key in h}


def mlflow_history(client, run_id: str, key: str) -> dict[int, float]:
    """The newest value at each step (MLflow keeps every logged value; ties go to the later timestamp)."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


def _rows(n: int, offset: float = 0.0) -> list[dict]:
    """Rows shaped as the driver's: reward terms, a membership event, a non-finite and a text value."""
    return [{"step": s, "loss": 0.5 / s + offset, "reward_mean": 0.1 * s + offset, "reward_similarity_mean": 0.2 * s,
             "kl": float("nan") if s == 1 else 0.01 * s, "membership_events": int(s == 2), "rollout_backend": "hf",
             "skipped": False} for s in range(1, n + 1)]


def test_rows_become_finite_numbers_and_the_config_flat_parameters():
    row = {"step": 3, "loss": 0.25, "kl": float("nan"), "skipped": True, "backend": "hf", "heldout": {"z": 2.0}}
    assert numeric(row) == {"loss": 0.25, "skipped": 1.0, "heldout/z": 2.0}  # the step is the x-axis
    assert flat_params({"train": {"lr": 1e-5, "lora": {"rank": 16}}, "run": {"report_to": ["wandb"]}}) == \
        {"train.lr": "1e-05", "train.lora.rank": "16", "run.report_to": '["wandb"]'}


def test_wandb_offline_and_mlflow_hold_every_row_and_a_resumed_run_goes_on_in_the_same_runs(tmp_path, monkeypatch):
    """Three steps, a checkpoint, the end; then the run resumed in the same folder does steps 2-4
    again with other numbers (as after a recovery): both back ends keep one run each, whose newest
    value at every step is the one the final metrics hold, with the config as its parameters."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    out.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = {"train": {"lr": 3e-5, "lora": {"rank": 16, "enabled": False}}, "run": {"steps": 4}}
    kw = dict(project="proj", name="arm-rlsr", group="cmp", mlflow_tracking_uri=uri, job_type="rlsr")

    first = open_trackers(["wandb", "mlflow"], out, config, resume=False, **kw)
    for row in _rows(3):
        first.log_row(row)
    first.log_checkpoint(2, str(out / "checkpoints" / "step_2"))
    first.close(failed=True)  # killed after step 3, its checkpoint at step 2
    ids = json.loads((out / "tracking.json").read_text())
    # wandb names a run's local folder by the second it starts: a resume within the same second
    # (only a test is that quick) would write into the first attempt's folder.
    time.sleep(1.0)
    again = open_trackers(["wandb", "mlflow"], out, config, resume=True, **kw)
    final = _rows(1) + _rows(4, offset=1.0)[1:]  # steps 2-4 done again from the checkpoint
    for row in final[1:]:
        again.log_row(row)
    again.log_checkpoint(4, str(out / "checkpoints" / "step_4"))
    (out / "summary.json").write_text(json.dumps({"steps": 4}))
    again.finish({"steps": 4, "heldout": {"delta_mean": 0.03}}, [out / "summary.json", out / "absent.json"])
    assert json.loads((out / "tracking.json").read_text()) == ids

    keys = ["loss", "reward_mean", "reward_similarity_mean", "kl", "membership_events", "skipped"]
    expect = {k: {r["step"]: float(r[k]) for r in final if math.isfinite(float(r[k]))} for k in keys}

    # wandb: one run folder per invocation, the same run id; the newer folder's steps win.
    folders = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(folders) == 2
    history = [h for f in folders for h in wandb_records(f)["history"]]
    for k in keys:
        assert newest_per_step(history, k) == pytest.approx(expect[k]), k
    last = wandb_records(folders[-1])
    assert (last["run"].display_name, last["run"].run_group, last["run"].job_type, last["run"].project) == \
        ("arm-rlsr", "cmp", "rlsr", "proj")
    run_config = {i.key: json.loads(i.value_json) for i in last["run"].config.update}
    assert run_config["train"] == config["train"] and run_config["run"] == config["run"]
    assert last["summary"]["checkpoint/latest"] == str(out / "checkpoints" / "step_4")
    assert last["summary"]["final/heldout/delta_mean"] == 0.03
    assert last["artifacts"] == {f"{ids['wandb']}-outputs": ["summary.json"]} and last["exit"] == 0
    assert wandb_records(folders[0])["exit"] == 1

    # MLflow: the arm is a child of the group's parent run; params are the flat config.
    client = MlflowClient(uri)
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "arm-rlsr" and run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "3e-05", "train.lora.rank": "16", "train.lora.enabled": "False",
                               "run.steps": "4"}
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "cmp"
    for k in keys:
        assert mlflow_history(client, ids["mlflow"], k) == pytest.approx(expect[k]), k
    assert run.data.tags["checkpoint.step_2"] == str(out / "checkpoints" / "step_2")
    assert run.data.tags["checkpoint.latest"] == str(out / "checkpoints" / "step_4")
    assert run.data.metrics["final/heldout/delta_mean"] == 0.03
    assert [a.path for a in client.list_artifacts(ids["mlflow"])] == ["summary.json"]
    # Its artifacts beside the database, not wherever the process happened to run.
    assert (tmp_path / "mlartifacts").is_dir()


def test_a_backend_not_installed_or_not_answering_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: its import raises ImportError
    with pytest.raises(TrackingError, match=r"^run.report_to: wandb is not installed \(pip install wandb"):
        check_backends(["tensorboard", "wandb"], None)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError) as e:
        check_backends(["mlflow"], f"http://127.0.0.1:{port}")
    assert str(e.value) == (f"run.report_to: the MLflow store http://127.0.0.1:{port} cannot be reached: "
                            "[Errno 111] Connection refused")


def test_an_unreachable_store_stops_the_run_before_anything_is_written(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rlsr_ray.run", "tiny", f"--run.output_dir={out}",
                           "--run.report_to=tensorboard,mlflow", f"--run.mlflow_tracking_uri=http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (f"rlsr_ray: error: run.report_to: the MLflow store "
                                                    f"http://127.0.0.1:{port} cannot be reached: "
                                                    "[Errno 111] Connection refused")
    assert not out.exists()


class _Rows:
    def __init__(self):
        self.rows: list[dict] = []

    def log_row(self, row):
        self.rows.append(row)


def test_the_tail_forwards_new_rows_and_the_rows_a_restart_writes_again(tmp_path):
    """SFT's worker writes metrics.jsonl; the driver forwards it. A worker group restarted from its
    step-1 checkpoint cuts the file back and writes steps 2-3 again: the changed rows go again."""
    path = tmp_path / "metrics.jsonl"
    got = _Rows()
    tail = MetricsTail(path, got)
    assert tail.poll() == 0  # no file yet
    line = lambda s, loss: json.dumps({"step": s, "loss": loss}) + "\n"  # noqa: E731
    path.write_text(line(1, 0.9) + line(2, 0.8) + '{"step": 3, "lo')  # the third line is being written
    assert tail.poll() == 2 and [r["step"] for r in got.rows] == [1, 2]
    path.write_text(line(1, 0.9) + line(2, 0.7) + line(3, 0.6))  # cut back to step 1, steps 2-3 again
    assert tail.poll() == 2 and [(r["step"], r["loss"]) for r in got.rows[2:]] == [(2, 0.7), (3, 0.6)]
    assert tail.poll() == 0
    resumed = MetricsTail(path, got, forwarded=path.read_text().split("\n")[:-1])  # run.resume: held already
    assert resumed.poll() == 0
