"""A sweep's comparison report: one table row per configuration, plots, and one HTML page.

A configuration is a grid point without its seed-like axes (`seed`, `data.shuffle_seed`): its numbers
are the mean and the sample standard deviation over those seeds and shuffles. Every comparison of a
configuration with its baseline (the spec's `compare:`) comes from one pairing engine,
`orchestrator.compare`, shown by `orchestrator.paired`: the compact primary table, the forest plot, the
full paired.csv and the parent run's `delta.*` metrics.

One module per job: `rows` (the records and the statistics per configuration), `tables` (CSV, Markdown
and HTML tables, the paired tables), `pages` (report.md, report.html from the template page.html, the
notes, every file of a report), `jacobian` (the Jacobian-eigenbasis and attention-locality section),
`fetch` (a sweep read from MLflow through orchestrator.tracking) and `publishing` (the files written whole
and attached to the sweep's parent run, where the MLflow UI shows them). The plot series are
`orchestrator.plot_series`, drawn by `orchestrator.plots`. The names below are the package's interface.
"""

from orchestrator.plot_series import gap_vs_size, window_label
from orchestrator.report.fetch import fetch_sweep
from orchestrator.report.pages import build_report, gahb_inputs, notes
from orchestrator.report.publishing import REPORT_ARTIFACT_DIR, publish, report, write_report
from orchestrator.report.rows import ConfigRow, ReportError, SweepData, TrialResult, configuration_rows
from orchestrator.report.tables import table_csv

__all__ = [
    "REPORT_ARTIFACT_DIR", "ConfigRow", "ReportError", "SweepData", "TrialResult", "build_report",
    "configuration_rows", "fetch_sweep", "gahb_inputs", "gap_vs_size", "notes", "publish", "report",
    "table_csv", "window_label", "write_report",
]
