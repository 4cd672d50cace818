"""The suite's own guards: a hung test fails with its stack instead of stalling the run, and `tests`
is this repository's package whatever else is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
