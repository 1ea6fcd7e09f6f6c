"""`poft-mlx data`: poft-mlx JSONL from the data sets shipped on PyPI."""

from __future__ import annotations

import click

from .common import run


@click.group()
def data():
    """Make poft-mlx JSONL from data sets shipped on PyPI."""


@data.command("gsm8k")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=48, show_default=True)
@click.option("--valid", "n_valid", default=16, show_default=True)
@click.option("--test", "n_test", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--strip-calculator", is_flag=True, help="Remove the <<a*b=c>> calculator notes.")
@click.option("--max-answer-chars", type=click.IntRange(min=1), default=None,
              help="Keep only problems whose worked answer is at most this many characters (the shorter ones).")
@click.option("--noise", default=0.0, show_default=True,
              help="Share of the train split made noisy (mismatched replies, character edits), as in the "
                   "paper's noise ablation; the clean split is kept as train_clean.jsonl.")
def data_gsm8k(out_dir, n_train, n_valid, n_test, seed, strip_calculator, max_answer_chars, noise):
    """GSM8K question/answer pairs as chat records, split into train/valid/test."""
    from ..data.builtin import split_gsm8k  # lazy: keeps --help fast

    if not 0.0 <= noise <= 1.0:
        raise click.BadParameter(f"{noise}: a share between 0 and 1", param_hint="--noise")
    sizes = {k: n for k, n in (("train", n_train), ("valid", n_valid), ("test", n_test)) if n}
    paths = run(split_gsm8k, out_dir, sizes, seed=seed, strip_calculator=strip_calculator, noise=noise,
                max_answer_chars=max_answer_chars)
    for name, p in paths.items():
        n = sizes.get(name, n_train)
        click.echo(f"{name}: {p} ({n} records{f', {noise:.0%} noisy' if name == 'train' and noise else ''})")
