"""Ray itself, before any sweep: start it in-process or join a cluster (bounded), say what it holds,
and end the Ray this process started.

`sweep` (Ray Tune), `launch`'s resources and shared-storage checks and `prepare_ray` (Ray Data) all
reach Ray through here, so a cluster that does not answer is refused the same way everywhere
(`ClusterUnreachable`, exit 2, within `CONNECT_TIMEOUT_S`).

An in-process Ray costs seconds to start (GCS, raylet and five Python helpers, on a laptop as on
two cores) and over a second to stop: `start_local_ray` starts it in a thread while `launch` goes on
with its own work, and the Ray this process started is ended at exit by killing its processes once
the driver has disconnected, instead of Ray's one-by-one graceful stop (benchmarks/RESULTS.md §10).
"""

from __future__ import annotations

import atexit
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
# The longest a sweep waits for the in-process Ray started in the background (Ray's own node start-up
# wait is 30 s; this bounds the rest of ray.init).
LOCAL_START_TIMEOUT_S = 120.0
ENDING_TIMEOUT_S = 10.0  # the longest the exit waits for the in-process Ray's end begun meanwhile
_QUIET_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "ray.serve", "filelock")


class ClusterUnreachable(SpecError):
    """`--address` names a Ray cluster that does not answer: refused before anything is written."""


def quiet_ray() -> None:
    """Ray's own INFO and warning lines never reach a ditsweep user: progress is ditsweep's."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="ray")


def init_ray(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Join the cluster at `address`, or have an in-process Ray: the one `start_local_ray` is starting
    (waited for, at most LOCAL_START_TIMEOUT_S), else one started now."""
    _finish_ending()
    if ray.is_initialized() and "thread" not in _LOCAL:
        return
    quiet_ray()
    if address:
        join_cluster(address, timeout_s)
    else:
        if "thread" not in _LOCAL:
            _start_local()
        _LOCAL["thread"].done.wait(LOCAL_START_TIMEOUT_S)
        thread = _LOCAL.pop("thread")
        if not thread.done.is_set():
            raise RuntimeError(f"the in-process Ray did not start within {LOCAL_START_TIMEOUT_S:.0f} s")
        if thread.error is not None:
            raise thread.error
    terminate_as_interrupt()  # ours again: ray.init's SIGTERM handlers dump a native stack and abort


class _Starter(threading.Thread):
    """Starts the in-process Ray, then stays alive as long as it runs: Ray's processes are told to die
    with the thread that started them (PR_SET_PDEATHSIG on Linux), not with the process."""

    def __init__(self) -> None:
        super().__init__(name="ray-start", daemon=True)
        self.done, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.node = None  # Ray's node object once started: how `end_local_ray` knows the Ray is still this one

    def run(self) -> None:
        try:
            ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
            self.node = getattr(ray._private.worker, "_global_node", None)
        except BaseException as err:  # noqa: BLE001 - raised in the thread that waits (init_ray)
            self.error = err
        finally:
            self.done.set()
        if self.error is None:
            self.stop.wait()


# "thread": the start in progress; "started": the _Starter whose Ray this process owns; "ending": the
# thread ending it (end_local_ray_meanwhile); "processes": Ray's processes that end_local_ray kills.
_LOCAL: dict = {}


def start_local_ray() -> None:
    """Begin starting an in-process Ray in the background; `init_ray(None)` waits for it and raises what
    the start raised. Ray's own start-up is mostly other processes starting, so the caller's imports and
    store work run meanwhile."""
    _finish_ending()
    if not ray.is_initialized() and "thread" not in _LOCAL:
        quiet_ray()
        _start_local()


def _start_local() -> None:
    # Ray starts one idle worker per CPU for the first driver; a Tune trial never runs in one (its actor
    # asks for a runtime environment of its own, so Ray starts a worker for it), and on two cores their
    # start-up slows everything else that runs meanwhile.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    if "started" in _LOCAL:  # a Ray this process started before and shut down since: its thread may end
        _LOCAL["started"].stop.set()
    starter = _Starter()
    _LOCAL["thread"] = _LOCAL["started"] = starter
    if not _LOCAL.get("at_exit"):
        # Registered after `import ray` registered Ray's own shutdown, so it runs first (last in, first out).
        atexit.register(_end_at_exit)
        _LOCAL["at_exit"] = True
    starter.start()


def end_local_ray_meanwhile() -> None:
    """Begin `end_local_ray` in a thread, once a command's last trials are over: the driver's disconnect
    (a quarter of a second, spent mostly outside Python) then overlaps the caller's own work, e.g. the
    sweep's report. Whatever asks for Ray next, or the exit, waits for it first (at most ENDING_TIMEOUT_S)."""
    if "started" in _LOCAL and "ending" not in _LOCAL:
        _LOCAL["ending"] = threading.Thread(target=end_local_ray, name="ray-end", daemon=True)
        _LOCAL["ending"].start()


def _finish_ending() -> bool:
    """Wait for an end begun meanwhile; False when it is still stuck after ENDING_TIMEOUT_S."""
    if (ending := _LOCAL.pop("ending", None)) is None:
        return True
    ending.join(ENDING_TIMEOUT_S)
    return not ending.is_alive()


def _end_at_exit() -> None:
    if not _finish_ending():  # stuck in Ray's disconnect: kill its processes, and skip Ray's own exit
        import psutil  # handler, which would wait for that disconnect

        _kill(psutil, _LOCAL.get("processes", []))
        atexit.unregister(ray.shutdown)
    end_local_ray()  # nothing left to do when the end begun meanwhile has done it


def end_local_ray() -> None:
    """End the in-process Ray this process started, in a fraction of a second: disconnect the driver,
    then kill Ray's processes (GCS, raylet, Ray's Python helpers, and their children: agents, workers)
    all at once, where `ray.shutdown` stops them one by one with a graceful wait each (1.35 s on two
    cores). For the end of a command, once its trials are over: nothing of Ray's is needed after. A Ray
    still starting is first waited for (at most LOCAL_START_TIMEOUT_S, then killed as far as it got):
    killed under a driver that is still connecting, Ray ends the whole process. A Ray shut down since by
    someone else, started otherwise, or a cluster joined, is left alone."""
    starter = _LOCAL.get("started")
    if starter is None:
        return
    started = starter.done.wait(LOCAL_START_TIMEOUT_S)
    if _LOCAL.get("started") is not starter:  # ended meanwhile by another caller
        return
    del _LOCAL["started"]
    if _LOCAL.get("thread") is starter:
        del _LOCAL["thread"]
    worker = ray._private.worker
    node = getattr(worker, "_global_node", None)
    if started and (starter.node is None or node is not starter.node):  # failed, or shut down since
        starter.stop.set()
        return
    import psutil

    ours = _ray_children(psutil)
    _LOCAL["processes"] = processes = [p for child in ours for p in _with_descendants(psutil, child)]
    try:
        if started and ray.is_initialized():
            worker._global_node = None  # ray.shutdown below only disconnects this driver
            node.destroy_external_storage()  # spilled objects, as ray.shutdown removes them
            ray.shutdown()
    finally:
        _kill(psutil, processes)
        psutil.wait_procs(ours, timeout=1.0)  # reaped, not left as zombies of this process
        starter.stop.set()


def _kill(psutil, processes: list) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:  # already gone
            continue


def _ray_children(psutil) -> list:
    """This process's children that run Ray's programs (its binaries and scripts live in its package)."""
    package = os.path.dirname(ray.__file__)
    found = []
    for child in psutil.Process().children():
        try:
            if any(part.startswith(package + os.sep) for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _with_descendants(psutil, process) -> list:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:  # already gone
        return []


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
