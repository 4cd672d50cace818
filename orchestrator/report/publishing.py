"""A report written where people and the MLflow UI find it: `write_report` puts the files in a folder
whole or not at all, `publish` builds the report of a sweep, writes it and attaches it to the sweep's
parent run (with the paired `delta.*` metrics and the experiment's run-table view), and `report` is
`ditsweep report`."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

from orchestrator import paired
from orchestrator.report.fetch import fetch_sweep
from orchestrator.report.jacobian import FILES as JACOBIAN_FILES
from orchestrator.report.pages import build_report
from orchestrator.report.rows import ReportError, SweepData, present_metrics
from orchestrator.report.tables import paired_tables
from orchestrator.tracking import Tracker

REPORT_ARTIFACT_DIR = "report"
REPORTS_DIR = Path("reports")
RUN_TABLE_VIEW = "ditsweep: axes and key metrics"
REPORT_FILES = ("report.md", "report.csv", "report.html", "paired.csv", "paired.md")


def is_report_file(path: Path) -> bool:
    return path.is_file() and (path.name in REPORT_FILES + JACOBIAN_FILES or path.suffix == ".png")


def write_report(files: dict[str, bytes], out: Path) -> Path:
    """Write into a staging folder beside `out`, then swap it in: a failure leaves no half report.
    An existing `out` is replaced only when it holds nothing but an earlier report's files."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder")
    if target.is_dir() and not all(is_report_file(p) for p in target.iterdir()):
        raise ReportError(f"--out {out} holds files that are not a ditsweep report; give a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a report is for sharing
        for name, payload in files.items():
            (staging / name).write_bytes(payload)
        if target.exists():
            previous = target.with_name(f".{target.name}.old-{secrets.token_hex(3)}")
            target.rename(previous)
            staging.rename(target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(out)


def publish(tracker: Tracker, sweep_id: str, out: Path | None = None) -> tuple[Path, SweepData]:
    """Build the report, write it to `out` (default reports/SWEEP_ID), attach it to the sweep's run
    under report/, and point the experiment's MLflow run table at the sweep's axes and metrics; every
    write delivered (the outbox flushed, bounded) before it returns."""
    data = fetch_sweep(tracker, sweep_id)
    folder = write_report(build_report(data), out or REPORTS_DIR / sweep_id)
    tracker.log_folder(data.parent_run_id, folder, REPORT_ARTIFACT_DIR)
    compared = paired_tables(data)
    if compared:
        tracker.log_metrics(data.parent_run_id, paired.delta_metrics(compared.rows), step=0)
    tracker.set_run_table_view(data.experiment_id, RUN_TABLE_VIEW, data.axes, present_metrics(data.trials),
                               ["attention.schedule"])
    if not tracker.flush():  # the writes above wait in the outbox while the server is away
        raise ReportError(f"the report is in {folder}/, but the tracking store at {tracker.uri} did not take it "
                          f"(server away); `ditsweep report {sweep_id}` attaches it once the server answers")
    return folder, data


def report(sweep_id: str, out: Path | None, tracking_uri: str | None) -> str:
    """`ditsweep report`: what was written, for the terminal."""
    tracker = Tracker(tracking_uri, create=False)
    folder, data = publish(tracker, sweep_id, out)
    names = sorted(p.name for p in folder.iterdir())
    return (f"report of sweep {sweep_id} in {folder}/: {', '.join(names)}\n"
            f"attached to run {data.parent_run_id} under {REPORT_ARTIFACT_DIR}/; open {folder / 'report.html'}")
