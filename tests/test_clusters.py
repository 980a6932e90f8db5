"""Every cluster file validates against the schema shipped inside the installed ray package, and
the GPU presets ask only for resources that some node type of their cluster carries."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from rlsr_ray.config import load_config
from rlsr_ray.plan.resources import ROLES, bundle

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
PRESET_CLUSTER = {"gpu_a100": "a100.yaml", "gpu_hetero": "heterogeneous.yaml", "paper_qwen7b": "p5.yaml",
                  "paper_llama8b": "p5.yaml", "paper_qwen32b": "p5.yaml"}


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_file_matches_ray_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


def test_schema_catches_a_typo():
    cfg = yaml.safe_load((CLUSTERS / "a100.yaml").read_text())
    cfg["idle_timeout_minuts"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, SCHEMA)


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_no_public_dashboard(path):
    text = path.read_text()
    assert "--dashboard-host=0.0.0.0" not in text
    for cmd in yaml.safe_load(text)["head_start_ray_commands"]:
        if "ray start --head" in cmd:
            assert "--dashboard-host=127.0.0.1" in cmd


@pytest.mark.parametrize("preset, cluster", sorted(PRESET_CLUSTER.items()))
def test_gpu_preset_fits_its_cluster(preset, cluster):
    cfg = load_config(preset)
    nodes = yaml.safe_load((CLUSTERS / cluster).read_text())["available_node_types"]
    for role in ROLES:
        need = bundle(getattr(cfg.pools, role))
        fits = [name for name, n in nodes.items()
                if all(n.get("resources", {}).get(k, 0) >= v for k, v in need.items())]
        assert fits, f"{preset}: pools.{role} asks {need}, no node type of {cluster} carries it"


@pytest.mark.parametrize("preset, cluster", sorted(PRESET_CLUSTER.items()))
def test_every_pool_at_its_max_actors_fits_the_cluster_at_its_max_workers(preset, cluster):
    """The elastic pools' bounds and the cluster's node counts agree: what the run asks the
    autoscaler for (every pool at max_actors) is there when every node type is at max_workers,
    packing each pool's actors onto the node types that carry them, pool by pool."""
    from rlsr_ray.config.pool_sizes import bounds

    cfg = load_config(preset)
    spec = yaml.safe_load((CLUSTERS / cluster).read_text())
    free = [dict(n.get("resources", {})) for n in spec["available_node_types"].values()
            for _ in range(n.get("max_workers", 0))]
    for role in ("learner", "rollout", "reference", "reward"):  # the largest first
        p = getattr(cfg.pools, role)
        need = bundle(p)
        for _ in range(p.num_actors if role == "learner" else bounds(p)[1]):
            node = next((n for n in free if all(n.get(k, 0) >= v - 1e-9 for k, v in need.items())), None)
            assert node is not None, f"{preset}: pools.{role} at its largest does not fit {cluster} at max_workers"
            for k, v in need.items():
                if not k.startswith("accelerator_type:"):  # a label, not a count
                    node[k] -= v
    assert any(bounds(getattr(cfg.pools, r)) != (getattr(cfg.pools, r).num_actors,) * 2
               for r in ("rollout", "reward", "reference")), f"{preset}: no elastic pool"


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_ssh_is_the_only_inbound_rule_and_not_open_to_the_world(path):
    provider = yaml.safe_load(path.read_text())["provider"]
    rules = provider["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(rng["CidrIp"] != "0.0.0.0/0" for r in rules for rng in r["IpRanges"])
