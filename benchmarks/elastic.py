"""What nodes leaving and joining cost an elastic run, against a run without events and against
restarting the job from its checkpoint, and what that means per 1,000 samples on spot nodes.

On Ray's multi-node test cluster (a head plus worker raylets on this machine, all on 127.0.0.1):
two rollout nodes and two learner nodes, each holding one actor of its pool (custom resources
`rollout_slot` / `learner_slot`); reward and reference actors on the head. Three runs of the same
preset and steps:

- quiet: no event; samples/s per step.
- elastic: a rollout node removed after step `--rollout-leaves`, a rollout node added back after
  step `--rollout-returns`, and a learner node removed after step `--learner-leaves` (ZeRO-2, 2
  learners -> 1, from the newest checkpoint, `run.save_every`). Per event: seconds lost (a lost
  rollout actor's calls: how long they had run, `seconds_lost`; a learner loss: the wall time from
  the node's removal to training going on, plus the steps done again, and how long the driver
  took to notice), and samples/s before, during (one rollout actor) and after.
- restart: what the alternative costs: the quiet run's job started again with
  `--run.resume=auto` (a new driver process, pools, checkpoint restore) up to its first step.

The cost model: a node is preempted at `rate` per node-hour; each event costs the elastic run its
measured seconds lost and the restarting run the restart plus, on average, half the steps between
checkpoints done again. Cost per 1,000 samples = node-hours for 1,000 samples (with the expected
events' seconds) x the spot price (a fraction of on-demand, 1.0 = on-demand).

    python benchmarks/elastic.py --out benchmarks/results/elastic_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return []


class Runner:
    def __init__(self, cluster, args):
        self.cluster, self.args = cluster, args

    def start(self, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
        a = self.args
        cmd = [sys.executable, "-m", "rlsr_ray.run", a.preset, f"--ray.address={self.cluster.address}",
               f"--run.steps={a.steps}", f"--run.save_every={a.save_every}", "--run.progress=false",
               "--run.eval_before_after=false", f"--run.output_dir={out}", "--train.zero_stage=2",
               "--pools.rollout.num_actors=2", "--pools.rollout.min_actors=1", "--pools.rollout.max_actors=2",
               "--pools.rollout.resources={rollout_slot: 1}", "--pools.learner.num_actors=2",
               "--pools.learner.min_actors=1", "--pools.learner.max_restarts=1", "--pools.learner.shrink_after_s=5",
               "--pools.learner.resources={learner_slot: 1}",
               # A core per actor: placed by their slots, one torch thread each (no oversubscription).
               "--pools.rollout.num_cpus=0", "--pools.rollout.torch_threads=1", "--pools.learner.num_cpus=0",
               "--pools.learner.torch_threads=1", *extra]
        log = out.parent / f"{out.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return proc, log

    @staticmethod
    def finish(proc: subprocess.Popen, log: Path) -> None:
        if proc.wait() != 0:
            raise SystemExit(f"run failed:\n{log.read_text()[-3000:]}")

    @staticmethod
    def wait_step(proc: subprocess.Popen, out: Path, step: int, log: Path) -> None:
        while not any(r["step"] >= step for r in _rows(out / "metrics.jsonl")):
            if proc.poll() is not None:
                raise SystemExit(f"run ended before step {step}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def _rate(rows: list[dict]) -> float | None:
    return sum(r["samples"] for r in rows) / sum(r["step_s"] for r in rows) if rows else None


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def learner_event_s(text: str, step_s: float, removed_at: float) -> tuple[float, float, int]:
    """(seconds lost: from the node's removal to training going on, plus the steps done again;
    seconds from the removal until the driver noticed; how many steps were done again) from the
    driver's log: the step that noticed the loss, and the checkpoint step it restored."""
    failed = re.search(r"^(\S+ \S+) rlsr_ray WARNING step (\d+): pool learner.*rebuilding", text, re.M)
    goes_on = re.search(r"^(\S+ \S+) rlsr_ray WARNING learners restored to step (\d+)", text, re.M)
    if not failed or not goes_on:
        raise SystemExit("no learner recovery in the log")
    redo = int(failed.group(2)) - 1 - int(goes_on.group(2))  # complete steps after the checkpoint
    return _stamp(goes_on.group(0)) - removed_at + redo * step_s, _stamp(failed.group(0)) - removed_at, redo


def cost_table(quiet_rate: float, step_s: float, elastic_lost: dict[str, float],
               restart_s: float, save_every: int, nodes: int) -> list[dict]:
    out = []
    per_event = {"elastic": sum(elastic_lost.values()) / len(elastic_lost),
                 "restart": restart_s + (save_every / 2) * step_s}
    for rate in (0.05, 0.2, 1.0):  # preemptions per node-hour
        for price in (1.0, 0.5, 0.3):  # spot price as a fraction of on-demand
            hours = 1000 / quiet_rate / 3600  # wall hours for 1,000 samples without events
            row = {"preemptions_per_node_hour": rate, "price_fraction": price,
                   "on_demand_cost_per_1k": round(nodes * hours, 5)}  # no events, full price
            for kind, lost_s in per_event.items():
                # events during those hours on `nodes` nodes, each adding its lost seconds
                wall_h = hours / max(1e-9, 1 - rate * nodes * lost_s / 3600)
                row[f"{kind}_node_hours_per_1k"] = round(nodes * wall_h, 5)
                row[f"{kind}_cost_per_1k"] = round(nodes * wall_h * price, 5)
            out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--rollout-leaves", type=int, default=3)
    ap.add_argument("--rollout-returns", type=int, default=6)
    ap.add_argument("--learner-leaves", type=int, default=9)
    ap.add_argument("--out", default="elastic.json")
    args = ap.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    import torch

    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    report: dict = {"preset": args.preset, "steps": args.steps, "save_every": args.save_every,
                    "cpu": f"{os.cpu_count()} cores, get_cpu_capability()={torch.backends.cpu.get_cpu_capability()}"}
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=4, node_ip_address="127.0.0.1",
                                                              include_dashboard=False, _system_config=system))
        try:
            add = {"rollout": lambda: c.add_node(num_cpus=1, resources={"rollout_slot": 1}, node_ip_address="127.0.0.1"),
                   "learner": lambda: c.add_node(num_cpus=1, resources={"learner_slot": 1}, node_ip_address="127.0.0.1")}
            nodes = {role: [make() for _ in range(2)] for role, make in add.items()}
            c.wait_for_nodes()
            runner = Runner(c, args)

            quiet_out = Path(tmp) / "quiet"
            proc, log = runner.start(quiet_out)
            runner.finish(proc, log)
            quiet = _rows(quiet_out / "metrics.jsonl")
            steady = quiet[1:]  # the first step carries warm-up
            step_s = sum(r["step_s"] for r in steady) / len(steady)
            report["quiet"] = {"samples_per_s": _rate(steady), "step_s": step_s,
                               "setup_s": json.loads((quiet_out / "summary.json").read_text())["setup_s"]}
            print("quiet", json.dumps(report["quiet"]), flush=True)

            # The alternative: the job restarted from its newest checkpoint, up to its first step.
            t0 = time.monotonic()
            proc, log = runner.start(quiet_out, "--run.resume=auto", f"--run.steps={args.steps + 1}")
            runner.wait_step(proc, quiet_out, args.steps + 1, log)
            until_row = time.monotonic() - t0
            first_step_s = _rows(quiet_out / "metrics.jsonl")[-1]["step_s"]
            runner.finish(proc, log)
            report["restart"] = {"restart_s": until_row - first_step_s}
            print("restart", json.dumps(report["restart"]), flush=True)

            el_out = Path(tmp) / "elastic"
            proc, log = runner.start(el_out)
            runner.wait_step(proc, el_out, args.rollout_leaves, log)
            c.remove_node(nodes["rollout"][1], allow_graceful=False)
            runner.wait_step(proc, el_out, args.rollout_returns, log)
            add["rollout"]()
            runner.wait_step(proc, el_out, args.learner_leaves, log)
            removed_at = time.time()
            c.remove_node(nodes["learner"][1], allow_graceful=False)
            runner.finish(proc, log)
            rows = _rows(el_out / "metrics.jsonl")
            text = log.read_text()
            one = [r for r in rows if r["actors_rollout"] == 1]
            before = [r for r in rows[1:] if r["step"] <= args.rollout_leaves]
            back = next(r["step"] for r in rows if r["step"] > args.rollout_leaves and r["actors_rollout"] == 2)
            after = [r for r in rows if r["step"] > back and r["step"] <= args.learner_leaves
                     and r["membership_events"] == 0]
            learner_s, noticed_s, redo = learner_event_s(text, step_s, removed_at)
            rollout_lost = sum(r["seconds_lost"] for r in rows if r["actors_rollout"] == 1 or r["membership_events"])
            report["elastic"] = {
                "samples_per_s_before": _rate(before), "samples_per_s_one_rollout_actor": _rate(one),
                "samples_per_s_after_return": _rate(after),
                "samples_per_s_one_learner": _rate([r for r in rows if r["learners"] == 1]),
                "rollout_loss_s": rollout_lost, "rollout_calls_resent": sum(r["calls_resent"] for r in rows),
                "learner_loss_s": learner_s, "learner_loss_noticed_after_s": noticed_s,
                "learner_steps_redone": redo,
                "actors_rollout": [r["actors_rollout"] for r in rows], "learners": [r["learners"] for r in rows],
                "samples": sum(r["samples"] for r in rows), "samples_expected": sum(r["samples"] for r in quiet),
            }
            print("elastic", json.dumps(report["elastic"]), flush=True)
        finally:
            c.shutdown()
    e = report["elastic"]
    report["cost_model"] = cost_table(report["quiet"]["samples_per_s"], step_s,
                                      {"rollout": e["rollout_loss_s"], "learner": e["learner_loss_s"]},
                                      report["restart"]["restart_s"], args.save_every, nodes=4)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'rate/node-h':>11s} {'price':>6s} {'on-demand':>10s} {'elastic':>10s} {'restart':>10s}  "
          "(node-hours x price per 1,000 samples)")
    for r in report["cost_model"]:
        print(f"{r['preemptions_per_node_hour']:11.2f} {r['price_fraction']:6.2f} {r['on_demand_cost_per_1k']:10.5f} "
              f"{r['elastic_cost_per_1k']:10.5f} {r['restart_cost_per_1k']:10.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
