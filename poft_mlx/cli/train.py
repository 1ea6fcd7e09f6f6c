"""`poft-mlx score` and `poft-mlx train`: score the data with the aligned models, then train.

Both take mlx-lm's flags (`--model M --aligned A --data D --iters N ...`, flags.py) besides
-c and --set, and `--print-config` shows what a run would use without running it."""

from __future__ import annotations

import json
import sys

import click

from ..errors import Interrupted
from ..rundir import RunDir
from .common import config_options, echo_once, flag_options, load, print_config, run, run_config


@click.command()
@config_options
@flag_options("score")
def score(configs, overrides, flags, print_config_only):
    """Score the data with every aligned model (cached; a second run scores nothing)."""
    from ..scoring.run import run_score  # lazy: keeps --help fast

    cfg = load(configs, overrides, flags=flags)
    if print_config_only:
        return print_config(cfg)
    result = run(run_score, cfg)
    echo_once(json.dumps(result, indent=1))


@click.command()
@config_options
@flag_options("train")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the run in this folder from its latest checkpoint.")
def train(configs, overrides, flags, print_config_only, resume):
    """Train the target with PoFT (or SFT / DPO) using LoRA, DoRA or full fine-tuning.

    \b
    poft-mlx train --model M --aligned A1 --aligned A2 --data DIR --iters 200
    poft-mlx train -c cfg.yaml --learning-rate 2e-4 --set train.warmup_steps=10
    Precedence: defaults < the run's config (--resume) < -c files < flags < --set."""
    from ..training.run import run_train  # lazy: keeps --help fast

    base = None
    if resume:
        base = run_config(resume)
        base["run_dir"] = str(resume)
    cfg = load(configs, overrides, base, flags)
    if print_config_only:
        return print_config(cfg)
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
