"""`lit-open report`: the curves of a run, other runs overlaid, as a PNG and an HTML page.

    lit-open report run.dir=runs/mine [compare=[runs/reference,runs/other]] [labels=[mine,ref,other]]
                    [x=step|tokens] [out=DIR]

Reads each run's `logs/metrics.csv` and `events.jsonl` (the run directory contract in docs/architecture.md) and writes
`report.png` (a grid of panels: train and held-out loss, learning rate, gradient norm, throughput, the held-out loss
and bits per byte of each val source, `val/<name>/loss` and `val/<name>/bits_per_byte`, and one panel per family of
`eval/*` scores, e.g. `eval/hellaswag/*`) and `report.html` (the runs, the PNG embedded, a table of
final metrics per run and a table of every event) into `<run.dir>/report/` (or `out=`). Compare runs are drawn in
their own colours and labelled by their directory names unless `labels=` names them: this is how a run is held
against a reference trace, as LLM360 publishes its training traces. The x axis is the optimizer step, or with
`x=tokens` the tokens trained on (`train/tokens`).

Rollbacks: metrics.csv keeps its rows in the order they were logged, so after a rollback the steps that follow the
restored one appear again. A row is "undone" when a later row has the same or an earlier step (the state it came
from was rolled back; a resumed run repeats no rows: its logger drops those after the checkpoint). Each curve is
drawn as the kept trajectory (the history the final model has: train values solid, held-out ones dashed with dots)
plus the undone branches as they happened (faint and dotted, from the point they branched off). Final values are
the kept trajectory's last ones.

Events are vertical lines, coloured by kind: spike, rollback, skip, nan (non-finite loss or gradients), anneal, qat,
resume and chaos (injected faults); with several runs the line style tells the runs apart (solid for the first, then
dashed, dotted, ...). Other events (checkpoint, eval, release, samples, ...) are listed in the HTML table only.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lit_open.compose import load_command_config
from lit_open.errors import UserError
from lit_open.train.events import read_events

EVAL_MARKERS = ("o", "s", "^", "D", "v", "P")

# event name -> marker kind; events not named here are not drawn (too frequent, or not a change of course)
MARKER_EVENTS = {
    "spike": "spike",
    "rollback": "rollback",
    "skip": "skip",
    "non_finite": "nan",
    "nan": "nan",
    "anneal": "anneal",
    "qat": "qat",
    "resume": "resume",
    "chaos": "chaos",
}
MARKER_COLORS = {  # dark shades, apart from the runs' own tab10 colours
    "spike": "crimson",
    "rollback": "indigo",
    "skip": "darkorange",
    "nan": "black",
    "anneal": "darkgreen",
    "qat": "saddlebrown",
    "resume": "dimgray",
    "chaos": "deeppink",
}
RUN_LINESTYLES = ("-", "--", ":", "-.")
PANELS = (  # title, the columns drawn in it, log scale
    ("loss", ("train/loss", "val/loss"), False),
    ("learning rate", ("train/lr",), False),
    ("gradient norm", ("train/grad_norm",), True),
    ("throughput (tokens/s)", ("train/tokens_per_s",), False),
)
FINAL_COLUMNS = ("train/loss", "val/loss", "val/ppl", "train/lr", "train/grad_norm", "train/skipped")
SOURCE_PANELS = (("held-out loss by source", "loss"), ("held-out bits per byte", "bits_per_byte"))  # val/<name>/...


@dataclass
class Trace:
    """One run as logged: metrics.csv rows in file order (each with `step` and the columns it filled) and events."""

    label: str
    directory: Path
    rows: list[dict[str, float]]
    events: list[dict[str, Any]]

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(k for k in row if k != "step"))
        return list(seen)


@dataclass
class Curve:
    """One column of one run against x: the kept trajectory and the branches that rollbacks undid."""

    x: list[float]
    y: list[float]
    undone: list[tuple[list[float], list[float]]]

    @property
    def final(self) -> float | None:
        return self.y[-1] if self.y else None


def read_trace(directory: str | Path, label: str | None = None) -> Trace:
    """Read a run directory's metrics and events; UserError when it is not a run directory."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"lit-open report: the run directory {directory} does not exist.")
    metrics = directory / "logs" / "metrics.csv"
    if not metrics.is_file():
        raise UserError(
            f"lit-open report: {directory} has no logs/metrics.csv: is it a run directory (run.dir of a `lit-open "
            "train`), and has the run logged a step yet?"
        )
    rows = read_metric_rows(metrics)
    if not rows:
        raise UserError(f"lit-open report: {metrics} has no rows yet.")
    return Trace(label or directory.resolve().name, directory, rows, read_events(directory / "events.jsonl"))


def read_metric_rows(path: Path) -> list[dict[str, float]]:
    """metrics.csv rows, in file order, as {key: value} without the empty cells (its columns grow as new metrics
    appear) and without cells that are not numbers; rows without a step are left out."""
    rows = []
    with path.open(newline="") as f:
        for record in csv.DictReader(f):
            row = {k: _number(v) for k, v in record.items() if k and v not in (None, "")}
            row = {k: v for k, v in row.items() if v is not None}
            if "step" in row:
                rows.append(row)
    return rows


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def undone_rows(steps: list[float]) -> list[bool]:
    """Whether each row (in file order) was undone by a rollback: some later row has the same or an earlier step."""
    undone, later_min = [False] * len(steps), math.inf
    for i in range(len(steps) - 1, -1, -1):
        undone[i] = later_min <= steps[i]
        later_min = min(later_min, steps[i])
    return undone


def row_positions(trace: Trace, x: str) -> list[float]:
    """Each row's x: its step, or the tokens trained on by then (a held-out row takes its step's train/tokens)."""
    if x == "step":
        return [row["step"] for row in trace.rows]
    positions, tokens_at, last = [], {0.0: 0.0}, 0.0
    for row in trace.rows:
        if "train/tokens" in row:
            last = tokens_at[row["step"]] = row["train/tokens"]
        positions.append(tokens_at.get(row["step"], last))
    return positions


def curve(trace: Trace, column: str, x: str = "step") -> Curve:
    """The rows holding `column`, split into the kept trajectory and the undone branches (see the module doc)."""
    positions = row_positions(trace, x)
    points = [(pos, row["step"], row[column]) for pos, row in zip(positions, trace.rows) if column in row]
    undone = undone_rows([step for _, step, _ in points])
    kept = [(pos, value) for (pos, _, value), u in zip(points, undone) if not u]
    branches: list[tuple[list[float], list[float]]] = []
    for i, (pos, step, value) in enumerate(points):
        if not undone[i]:
            continue
        if i == 0 or not undone[i - 1]:  # a new branch starts from the point it grew out of
            start = [points[i - 1]] if i > 0 and points[i - 1][1] < step else []
            branches.append(([p for p, _, _ in start], [v for _, _, v in start]))
        branches[-1][0].append(pos)
        branches[-1][1].append(value)
    return Curve([p for p, _ in kept], [v for _, v in kept], branches)


def marker_kind(event: dict[str, Any]) -> str | None:
    name = str(event.get("event", ""))
    return MARKER_EVENTS.get(name) or next((k for k in ("anneal", "qat") if name.startswith(k)), None)


def markers(trace: Trace, x: str = "step") -> dict[str, list[float]]:
    """Where each drawn event goes on the x axis, by kind (on the tokens axis, interpolated along the kept steps)."""
    found: dict[str, list[float]] = {}
    if x == "tokens":
        tokens = curve(trace, "train/tokens", "step")
        known_steps, known_tokens = [0.0, *tokens.x], [0.0, *tokens.y]
    for event in trace.events:
        kind = marker_kind(event)
        if kind is None or "step" not in event:
            continue
        position = float(event["step"])
        if x == "tokens":
            position = float(np.interp(position, known_steps, known_tokens))
        found.setdefault(kind, []).append(position)
    return found


def final_metrics(trace: Trace) -> dict[str, float]:
    """Steps, tokens, the last kept value of the summary columns, mean throughput, rollbacks, then each eval/*
    column's last kept value (in the table's column order; a value the run does not have is left out)."""
    loss_steps = curve(trace, "train/loss").x
    result = {"steps": loss_steps[-1] if loss_steps else max(r["step"] for r in trace.rows)}
    for column in ("train/tokens", *FINAL_COLUMNS):
        result[column] = curve(trace, column).final
    throughput = curve(trace, "train/tokens_per_s").y
    result["mean tokens/s"] = sum(throughput) / len(throughput) if throughput else None
    result["rollbacks"] = float(sum(e.get("event") == "rollback" for e in trace.events))
    extra = [c for c in trace.columns() if c.startswith("eval/") or source_metric(c)]
    result.update({c: curve(trace, c).final for c in extra})
    return {k: v for k, v in result.items() if v is not None}


def source_metric(column: str) -> str | None:
    """The metric of a per-val-source column (`val/<name>/loss` -> loss), else None."""
    parts = column.split("/")
    return parts[2] if len(parts) == 3 and parts[0] == "val" else None


def panels(traces: list[Trace]) -> list[tuple[str, list[str], bool]]:
    """The panels to draw: the fixed ones some run has data for, the val sources' ones, then one per eval/* family."""
    columns = list(dict.fromkeys(c for trace in traces for c in trace.columns()))
    chosen = [(title, [c for c in keys if c in columns], log) for title, keys, log in PANELS]
    chosen += [(title, [c for c in columns if source_metric(c) == metric], False) for title, metric in SOURCE_PANELS]
    chosen = [(title, keys, log) for title, keys, log in chosen if keys]
    families: dict[str, list[str]] = {}
    for trace in traces:
        for column in trace.columns():
            if column.startswith("eval/"):
                family = "/".join(column.split("/")[:2])
                if column not in families.setdefault(family, []):
                    families[family].append(column)
    return chosen + [(family, keys, False) for family, keys in families.items()]


def draw(traces: list[Trace], path: Path, x: str = "step") -> Path:
    """Write the grid of panels as a PNG."""
    # matplotlib takes a second to import and only drawing needs it; no pyplot: no global backend or figure state
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    chosen = panels(traces)
    ncols = 2
    nrows = math.ceil(len(chosen) / ncols)
    figure = Figure(figsize=(6.5 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).flatten()
    run_colors = [f"C{i % 10}" for i in range(len(traces))]
    all_markers = [markers(trace, x) for trace in traces]
    for ax, (title, columns, log) in zip(axes, chosen):
        for trace, color in zip(traces, run_colors):
            for index, column in enumerate(columns):
                held_out = column.startswith("val/")
                line = curve(trace, column, x)
                if not line.x:
                    continue
                name = trace.label if len(columns) == 1 else f"{trace.label} {column}"
                if held_out:  # val sources in one panel share the run's colour: a marker each
                    marker = "o" if column == "val/loss" else EVAL_MARKERS[index % len(EVAL_MARKERS)]
                    style = {"linestyle": "--", "marker": marker, "markersize": 3}
                elif column.startswith("eval/"):  # a family's metrics share the run's colour: a marker each
                    style = {"linewidth": 1.2, "marker": EVAL_MARKERS[index % len(EVAL_MARKERS)], "markersize": 4}
                else:
                    style = {"linewidth": 1.2}
                ax.plot(line.x, line.y, color=color, label=name, **style)
                for branch_x, branch_y in line.undone:
                    ax.plot(branch_x, branch_y, color=color, alpha=0.35, linestyle=":", linewidth=1.0)
        for run_index, found in enumerate(all_markers):
            for kind, positions in found.items():
                for position in positions:
                    ax.axvline(
                        position,
                        color=MARKER_COLORS[kind],
                        linestyle=RUN_LINESTYLES[run_index % len(RUN_LINESTYLES)],
                        linewidth=0.9,
                        alpha=0.7,
                    )
        if log and all(v > 0 for trace in traces for c in columns for v in curve(trace, c, x).y):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("optimizer step" if x == "step" else "tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    kinds = sorted({kind for found in all_markers for kind in found})
    if kinds:
        handles = [Line2D([], [], color=MARKER_COLORS[k], label=k) for k in kinds]
        if len(traces) > 1:
            handles += [
                Line2D(
                    [], [], color="gray", linestyle=RUN_LINESTYLES[i % len(RUN_LINESTYLES)], label=f"{t.label} events"
                )
                for i, t in enumerate(traces)
            ]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    figure.suptitle(" vs ".join(t.label for t in traces))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _format(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3e}"


def write_html(traces: list[Trace], png: Path, path: Path) -> Path:
    """The page: runs, the PNG (embedded, and linked), final metrics per run, every event of every run."""
    finals = [final_metrics(t) for t in traces]
    summary = ["steps", "train/tokens", *FINAL_COLUMNS, "mean tokens/s", "rollbacks"]
    columns = [c for c in summary if any(c in f for f in finals)]
    columns += dict.fromkeys(k for f in finals for k in f if k not in summary)  # eval/* of any run
    title = "lit-open report: " + " vs ".join(t.label for t in traces)
    e = html.escape
    parts = [
        "<!doctype html>",
        f'<html><head><meta charset="utf-8"><title>{e(title)}</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}"
        "td.num{text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Runs</h2><ul>",
        *(f"<li><b>{e(t.label)}</b>: {e(str(t.directory.resolve()))}</li>" for t in traces),
        "</ul>",
        f'<p><a href="{e(png.name)}"><img alt="curves" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}"></a></p>',
        "<h2>Final metrics</h2><table><tr><th>run</th>",
        *(f"<th>{e(c)}</th>" for c in columns),
        "</tr>",
    ]
    for trace, final in zip(traces, finals):
        cells = "".join(f'<td class="num">{_format(final[c]) if c in final else ""}</td>' for c in columns)
        parts.append(f"<tr><td>{e(trace.label)}</td>{cells}</tr>")
    parts.append("</table><h2>Events</h2><table><tr><th>run</th><th>step</th><th>event</th><th>details</th></tr>")
    for trace in traces:
        for event in trace.events:
            details = {k: v for k, v in event.items() if k not in ("step", "event", "time")}
            text = json.dumps(details, default=str)
            parts.append(
                f'<tr><td>{e(trace.label)}</td><td class="num">{e(str(event.get("step")))}</td>'
                f"<td>{e(str(event.get('event')))}</td><td>{e(text[:300])}</td></tr>"
            )
    parts.append("</table></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def report(
    run_dirs: list[str | Path], labels: list[str] | None = None, out: str | Path | None = None, x: str = "step"
) -> tuple[Path, Path]:
    """Write report.png and report.html for the runs (the first one's `report/` by default); their paths."""
    if x not in ("step", "tokens"):
        raise UserError(f"lit-open report: x={x!r} is not an axis; choose step or tokens.")
    if labels and len(labels) != len(run_dirs):
        raise UserError(
            f"lit-open report: labels= names {len(labels)} runs but there are {len(run_dirs)} (run.dir and compare)."
        )
    traces = [read_trace(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if x == "tokens" and not any("train/tokens" in t.columns() for t in traces):
        raise UserError("lit-open report: x=tokens needs the train/tokens column, which no run's metrics.csv has.")
    out = Path(out).expanduser() if out is not None else traces[0].directory / "report"
    png = draw(traces, out / "report.png", x)
    return png, write_html(traces, png, out / "report.html")


def report_command(args: list[str]) -> None:
    cfg = load_command_config("report", args)
    png, page = report([cfg.run.dir, *cfg.compare], labels=cfg.labels, out=cfg.out, x=cfg.x)
    print(f"wrote {png}\nwrote {page}")
