"""`poft-mlx report` (score distributions, least likely samples, noise, tau, filtering) and
`poft-mlx plot` (training curves): what a scored data set and a run look like."""

from __future__ import annotations

from pathlib import Path

import click

from ..rundir import RunDir
from .common import config_options, load, run, run_config


@click.command("report")
@config_options
@click.option("--data", default=None, metavar="SOURCE",
              help="The scored data: a JSONL file, hf:ID[:CONFIG]:SPLIT[SLICE], Parquet, a saved data set... "
                   "(default: data.train).")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for scores.png, tau.png and report.json (default: RUN/report with --run, else poft-report).")
@click.option("--least", default=10, show_default=True, type=click.IntRange(0),
              help="List the N samples least likely under the aligned models.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="A training run folder: also report the per-sample PoFT weights tau under its adapters.")
@click.option("--keep-top", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="F",
              help="Write the records of the top fraction F by r_ref to --out (the paper keeps 0.4).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="The filtered JSONL for --keep-top.")
def report(configs, overrides, data, out_dir, least, run_dir, keep_top, out):
    """Distributions of the aligned models' scores on a scored data set, and more.

    Reads the scores that `poft-mlx score` cached (same -c/--set options); scores nothing.
    With --run, the run's config.yaml is the base configuration and -c/--set override it.
    """
    from ..evaluation.report import format_report, run_report  # lazy: keeps --help fast

    if keep_top is not None and not out:
        raise click.UsageError("--keep-top needs --out FILE")
    base = run_config(run_dir) if run_dir else None
    cfg = load(configs, overrides, base)
    out_dir = out_dir or (str(RunDir(run_dir).report) if run_dir else "poft-report")
    result = run(run_report, cfg, data, out_dir, least=least, run_dir=run_dir, keep=keep_top, keep_out=out)
    click.echo(format_report(result))


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image to write (.png or .svg). Default: RUN/curves.png for one run, curves.png for several.")
@click.option("--svg", is_flag=True, help="Also write an SVG beside the PNG.")
def plot(runs: tuple[Path, ...], out: Path | None, svg: bool) -> None:
    """Draw loss, CE, tau, win rate and learning rate against step for RUNS (run folders)."""
    from ..evaluation.plot import plot_runs  # lazy: keeps --help fast

    out = out or (RunDir(runs[0]).curves if len(runs) == 1 else Path("curves.png"))

    def write() -> list[Path]:
        try:
            return plot_runs(runs, out, svg=svg)
        except OSError as e:  # an unwritable place, a full disk: named in one line
            raise click.ClickException(f"cannot write {e.filename or out}: {e.strerror or e}") from None

    paths = run(write)
    click.echo("wrote " + ", ".join(str(p) for p in paths))
