"""`poft-mlx quickstart`: PoFT vs SFT on noisy GSM8K, start to finish (recipes/quickstart.py)."""

from __future__ import annotations

import shlex

import click

from .common import run


@click.command()
@click.option("--out", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (a fresh -2, -3... suffix if it exists).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a quickstart config key.")
def quickstart(out, overrides):
    """PoFT vs SFT on noisy GSM8K with the offline default models, start to finish."""
    # lazy: keeps --help fast
    from ..evaluation.answers import markdown
    from ..recipes.quickstart import NOISE, example_answers, run_quickstart

    result = run(run_quickstart, out, list(overrides))
    ev = result["eval"]
    click.echo(f"\nHeld-out GSM8K questions ({ev['settings']['samples']}, clean), base vs PoFT vs SFT trained on "
               f"the same {NOISE:.0%}-noisy data. accuracy = final number right; aligned log-lik = the aligned "
               "model's token-mean log-likelihood of the generated reply (higher: closer to what it would say); "
               "CE/ppl on the reference answers (lower is better); tau = PoFT weight; win rate = share of samples "
               "where the target beats the aligned model.\n")
    click.echo(markdown(ev))
    click.echo("One example:\n" + example_answers(ev))
    poft = result["runs"]["poft"]
    click.echo(f"\nanswers side by side: {result['eval_dir'] / 'eval.html'}   tables: {result['eval_dir'] / 'eval.md'}")
    hint = result["hint"]
    click.echo(f"try it:  poft-mlx generate {poft} --answer gsm8k --max-tokens {hint['max_tokens']} "
               f"-p {shlex.quote(hint['question'])}")
    verdict = "right" if hint["correct"] else f"wrong: the answer is {hint['answer']}"
    click.echo(f"  in this run it answered: {' '.join(hint['reply'].split()) or '(empty reply)'}  "
               f"[{hint['given'] or 'no number'}: {verdict}]")
    click.echo(f"finished in {result['seconds'] / 60:.1f} min; everything is in {result['out']}")
