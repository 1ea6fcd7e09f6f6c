"""The training curves of one or several runs, from their metrics.jsonl.

One panel per metric (loss, cross-entropy, mean tau, win rate, learning rate) against the step,
the panels sharing their step axis; one colour per run, training reports as solid lines and
validation passes as dashed lines with dots. A metric a run does not log is left out for that run
(an SFT run without aligned models has no tau and no win rate; validation has no learning rate).
The values are rundir.read_metrics', the reader behind the model card. Writes PNG and SVG.
Needs matplotlib (pip install 'poft-mlx[plot]'). The command is cli/report.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, MissingExtra
from ..rundir import RunDir, read_metrics

PANELS = (
    ("loss", "loss (each run's objective)"),
    ("ce", "cross-entropy (nats per token)"),
    ("tau_mean", "tau, mean PoFT weight"),
    ("win_rate", "win rate vs the aligned models"),
    ("lr", "learning rate"),
)
SPLITS = {
    "train": {"label": "train", "linestyle": "-", "linewidth": 1.6},
    "val": {"label": "validation", "linestyle": "--", "linewidth": 1.2, "marker": "o", "markersize": 3.5},
}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MISSING_MATPLOTLIB = "plotting needs matplotlib: pip install 'poft-mlx[plot]' (or pip install matplotlib)"


def curves(run: str | Path) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """{(metric, split): (steps, values)} for the PANELS metrics RUN logs, in the order logged."""
    out: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for record in read_metrics(run):
        split = str(record["split"])
        if split not in SPLITS or "step" not in record:
            continue
        for metric, _ in PANELS:
            if metric in record:
                steps, values = out.setdefault((metric, split), ([], []))
                steps.append(record["step"])
                values.append(record[metric])
    return out


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, or the path as given where two runs share a name."""
    names = [Path(r).resolve().name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def figure(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> Any:
    """A matplotlib Figure of the runs' curves. Each curve is a Line2D whose gid is
    "LABEL|SPLIT|METRIC"; raises DataError for a run with no metrics."""
    try:  # lazy: an optional extra
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FormatStrFormatter, MaxNLocator
    except ImportError:
        raise MissingExtra(MISSING_MATPLOTLIB) from None
    labels = list(labels) if labels is not None else run_labels(runs)
    data = []
    for run in runs:
        c = curves(run)
        if not c:
            raise DataError(f"{run}: no metrics to plot (no readable train/val records in {RunDir(run).metrics})")
        data.append(c)
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    grid = fig.subplots(2, 3, sharex=True)
    panels, legend_ax = list(grid.flat[:len(PANELS)]), grid.flat[-1]
    for ax, (metric, title) in zip(panels, PANELS):
        ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3)
        for i, (label, c) in enumerate(zip(labels, data)):
            for split, style in SPLITS.items():
                if (metric, split) in c:
                    steps, values = c[(metric, split)]
                    ax.plot(steps, values, color=COLORS[i % len(COLORS)], gid=f"{label}|{split}|{metric}",
                            **{k: v for k, v in style.items() if k != "label"}, label=f"{label} ({style['label']})")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
        if metric == "lr":
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    for ax in panels:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_tick_params(labelbottom=True)  # the panel above the legend too
        ax.set_xlabel("step")
    legend_ax.axis("off")
    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], linewidth=3, label=label) for i, label in enumerate(labels)]
    handles += [Line2D([], [], color="0.2", **{k: v for k, v in style.items() if k != "label"}, label=style["label"])
                for style in SPLITS.values()]
    legend_ax.legend(handles=handles, loc="center", frameon=False, fontsize=11, title="runs / split")
    fig.suptitle("Training curves: " + ", ".join(labels), fontsize=13)
    return fig


def plot_runs(runs: Sequence[str | Path], out: str | Path, *, svg: bool = False,
              labels: Sequence[str] | None = None) -> list[Path]:
    """Write the runs' curves to `out` (PNG, or SVG when it ends in .svg) and, with svg, an SVG
    beside it; returns the files written."""
    out = Path(out)
    fig = figure(runs, labels)
    paths = [out] + ([out.with_suffix(".svg")] if svg and out.suffix.lower() != ".svg" else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        kind = "svg" if path.suffix.lower() == ".svg" else "png"
        # No date in the SVG: the same runs give the same file.
        fig.savefig(path, format=kind, dpi=110, metadata={"Date": None} if kind == "svg" else None)
    return paths


def plot_if_possible(runs: Sequence[str | Path], out: str | Path, log: Callable[[str], Any] = print) -> Path | None:
    """plot_runs for a pipeline (the quickstart): without matplotlib, or with a run that logged
    nothing, says why and returns None instead of failing the work done."""
    try:
        path = plot_runs(runs, out)[0]
    except (MissingExtra, DataError) as e:
        log(f"no training curves: {e}")
        return None
    log(f"training curves: {path}")
    return path
