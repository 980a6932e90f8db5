"""The Ray a command runs on: a cluster it joins (RAY_ADDRESS, `ray job submit`, `ray start` on this
machine) or a local one it starts, bound to 127.0.0.1. Every command (run, sft, eval, compare)
connects through connect_ray; serve keeps to loopback through single_node_mode."""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

from actors.pool import WORKER_ENV
from rlsr_ray.config import Config

log = logging.getLogger("rlsr_ray")


def running_cluster_address() -> str | None:
    """The address `ray start` recorded on this machine, if its GCS still answers.

    Ray's own address="auto" trusts the record and hangs for minutes on a cluster that died
    without `ray stop`; a two-second TCP probe tells live from stale.
    """
    record = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip()
        host, _, port = address.rpartition(":")
        socket.create_connection((host, int(port)), timeout=2.0).close()
    except (OSError, ValueError):
        return None
    return address


_LOCAL_RAY = False  # the Ray this process is connected to is one connect_ray started


def connect_ray(cfg: Config) -> bool:
    """Join a cluster if one is reachable, else start a local one. Returns True if started here."""
    global _LOCAL_RAY
    from rlsr_ray.plan.resources import local_num_cpus

    address = found = None
    if cfg.ray.address != "local":
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        found = None if address else running_cluster_address()
    if not (address or found):
        single_node_mode()
    import ray

    if ray.is_initialized():
        return False
    if address or found:
        # A cluster found on this machine is joined as Ray's own address="auto" joins it (the
        # record is live: checked above), which takes up the token `ray start` wrote when token
        # auth is on; Ray leaves that to RAY_AUTH_MODE for an address given explicitly.
        ray.init(address=address or "auto", log_to_driver=True)
        _LOCAL_RAY = False
        log.info("joined the running Ray cluster at %s", address or found)
        return False
    env = dict(WORKER_ENV)
    if sys.platform == "linux":
        # Gloo binds its pairs to the address the host name resolves to, on some machines a
        # routable one; every rank of a local Ray is on this machine.
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    # Ray starts idle workers for the first driver to save a later task the start-up; with this
    # job's runtime environment no actor can take one (each gets a worker of its own), so on a small
    # machine they only take CPU from the actors starting beside them.
    ray.init(address="local", num_cpus=local_num_cpus(cfg), include_dashboard=False, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": env},
             _system_config={"prestart_worker_first_driver": False})
    _LOCAL_RAY = True
    log.info("started a local Ray instance with %d logical CPUs", local_num_cpus(cfg))
    return True


def on_local_ray() -> bool:
    """Whether this process is connected to a local Ray that connect_ray started (it goes away
    with the command), not to a cluster it joined."""
    import ray

    return _LOCAL_RAY and ray.is_initialized()


def single_node_mode() -> None:
    """Make a Ray started here listen on loopback only: no dashboard or job API, and no port on the
    machine's network addresses. ray.init replaces a requested 127.0.0.1 node address with the
    routable one unless Ray runs single-node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Ray's own
    processes read that variable when they start; this process read it when it first imported ray,
    which a command may have done already (rlsr_ray.sft imports Ray Train first), so the value it
    then took is set too: Ray looks it up at each call (ray._private.services.get_node_ip_address)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
