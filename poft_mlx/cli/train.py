"""`poft-mlx score` and `poft-mlx train`: score the data with the aligned models, then train."""

from __future__ import annotations

import json
import sys

import click

from ..errors import Interrupted
from ..rundir import RunDir
from .common import config_options, echo_once, load, run, run_config


@click.command()
@config_options
def score(configs, overrides):
    """Score the data with every aligned model (cached; a second run scores nothing)."""
    from ..scoring.run import run_score  # lazy: keeps --help fast

    cfg = load(configs, overrides)
    result = run(run_score, cfg)
    echo_once(json.dumps(result, indent=1))


@click.command()
@config_options
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the run in this folder from its latest checkpoint.")
def train(configs, overrides, resume):
    """Train the target with PoFT (or SFT / DPO) using LoRA, DoRA or full fine-tuning."""
    from ..training.run import run_train  # lazy: keeps --help fast

    base = None
    if resume:
        base = run_config(resume)
        base["run_dir"] = str(resume)
    cfg = load(configs, overrides, base)
    try:
        # Observers of the loop (training.loop.Callback) from a program that invokes the CLI:
        # main(obj={"callbacks": [...]}), e.g. click's CliRunner.invoke(main, args, obj=...).
        callbacks = (click.get_current_context().obj or {}).get("callbacks", ())
        run_dir = run(run_train, cfg, resume=bool(resume), callbacks=callbacks)
    except Interrupted as e:  # not a PoftError: a checkpoint was saved, the run goes on with --resume
        echo_once(f"\n{e}\nresume with: poft-mlx train --resume {cfg.run_dir}", err=True)
        sys.exit(130)
    adapters = RunDir(run_dir).adapters
    echo_once(f"adapters: {adapters}  (mlx_lm.generate --model <target> --adapter-path {adapters})")
