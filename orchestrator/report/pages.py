"""The report's pages: report.md and one self-contained report.html (its HTML and CSS in the template
page.html, shipped as package data), the notes under the table, and `build_report`, which gathers every
file of a report (tables, pages, figures, the Jacobian section, sample grids) as name -> bytes."""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime
from importlib import resources
from string import Template

from orchestrator import paired
from orchestrator.display import metric_name_part
from orchestrator.plot_series import Figure, attention_distances, figures, forest_figure
from orchestrator.report.jacobian import Configuration, Inputs, note_lines
from orchestrator.report.jacobian import section as jacobian_section
from orchestrator.report.rows import (METRICS, ConfigRow, SampleGrid, SweepData, configuration_rows,
                                      disjoint_pairs, present_metrics, reproducibility_lines)
from orchestrator.report.tables import (PairedTables, baseline_text, display_table, paired_metrics, paired_tables,
                                        table_csv, table_html, table_markdown)

PAGE_TEMPLATE = "page.html"  # beside this module; pyproject.toml ships it as package data


def gahb_inputs(data: SweepData, rows: list[ConfigRow]) -> Inputs:
    """What orchestrator.report.jacobian reads: the configurations, disjoint pairs and fetched analyses."""
    configurations = [
        Configuration(
            label=row.label(), label_without_size=row.label_without_size(),
            size=None if row.size is None else row.size[0], trials=row.finished,
            distances=next(iter(attention_distances([row]).values()), []),
        )
        for row in rows
    ]
    return Inputs(configurations, data.trials, disjoint_pairs(data.trials), data.jacobians, data.attention_queries)


def notes(data: SweepData) -> list[str]:
    """Trials left out of the statistics, and where cached results came from."""
    rows = configuration_rows(data.trials, data.axes)
    lines = reproducibility_lines(data) + note_lines(gahb_inputs(data, rows))
    lines += [f"{t.name}: {t.status.lower()}, not in the statistics" for t in data.trials if not t.finished]
    lines += [f"{t.name}: {metric} is {value}, left out of the statistics (its pairs are dropped and counted)"
              for t in data.trials if t.finished for metric, value in t.metrics.items()
              if metric in METRICS and not math.isfinite(value)]
    cached = sum(t.cached for t in data.trials)
    if cached:
        lines.append(f"{cached} trial(s) reuse FINISHED runs of earlier sweeps of experiment {data.experiment_name!r}")
    return lines


def summary_line(data: SweepData) -> str:
    finished = sum(t.finished for t in data.trials)
    return (f"Sweep `{data.sweep_id}` of experiment `{data.experiment_name}` ({data.status}): "
            f"{finished} of {len(data.trials)} trials finished; parent run `{data.parent_run_id}`.")


def grid_filename(label: str, name: str) -> str:
    return f"grid_{metric_name_part(label)}_{name}"


MEMORIZATION_NOTE = (
    "mem_copy_fraction: the share of samples whose nearest training image is much closer than the second "
    "nearest (d1/d2 < 1/3; Yoon et al. 2023, Gu et al. 2023); mem_closer_to_train: the share of samples nearer "
    "to a training image than to any of as many held-out images (size-matched references: 0.5 = no "
    "preference, 1 = every sample nearer to the training set); mem_nn_train, mem_nn_test: mean RMS distance to "
    "the nearest training image and to the nearest of the size-matched held-out images.")


def markdown_page(data: SweepData, table: list[list[str]], figs: list[Figure],
                  compared: PairedTables | None = None) -> str:
    parts = [f"# Sweep {data.sweep_id}", "", summary_line(data), "",
             "Mean ± sample std over seeds and shuffles; the 95% intervals are Student-t intervals of the mean "
             f"over them (scipy.stats.t). {MEMORIZATION_NOTE}", "", table_markdown(table)]
    if compared:
        parts += [compared.markdown(data)]
    parts += [f"![{fig.caption}]({fig.filename})\n" for fig in figs]
    for grid in data.grids:
        parts += [f"![{grid.label}: {name}]({grid_filename(grid.label, name)})\n" for name in grid.files]
    parts += [f"- {line}" for line in notes(data)]
    return "\n".join(parts).rstrip() + "\n"


def _img(grid: SampleGrid, name: str, css: str) -> str:
    e = html.escape
    payload = base64.b64encode(grid.files[name]).decode()
    return (f'<img class="{css}" alt="{e(grid.label)} {e(name)}" title="{e(name)}" '
            f'src="data:image/png;base64,{payload}">')


def grids_html(data: SweepData) -> str:
    """The sample grids at one size in a configuration x N layout, each labelled; below them, at the
    smallest N, each sample beside its nearest training image."""
    from trainer.memorization import PAIRS_PNG
    from trainer.records import GRID_PNG

    e = html.escape
    if not data.grids:
        return ""
    sizes = list(dict.fromkeys(g.size for g in data.grids))
    configurations = list(dict.fromkeys(g.configuration for g in data.grids))
    cell = {(g.configuration, g.size): g for g in data.grids}
    head = "".join(f"<th>{e(size or 'samples')}</th>" for size in sizes)
    body = []
    for configuration in configurations:
        cells = []
        for size in sizes:
            grid = cell.get((configuration, size))
            cells.append("<td></td>" if grid is None or GRID_PNG not in grid.files else
                         f"<td><figure>{_img(grid, GRID_PNG, 'grid')}<figcaption>{e(grid.label)}</figcaption>"
                         "</figure></td>")
        body.append(f"<tr><th>{e(configuration)}</th>{''.join(cells)}</tr>")
    pairs = "".join(f"<figure>{_img(g, PAIRS_PNG, 'pairs')}<figcaption>{e(g.label)}: each sample (left) beside its "
                    "nearest training image</figcaption></figure>" for g in data.grids if PAIRS_PNG in g.files)
    return ("<h2>Samples</h2>\n<p>One sample grid per configuration (its first seed and shuffle, the same fixed "
            "noise everywhere), rows: configuration, columns: training images N.</p>\n"
            f'<table class="grids"><thead><tr><th>configuration</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>\n" + (f"<h3>Nearest training images (smallest N)</h3>\n{pairs}"
                                                             if pairs else ""))


def html_page(data: SweepData, table: list[list[str]], figs: list[Figure],
              compared: PairedTables | None = None) -> str:
    """One self-contained page that reads at 1400 px without sideways scrolling: the plots are embedded
    as base64 PNG, table cells wrap."""
    e = html.escape
    paired_html = ""
    if compared:
        paired_html = (f"<h2>Paired differences against the baseline</h2>\n<p>{e(baseline_text(data.compare, data.axes))}."
                       f"</p>\n<p>{e(paired.multiplicity_text(compared.rows))}</p>\n{table_html(compared.primary)}")
        if compared.secondary:
            paired_html += (f"\n<h3>Secondary metrics ({e(paired.UNADJUSTED)})</h3>\n{table_html(compared.secondary)}"
                            "\n<p>Every metric with its p values and dropped pairs: paired.csv.</p>")
    images = "\n".join(
        f'<figure><img alt="{e(fig.caption)}" src="data:image/png;base64,{base64.b64encode(fig.png).decode()}">'
        f"<figcaption>{e(fig.caption)}</figcaption></figure>"
        for fig in figs
    )
    page = Template(resources.files(__package__).joinpath(PAGE_TEMPLATE).read_text(encoding="utf-8"))
    return page.substitute(
        title=e(f"ditsweep report {data.sweep_id}"), heading=e(f"Sweep {data.sweep_id}"),
        summary=e(summary_line(data).replace("`", "")), memorization_note=e(MEMORIZATION_NOTE),
        generated=e(datetime.now().strftime("%Y-%m-%d %H:%M")), table=table_html(table), paired=paired_html,
        notes="".join(f"<li>{e(line)}</li>" for line in notes(data)), images=images, grids=grids_html(data))


def build_report(data: SweepData) -> dict[str, bytes]:
    """File name -> contents: report.md, report.csv, report.html, paired.csv/.md and the PNG plots."""
    rows = configuration_rows(data.trials, data.axes)
    metrics = present_metrics(data.trials)
    table = display_table(rows, data.axes, metrics)
    compared = paired_tables(data)
    extra = jacobian_section(gahb_inputs(data, rows))  # Jacobian eigenbases; attention locality
    figs = [*forest_figure(compared.forest if compared else {}), *figures(rows),
            *(Figure(*figure) for figure in extra.figures)]
    files = {
        "report.md": markdown_page(data, table, figs, compared).encode(),
        "report.csv": table_csv(rows, data.axes, metrics).encode(),
        "report.html": html_page(data, table, figs, compared).encode(),
    }
    if compared:
        files["paired.csv"] = paired.paired_csv(compared.rows, paired_metrics(data)).encode()
        files["paired.md"] = compared.markdown(data).encode()
    files.update({fig.filename: fig.png for fig in figs})
    files.update(extra.files)
    for grid in data.grids:
        files.update({grid_filename(grid.label, name): png for name, png in grid.files.items()})
    return files
