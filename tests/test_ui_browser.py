"""The MLflow UI in a real headless browser, over a store holding a finished tiny sweep.

`ditsweep ui` serves the store on loopback; Debian's chromium (installed by `make browser`, which
`make test` runs) is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ending in NUL on file descriptors 3 and 4), so no driver or extra Python package is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.ci import missing
from tests.support.sweeps import free_port

pytestmark = pytest.mark.slow

CHROMIUM = "chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,900",
]

# Text of each body cell of the MLflow run table's "Run Name" column.
RUN_NAME_CELLS = (
    "Array.from(document.querySelectorAll('div[role=gridcell][col-id=\"attributes.`Run Name`\"] a'))"
    ".map(a => a.innerText.trim())"
)


def find_chromium() -> str:
    """The chromium binary. `make test` installs it first (`make browser`) where it can; where it
    could not, this test skips and says why, and fails under CI=true."""
    found = shutil.which(CHROMIUM)
    if not found:
        missing("chromium is not installed: `make browser` installs it with apt-get (needs root and "
                "the Debian archive); without it the MLflow UI is not checked in a browser")
    return found


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe."""

    def __init__(self, binary: str, profile: Path):
        to_browser, self._send = os.pipe()
        self._receive, from_browser = os.pipe()

        def fds_3_and_4() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
            read_end = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds_3_and_4, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._next_id = 0
        self._buffer = b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, timeout: float = 60.0, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:  # anything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=self.session, **params)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._receive], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._receive, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for_text(self, texts: list[str], timeout: float = 90.0) -> str:
        """The page's visible text once it contains every one of `texts`."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.evaluate("document.body ? document.body.innerText : ''") or ""
            if all(t in body for t in texts):
                return body
            if time.monotonic() > deadline:
                missing = [t for t in texts if t not in body]
                raise AssertionError(f"the page never showed {missing}; it shows:\n{body[:3000]}")
            time.sleep(0.5)

    def wait_for_run_names(self, names: list[str], timeout: float = 60.0) -> list[str]:
        """The run names in the run table's name column, once all of `names` are among them."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.evaluate(RUN_NAME_CELLS) or []
            if set(names) <= set(shown) or time.monotonic() > deadline:
                return shown
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._send)
        os.close(self._receive)


@pytest.fixture(scope="module")
def mlflow_ui(finished_sweep, tmp_path_factory):
    """`ditsweep ui` on a free loopback port, one for this module's tests (they only read through it);
    yields the lines it printed once the UI answered."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "ditsweep-ui.log"  # a file, not a pipe: nobody must have to drain the server's log
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
            cwd=finished_sweep["folder"], stdout=sink, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops it." not in log.read_text():  # printed once /health answers
            assert proc.poll() is None, f"`ditsweep ui` exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"`ditsweep ui` did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        yield {"port": port, "lines": log.read_text().splitlines()}
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `ditsweep ui` stops the MLflow server it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


@pytest.fixture
def browser(chromium, tmp_path):
    chrome = Browser(chromium, tmp_path / "chromium-profile")
    yield chrome
    chrome.close()


def test_mlflow_ui_opens_on_the_trials_with_their_axes_and_psnr_gap(chromium, finished_sweep, mlflow_ui, browser, tmp_path):
    """`chromium` comes first: without a browser the test skips before any sweep runs."""
    base = f"http://127.0.0.1:{mlflow_ui['port']}"
    assert f"MLflow UI: {base}" in mlflow_ui["lines"]
    runs_page = next(line.split(": ", 1)[1] for line in mlflow_ui["lines"] if line.strip().startswith("realsweep:"))
    assert runs_page == (f"{base}/#/experiments/{finished_sweep['experiment_id']}/runs?viewStateShareKey=ditsweep"
                         "&workflowType=machine_learning")
    assert urllib.request.urlopen(base + "/health", timeout=10).read().strip() == b"OK"

    browser.page("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    browser.page("Page.navigate", url=runs_page)
    # The saved view (the report sets it): the trials themselves, flat, with their axes and psnr_gap as the
    # first columns, in the model-training (not GenAI) view.
    trials = finished_sweep["trials"]
    body = browser.wait_for_text(["attention.placement", "psnr_gap", f"{len(trials)} matching runs"])
    names = browser.wait_for_run_names(trials)
    assert sorted(names) == sorted(trials), body[:3000]
    assert finished_sweep["sweep"] not in names
    # The "Model training" workspace, not GenAI: its side navigation has no Traces, Sessions or Judges.
    navigation = browser.evaluate("Array.from(document.querySelectorAll('nav, aside')).map(e => e.innerText).join('\\n')")
    assert "Judges" not in navigation and "Sessions" not in navigation, navigation
    shot = browser.screenshot(tmp_path / "mlflow_ui_runs.png")
    print(f"screenshot of the MLflow UI: {shot}")
    assert shot.stat().st_size > 10_000


def test_mlflow_compare_view_and_metric_chart_overlay_two_trials(chromium, finished_sweep, mlflow_ui, browser,
                                                                 tmp_path):
    """Two trials in MLflow's compare view, then MLflow's metric page at the URL its "Plot chart" links
    have (built here the same way, with all three curves): their per-timestep PSNR series (train, held-out, gap; step = diffusion timestep) overlaid on one
    plot. A screenshot of each is kept."""
    from urllib.parse import quote

    from mlflow.tracking import MlflowClient

    from tests.support.sweeps import sqlite_uri

    client = MlflowClient(tracking_uri=sqlite_uri(finished_sweep["folder"]))
    experiment = finished_sweep["experiment_id"]
    trials = client.search_runs([experiment], "tags.`ditsweep.role` = 'trial'", order_by=["attributes.run_name"])
    two = [run.info.run_id for run in trials[:2]]
    names = [run.info.run_name for run in trials[:2]]
    last_t = max(m.step for m in client.get_metric_history(two[0], "psnr_curve.gap"))
    base = f"http://127.0.0.1:{mlflow_ui['port']}"
    browser.page("Emulation.setDeviceMetricsOverride", width=1600, height=1200, deviceScaleFactor=1, mobile=False)

    runs, experiments = quote(json.dumps(two)), quote(json.dumps([experiment]))
    browser.page("Page.navigate", url=f"{base}/#/compare-runs?runs={runs}&experiments={experiments}")
    browser.wait_for_text(["Comparing 2 Runs", *names, "Metrics", "Parameters"], timeout=90)
    shot = browser.screenshot(tmp_path / "mlflow_compare_two_trials.png")
    print(f"screenshot of MLflow's compare view: {shot}")
    assert shot.stat().st_size > 10_000

    # The URL MLflow's compare view links each metric to ("Plot chart"), with all three curves selected.
    curves = ["psnr_curve.train", "psnr_curve.test", "psnr_curve.gap"]
    query = (f"runs={runs}&metric={quote(json.dumps(curves[2]))}&experiments={experiments}"
             f"&plot_metric_keys={quote(json.dumps(curves))}&plot_layout={{}}&x_axis=step&y_axis_scale=linear"
             f"&line_smoothness=1&show_point=false&deselected_curves=[]&last_linear_y_axis_range=[]")
    browser.page("Page.navigate", url=f"{base}/#/metric?{query}")
    legend = [f"{name} ({curve})" for name in names for curve in curves]  # one line per run and curve
    body = browser.wait_for_text(["Completed Runs", "2/2", *legend, f"(step={last_t})"], timeout=90)
    # Below the plot, one table per curve with a row per run: its latest value is at the last timestep.
    for name in names:
        rows = [line for line in body.splitlines() if line.startswith(name) and f"(step={last_t})" in line]
        assert len(rows) == len(curves), (name, rows)
    chart = browser.screenshot(tmp_path / "mlflow_psnr_curves_two_trials.png")
    print(f"screenshot of the overlaid PSNR curves: {chart}")
    assert chart.stat().st_size > 20_000


def test_the_report_page_fits_a_1400_pixel_screen(chromium, finished_sweep, browser, tmp_path):
    """The finished sweep's report.html at 1400 px: no sideways scrolling, the forest plot and the compact
    primary table on the page, the sample grids at one size in a configuration x N table."""
    page = finished_sweep["folder"] / "reports" / finished_sweep["sweep_id"] / "report.html"
    browser.page("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    browser.page("Page.navigate", url=page.as_uri())
    browser.wait_for_text(["Paired differences against the baseline", "verdict (Holm-adjusted)", "Samples"])
    widths = browser.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] <= 1400, widths
    forest = browser.evaluate("Array.from(document.images).filter(i => i.alt.startsWith('Paired difference in PSNR gap'))"
                              ".map(i => i.naturalWidth)")
    assert len(forest) == 1 and forest[0] > 300, forest
    grids = browser.evaluate("Array.from(document.querySelectorAll('table.grids img.grid')).map(i => i.width)")
    assert len(grids) == 2 and set(grids) == {160}, grids  # none and head, one size
    shot = browser.screenshot(tmp_path / "report_1400.png")
    print(f"screenshot of the report: {shot}")
