"""The suite's rules and the list of its fixtures' modules.

Each fixture lives in a module of tests/plugins named after what it starts (listed in
`pytest_plugins` below): S3 on moto, `mlflow server`, a Ray head, a multi-node Ray cluster, a loopback
HTTP server, the recorder of network contacts, the stand-in FID weights and a finished sweep. Here:
one torch thread for a module, and how tests are scheduled (slow ones first with a longer timeout,
tests sharing an expensive fixture on one xdist worker). Plain helpers (the tiny config, specs, the
CLI) are in tests/support.
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.plugins.s3_moto",
    "tests.plugins.mlflow_server",
    "tests.plugins.ray_head",
    "tests.plugins.ray_cluster",
    "tests.plugins.http_server",
    "tests.plugins.network_recorder",
    "tests.plugins.fid_weights",
    "tests.plugins.finished_sweep",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Limit torch to one thread for a module, then restore the previous setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _xdist_group(item) -> str | None:
    """Tests that share an expensive fixture run on the same xdist worker (`make test` runs two, with
    `--dist loadgroup`), so it is built once: the finished sweep (session), and per module a Ray head
    or cluster, a trained model or a built store (any module-scoped fixture)."""
    definitions = getattr(item, "_fixtureinfo", None)
    scopes = {name: defs[-1].scope for name, defs in (definitions.name2fixturedefs.items() if definitions else ())
              if defs}
    if scopes.get("finished_sweep") == "session":
        return "finished_sweep"
    if "module" in scopes.values():
        return item.module.__name__
    return None


# The default per-test timeout is pyproject.toml's; a slow test (a real sweep, a cluster started for its
# module) gets this much, what its own subprocess waits allow on a loaded 2-core machine.
SLOW_TEST_TIMEOUT_S = 1200


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group markers
def pytest_collection_modifyitems(items) -> None:
    """`make test-fast` (-m "not slow") must start no Ray cluster: a test that wants the Ray head is slow.
    A slow test gets the longer timeout SLOW_TEST_TIMEOUT_S.

    Slow tests go first, so the two workers of `make test` are not left with one long test at the end
    (a group's tests still run together on one worker, so a module fixture is built once)."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))
        for cluster in ("ray_head", "ray_cluster"):
            if cluster in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
                raise pytest.UsageError(f"{item.nodeid} uses the {cluster} fixture: mark it @pytest.mark.slow")
        group = _xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


def pytest_configure(config) -> None:
    """Under `--dist loadgroup`, pytest-xdist (3.8) sends a group's tests to one worker by rewriting
    their old `_nodeid` attribute, which pytest 9.2 no longer reads: every shared cluster, sweep and
    model would be built once per worker, silently. Refuse that pairing, naming the fix."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    major, minor = (int(part) for part in pytest.__version__.split(".")[:2])
    if (major, minor) >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with --dist loadgroup: pytest-xdist cannot keep grouped tests on one "
            "worker; install the versions pyproject.toml allows (make install-dev)"
        )
