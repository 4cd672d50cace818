"""Ray itself, before any sweep: start it in-process or join a cluster (bounded), and say what it holds.

`sweep` (Ray Tune), `launch`'s resources and shared-storage checks and `prepare_ray` (Ray Data) all
reach Ray through here, so a cluster that does not answer is refused the same way everywhere
(`ClusterUnreachable`, exit 2, within `CONNECT_TIMEOUT_S`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings

# Quieter Ray: ditsweep prints its own progress instead of Tune's tables. Set before Ray is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "60")
# One line per errored attempt (the sink's), naming the file with the traceback, instead of Tune's traceback.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")

import ray  # noqa: E402

from orchestrator.interrupt import terminate_as_interrupt  # noqa: E402
from orchestrator.resources import Cluster, NodeType  # noqa: E402
from orchestrator.spec import SpecError  # noqa: E402

CONNECT_TIMEOUT_S = 30.0  # the longest `--address` may take to answer before the sweep is refused
_QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "ray.serve", "filelock")


class ClusterUnreachable(SpecError):
    """`--address` names a Ray cluster that does not answer: refused before anything is written."""


def quiet_ray() -> None:
    """Ray's own INFO and warning lines never reach a ditsweep user: progress is ditsweep's."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="ray")


def init_ray(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    if ray.is_initialized():
        return
    quiet_ray()
    if address:
        join_cluster(address, timeout_s)
    else:
        ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    terminate_as_interrupt()  # ours again: ray.init's SIGTERM handlers dump a native stack and abort


def alive_node_count(address: str) -> int:
    """How many nodes of the cluster at `address` are alive (connects this process to it)."""
    init_ray(address)
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def gcs_address(address: str) -> tuple[str, int]:
    """(host, port) that must answer for `address`: `auto` is $RAY_ADDRESS or this machine's running
    head; ray://host[:10001] is the Ray Client server; host:port is the GCS (default port 6379)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or _local_head_address() or "127.0.0.1:6379"
    default_port = 10001 if address.startswith("ray://") else 6379
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    try:
        return host.strip("[]") or "127.0.0.1", int(port) if port else default_port
    except ValueError:
        raise ClusterUnreachable(f"--address {address[:200]!r}: the port {port[:20]!r} is not a number") from None


def _local_head_address() -> str | None:
    """The head `ray start` left on this machine (Ray writes its address to a file in its temp folder)."""
    try:
        from ray._private.services import find_bootstrap_address

        found = find_bootstrap_address(None)
        return next(iter(found), None) if found else None
    except Exception:  # noqa: BLE001 - Ray's private helper moved: fall back to the default port
        return None


def join_cluster(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Join the cluster at `address`, or raise ClusterUnreachable within about `timeout_s` seconds.

    Ray's own connection retries take minutes for an address that does not answer, so the port is tried
    first (a few seconds), then `ray.init` runs in a thread this process waits on for at most `timeout_s`.
    """
    host, port = gcs_address(address)
    try:
        socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
    except OSError as err:
        raise ClusterUnreachable(
            f"--address {address[:200]!r}: no Ray cluster answers at {host}:{port} ({err.strerror or err}); "
            "start it (ray start --head) or pass the address the cluster prints"
        ) from None
    error: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True)
        except BaseException as err:  # noqa: BLE001 - reported by the waiting thread
            error.append(err)

    thread = threading.Thread(target=join, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ClusterUnreachable(f"--address {address[:200]!r}: {host}:{port} answers, but Ray did not "
                                 f"connect within {timeout_s:.0f} s; is it a Ray head of the same Ray version?")
    if error:
        first = str(error[0]).strip().splitlines()[0][:300] if str(error[0]).strip() else type(error[0]).__name__
        raise ClusterUnreachable(f"--address {address[:200]!r}: Ray could not connect: {first}")


def describe_cluster() -> Cluster:
    """The joined cluster as `orchestrator.resources` sees it: the totals of its alive nodes, and the
    node types its autoscaler may add (none without an autoscaler)."""
    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    return Cluster(nodes=nodes, node_types=_autoscaler_node_types())


def _autoscaler_node_types() -> dict[str, NodeType]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler, or Ray's private API changed: current nodes only
        return {}
    if config is None:
        return {}
    types = {}
    for group in getattr(config, "node_group_configs", []):
        max_count = int(getattr(group, "max_count", 0))
        types[group.name] = NodeType(dict(group.resources), max_workers=10**6 if max_count < 0 else max_count)
    return types
