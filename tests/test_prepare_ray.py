"""prepare-data's choice between one process and Ray Data, and the Ray Data runner (issue #26).

The byte-for-byte comparison of the Ray Data pack with the single-process pack on a 2-node cluster
is in tests/test_multinode.py, which shares that module's cluster."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from orchestrator.prepare import LOCAL_RAY_MIN_CORES, LOCAL_RAY_MIN_IMAGES, ShardPlacement, use_ray
from tests.support.images import mixed_folder
from tests.support.sweeps import ditsweep, free_port
from trainer.archives import EncodedItems
from trainer.prepare import ShardDecoder, decoded_shards, plan_items
from trainer.storage import DataError


@pytest.mark.parametrize(
    ("images", "address", "ray", "cores", "expected"),
    [
        (LOCAL_RAY_MIN_IMAGES - 1, None, None, 8, False),  # small: Ray's start would cost more than it saves
        (LOCAL_RAY_MIN_IMAGES, None, None, 8, True),  # large, several cores: Ray in-process
        (LOCAL_RAY_MIN_IMAGES * 10, None, None, 1, False),  # one core: nothing to spread over
        (LOCAL_RAY_MIN_IMAGES * 10, None, None, LOCAL_RAY_MIN_CORES - 1, False),  # too few to pay for Ray's start
        (10, "10.0.0.1:6379", None, 1, True),  # a cluster was asked for
        (LOCAL_RAY_MIN_IMAGES * 10, None, False, 8, False),  # --no-ray wins
        (10, None, True, 1, True),  # --ray wins
    ],
)
def test_ray_is_used_for_a_cluster_or_a_large_source_on_several_cores(images, address, ray, cores, expected):
    assert use_ray(images, address, ray, cores) is expected


def test_a_reader_that_cannot_travel_to_ray_workers_is_read_here_or_refused_on_a_cluster(tmp_path, capsys):
    """A source whose reader holds something that does not pickle (an open database handle, here a
    lock) is read in this process, saying so, instead of failing inside Ray, and packs as the
    one-process path packs it; with --address (no other machine could read it) it is refused."""
    mixed_folder(tmp_path / "src")
    handle = threading.Lock()
    names = sorted(path.name for path in (tmp_path / "src").iterdir())
    items = EncodedItems(names, lambda name: (handle, str(tmp_path / "src" / name))[1], "fingerprint")
    plan = plan_items("src", items, 8, None, False, 1.0, ShardPlacement(ray=True))
    assert "cannot be sent to Ray workers: reading it in this process" in capsys.readouterr().err
    decoder = ShardDecoder(plan, items, False)
    [(index, (images, _, info))] = list(decoded_shards(decoder, ShardPlacement(ray=True), [0]))
    assert index == 0 and images.shape == (6, 8, 8, 3) and info["conversions"]["CMYK->RGB"] == 1
    np.testing.assert_array_equal(images, decoder(0)[0])
    with pytest.raises(DataError, match="cannot be sent to Ray workers; run prepare-data without --address"):
        list(decoded_shards(decoder, ShardPlacement(address="127.0.0.1:1"), [0]))


@pytest.mark.slow  # two CLI processes, one of them importing Ray: ~13 s on 2 loaded cores
def test_an_unreachable_cluster_is_refused_in_seconds_leaving_an_existing_pack_as_it_was(tmp_path):
    """Exit 2 with one line naming the address, within the connect bound, before the source is read or
    the output touched: the complete pack already at the output keeps its manifest and files."""
    mixed_folder(tmp_path / "src")
    first = ditsweep("prepare-data", str(tmp_path / "src"), str(tmp_path / "pack"), "--image-size", "8", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {path.name: path.read_bytes() for path in (tmp_path / "pack").iterdir()}
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = ditsweep("prepare-data", str(tmp_path / "src"), str(tmp_path / "pack"), "--image-size", "8",
                      "--address", address, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and time.monotonic() - start < 60, result.stderr
    assert f"--address '{address}': no Ray cluster answers" in result.stderr
    assert "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in (tmp_path / "pack").iterdir()} == before
    both = ditsweep("prepare-data", str(tmp_path / "src"), str(tmp_path / "other"), "--address", address, "--no-ray",
                    cwd=tmp_path)
    assert both.returncode == 2 and "give one of them" in both.stderr and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_ray_data_runs_every_task_raises_the_users_error_as_itself_and_stops_a_stalled_run():
    """orchestrator.prepare_ray on an in-process Ray of 2 CPUs: every task's result comes back, in
    the order of the tasks, a DataError raised in a task reaches the driver as that DataError with its message, and a
    run whose tasks never finish stops within the stall bound, naming the cluster's CPUs."""
    import ray

    from orchestrator.prepare_ray import run_tasks
    from trainer.storage import DataError

    def square(task: dict) -> dict:  # defined here, so it travels to the workers by value
        if task.get("unreadable"):
            raise DataError(f"shard {task['i']}: 1 unreadable file(s): broken.png")
        if task.get("hang"):
            time.sleep(120)
        return {"i": task["i"], "square": task["i"] ** 2}

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        nodes: set[str] = set()
        results = list(run_tasks([{"i": i} for i in range(6)], square, nodes=nodes))
        assert [(r["i"], r["square"]) for r in results] == [(i, i * i) for i in range(6)]
        assert nodes == {ray.get_runtime_context().get_node_id()}
        with pytest.raises(DataError, match=r"shard 3: 1 unreadable file\(s\): broken\.png"):
            list(run_tasks([{"i": i, "unreadable": i == 3} for i in range(6)], square, expected=(DataError,)))
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no part of a shard decoded in 3 s; the cluster has 2 CPUs"):
            list(run_tasks([{"i": 0, "hang": True}], square, stall_timeout_s=3))
        assert time.monotonic() - start < 30
    finally:
        ray.shutdown()
