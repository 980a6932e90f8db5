import socket

from rlsr_ray.driver.ray_session import running_cluster_address


def test_stale_cluster_record_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert running_cluster_address() is None  # no record at all
    (tmp_path / "ray").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead_port}")
    assert running_cluster_address() is None  # recorded, but nothing answers
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{live.getsockname()[1]}\n")
        assert running_cluster_address() == f"127.0.0.1:{live.getsockname()[1]}"


def test_weight_sync_auto_takes_the_group_on_cuda_and_the_object_store_on_cpu():
    from rlsr_ray.config import load_config
    from rlsr_ray.driver.pools import weight_route

    assert weight_route(load_config("tiny")) is None  # CPU pools: the object store
    assert weight_route(load_config("gpu_a100")).backend == "nccl"
    assert weight_route(load_config("tiny", ["--rollout.weight_sync=group"])).backend == "gloo"
    assert weight_route(load_config("gpu_a100", ["--rollout.weight_sync_backend=gloo"])).backend == "gloo"
    assert weight_route(load_config("gpu_a100", ["--rollout.weight_sync=object_store"])) is None
