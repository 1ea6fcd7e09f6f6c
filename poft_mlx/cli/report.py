"""`poft-mlx report`: score distributions, least likely samples, noise, tau, filtering."""

from __future__ import annotations

from pathlib import Path

import click

from .main import _load, _run, config_options


@click.command("report")
@config_options
@click.option("--data", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The scored JSONL file (default: data.train).")
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
    from ..config import read_yaml
    from ..evaluation.report import format_report, run_report

    if keep_top is not None and not out:
        raise click.UsageError("--keep-top needs --out FILE")
    base = _run(read_yaml, Path(run_dir) / "config.yaml") if run_dir else None
    cfg = _load(configs, overrides, base)
    out_dir = out_dir or (str(Path(run_dir) / "report") if run_dir else "poft-report")
    result = _run(run_report, cfg, data, out_dir, least=least, run_dir=run_dir, keep=keep_top, keep_out=out)
    click.echo(format_report(result))
