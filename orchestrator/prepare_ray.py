"""Ray Data for `prepare-data`, and only here: reading and decoding spread over a cluster's CPUs.

`trainer.prepare` hands in its tasks (chunks of headers to read, then parts of the shards still to
do) and the function that does one (`read_modes`, `ShardDecoder.decode_part`: open and read a few
hundred or thousand files); Ray Data runs it once per task on any node with a CPU free, streaming, and
hands the results back in task order, so this process joins and writes each shard exactly as the
single-process path does: the pack does not depend on which node decoded what. Decoded images are
small next to the files they come from (3 KiB for a 32x32 RGB image), so the files are read where the
CPUs are and only modes and pixels travel.

A local source on a cluster: workers read the source's files by this machine's paths, so it must be
the same folder on every node (a shared filesystem, or a loopback cluster). `check_nodes_see` asks
every node before anything is read, and refuses (exit 2) naming the nodes that do not see it.

Waits are bounded: joining `--address` (orchestrator.ray_connect.join_cluster), the nodes' answer to that check
(`CHECK_TIMEOUT_S`), and a run, which stops (`stalled`, a TimeoutError by default) when no task has
finished for `stall_timeout_s` (a cluster with no free CPU, or tasks stuck reading a storage that
stopped answering).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray  # the third module allowed to import Ray (see tests/test_architecture.py)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.spec import SpecError
from orchestrator.ray_connect import init_ray, quiet_ray

# The longest every node may take to say whether it sees the local paths: starting a worker process
# took over 60 s on the loaded 2-core test machine, so a node that does not answer is named as such.
CHECK_TIMEOUT_S = 180.0
STALL_TIMEOUT_S = 600.0  # default: no task finished for this long -> the run stops
# The column of the task rows, and those of the result rows (the node is the id of the one that ran it).
_TASK, _RESULT, _ERROR, _NODE = "task", "result", "error", "node"


class NotShared(SpecError):
    """A local source that some node of the cluster does not see (exit 2)."""


def start(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` (bounded: orchestrator.ray_connect.join_cluster raises ClusterUnreachable), or
    start an in-process Ray of `num_cpus` CPUs (default all); whether this call started or joined it
    (False when this process was already connected)."""
    if ray.is_initialized():
        return False
    if address is None and num_cpus is not None:
        quiet_ray()
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    init_ray(address)  # joins --address (bounded), or starts Ray in-process on all cores
    return True


def stop() -> None:
    """Leave the cluster, or stop the in-process Ray: tasks still running are cancelled."""
    ray.shutdown()


def run_tasks(
    tasks: Sequence[Any],
    work: Callable[[Any], Any],
    stall_timeout_s: float = STALL_TIMEOUT_S,
    expected: tuple[type[BaseException], ...] = (),
    nodes: set[str] | None = None,
    stalled: Callable[[str], BaseException] = TimeoutError,
) -> Iterator[Any]:
    """Yield `work(task)` for every task, in the order of `tasks`, computed on Ray Data on the Ray
    this process is connected to (`start`). A task's exception of the `expected` types is raised here
    as itself (e.g. DataError naming a storage problem), not as Ray's wrapper; the first one stops the
    run. `nodes`, when given, collects the ids of the nodes that ran a task. No task done for
    `stall_timeout_s`: `stalled(message)` is raised.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller prints its own progress line with an ETA
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    for result, node in _stream(_dataset(tasks, work, expected), stall_timeout_s, stalled):
        if nodes is not None:
            nodes.add(node)
        yield result


def _dataset(tasks: Sequence[Any], work: Callable[[Any], Any], expected: tuple[type[BaseException], ...]
             ) -> ray.data.Dataset:
    """One row (and one block, so one Ray task) per task; tasks and results cross Arrow pickled, so
    they come back unchanged whatever they hold."""
    rows = [{_TASK: pickle.dumps(task)} for task in tasks]
    source = ray.data.from_items(rows, override_num_blocks=len(rows))
    return source.map(_Apply(work, expected), num_cpus=1)


class _Apply:
    """`work` on one task row -> one result row (a plain callable object, so Ray Data runs it as tasks).

    An exception of the `expected` types (the user's to fix, e.g. DataError) travels back pickled in
    the row and is raised by the driver as itself: Ray Data would wrap it in a UserCodeException that
    keeps only its text. Anything else (a bug) fails the task the usual way, with Ray's traceback."""

    def __init__(self, work: Callable[[Any], Any], expected: tuple[type[BaseException], ...]) -> None:
        self.work = work
        self.expected = expected

    def __call__(self, row: dict) -> dict:
        node = ray.get_runtime_context().get_node_id()
        try:
            return {_RESULT: pickle.dumps(self.work(pickle.loads(row[_TASK]))), _ERROR: b"", _NODE: node}
        except self.expected as err:
            return {_RESULT: b"", _ERROR: pickle.dumps(err), _NODE: node}


def _stream(dataset: ray.data.Dataset, stall_timeout_s: float,
            stalled: Callable[[str], BaseException]) -> Iterator[tuple[Any, str]]:
    """The dataset's (result, node id) as they arrive. Ray Data's own no-progress guard bounds the wait
    (it stops the execution cleanly, cancelling its tasks); a task's expected error is raised as itself."""
    dataset.context.execution_no_progress_timeout_s = stall_timeout_s
    dataset.context.execution_options.preserve_order = True  # results in task order, so parts join in order
    rows = iter(dataset.iter_rows())
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except ray.data.exceptions.ExecutionTimeoutError:
            raise stalled(_stall_message(stall_timeout_s)) from None
        if row[_ERROR]:
            raise pickle.loads(row[_ERROR])
        yield pickle.loads(row[_RESULT]), row[_NODE]


def _stall_message(stall_timeout_s: float) -> str:
    total = ray.cluster_resources().get("CPU", 0)
    free = ray.available_resources().get("CPU", 0)
    return (
        f"no part of a shard decoded in {stall_timeout_s:.0f} s; the cluster has {total:g} CPUs, {free:g} free. "
        f"Completed shards are kept: run the same command again to resume (--stall-timeout to wait longer)"
    )


def travels(value: Any) -> bool:
    """Whether `value` can be sent to Ray workers (Ray pickles functions and their data with cloudpickle)."""
    try:
        ray.cloudpickle.dumps(value)
    except Exception:  # noqa: BLE001 - pickling raises TypeError, PicklingError and the object's own errors
        return False
    return True


def check_nodes_see(paths: Sequence[str], advice: str = "", timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Refuse (NotShared, ending with `advice`) unless every alive node with CPUs sees every path in
    `paths` (local paths this process sees). One task per node, pinned to it; a node that does not
    answer within `timeout_s` counts as not seeing them."""
    nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()
             if node["Alive"] and node["Resources"].get("CPU", 0) > 0}
    probe = ray.remote(num_cpus=0)(_missing_here)
    pinned = {node_id: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
              for node_id in nodes}
    pending = {task.remote(list(paths)): node_id for node_id, task in pinned.items()}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    blind = {pending[ref]: ray.get(ref) for ref in ready}
    blind = {node_id: missing for node_id, missing in blind.items() if missing}
    blind.update({pending[ref]: [f"no answer within {timeout_s:.0f} s"] for ref in late})
    for ref in late:
        ray.cancel(ref, force=True)
    if blind:
        named = "; ".join(f"{nodes[node_id]} ({node_id[:8]}): {', '.join(missing[:2])}"
                          for node_id, missing in blind.items())
        what = "do not see" if len(late) < len(blind) else f"did not say within {timeout_s:.0f} s whether they see"
        raise NotShared(
            f"{len(blind)} of the cluster's {len(nodes)} nodes {what} the local files this command reads "
            f"({named}); " + (advice or "put them where every node reads them at the same path")
        )


def _missing_here(paths: list[str]) -> list[str]:
    """The paths this node does not see (run on each node by `check_nodes_see`)."""
    return [path for path in paths if not os.path.exists(path)]
