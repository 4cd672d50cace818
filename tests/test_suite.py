"""The suite's own guards: a hung test fails with its stack instead of stalling the run, and `tests`
is this repository's package whatever else is installed."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tests

REPO = Path(__file__).resolve().parents[1]


def test_every_test_has_a_timeout_and_slow_ones_a_longer_one(request):
    default = int(request.config.getini("timeout"))
    assert default == 300
    assert request.config.getini("timeout_method") == "thread"  # prints every thread's stack
    for item in request.session.items:  # the slow ones collected with this test, if any
        if item.get_closest_marker("slow") is not None:
            assert item.get_closest_marker("timeout").args[0] > default, item.nodeid


def test_a_hung_test_fails_printing_where_it_hung(tmp_path):
    (tmp_path / "test_hangs.py").write_text(
        "import time\n\ndef wait_forever():\n    time.sleep(600)\n\ndef test_hangs():\n    wait_forever()\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", "-o", "timeout=3", "-n", "0", str(tmp_path / "test_hangs.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Timeout" in output and "wait_forever" in output, output[-3000:]


def test_tests_is_this_repositorys_package_not_a_namespace():
    """A distribution that installs a top-level `tests` package (torch-fidelity 0.4.0 does) would
    otherwise shadow this folder, and `tests.support` would not import."""
    assert Path(tests.__file__).resolve() == REPO / "tests" / "__init__.py"


def test_an_installed_tests_package_does_not_shadow_the_suite(tmp_path):
    site = tmp_path / "site"
    (site / "tests").mkdir(parents=True)
    (site / "tests" / "__init__.py").write_text("")  # what torch-fidelity 0.4.0's wheel installs
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(1, sys.argv[1]); import tests.support.sweeps, tests; "
         "print(tests.__file__)", str(site)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == REPO / "tests" / "__init__.py"


def test_every_fixture_module_is_loaded_as_a_plugin(request):
    """A module of tests/plugins that conftest.py's `pytest_plugins` forgets would leave its fixtures
    unknown to every test; one listed but absent would stop the whole suite at start."""
    listed = set(importlib.import_module("tests.conftest").pytest_plugins)
    present = {f"tests.plugins.{path.stem}" for path in (REPO / "tests" / "plugins").glob("*.py") if path.stem != "__init__"}
    assert listed == present
    assert all(request.config.pluginmanager.get_plugin(name) is not None for name in listed)


# ---------------------------------------------------------------------------------------------
# A missing tool: a skip here, a failure in CI; and only the check that needs it is left out


def test_a_missing_tool_skips_locally_and_fails_in_ci(monkeypatch):
    from tests.support.ci import missing

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such tool"):
        missing("no such tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no such tool.*CI=true"):
        missing("no such tool")


def rayjob_with_a_pod_field_kubernetes_1_29_lacks() -> dict:
    import yaml

    (doc,) = [d for d in yaml.safe_load_all((REPO / "docker" / "kuberay" / "rayjob.yaml").read_text())
              if d and d.get("kind") == "RayJob"]
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["hostnameOverride"] = "w"
    return doc


def test_without_the_crds_only_the_crd_check_is_left_out(monkeypatch, tmp_path):
    """The pod templates are still checked (and fail here), and the test goes on; in CI it fails."""
    from tests.support import k8s_schema

    monkeypatch.setattr(k8s_schema, "CRD_DIRS", [tmp_path / "absent"])
    monkeypatch.delenv("CI", raising=False)
    doc = rayjob_with_a_pod_field_kubernetes_1_29_lacks()
    with pytest.warns(UserWarning, match="not checked against its CRD"), \
            pytest.raises(AssertionError, match="hostnameOverride"):
        k8s_schema.validate_manifest(doc)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="KubeRay CRDs not found"):
        k8s_schema.validate_manifest(doc)
