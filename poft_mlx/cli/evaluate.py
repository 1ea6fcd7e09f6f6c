"""`poft-mlx eval`: the base model and runs side by side on held-out data (likelihood, and with
--generate or --lm-eval generated answers or lm-evaluation-harness tasks).

The flags of flags.py that apply (--model, --aligned, --batch-size, --max-seq-length, ...)
override every model's config; --data takes a file or mlx-lm's data folder (its test.jsonl),
and --adapter-path adds a run as mlx-lm names its adapters (RUN/adapters)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from ..rundir import RunDir
from .common import config_options, echo_once, flag_options, heldout_file, load, print_config, run, run_config, \
    run_folder


@click.command("eval")
@config_options
@flag_options("eval")
@click.option("--data", default=None, metavar="SOURCE",
              help="Held-out data: a JSONL file, a folder with test.jsonl as mlx-lm's --data, hf:ID[:CONFIG]:SPLIT"
                   "[SLICE], Parquet, a saved data set (required unless --lm-eval is given).")
@click.option("--adapter-path", "adapter_paths", multiple=True, type=click.Path(exists=True),
              help="A run to evaluate, named by its adapters as in mlx-lm (RUN/adapters, or RUN itself; "
                   "repeatable; the same as giving RUN).")
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
@click.option("--stop-at-answer/--full-replies", default=True, show_default=True,
              help="With --generate and gsm8k answers: end each reply once it has given its final answer ('#### N').")
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
def eval_cmd(configs, overrides, flags, print_config_only, data, adapter_paths, base, json_out, gen, out_dir, answer,
             stop_at_answer, max_tokens, gen_batch_size, temperature, limit, lm_tasks, lm_eval_include, lm_eval_limit, lm_eval_fewshot,
             lm_eval_chat_template, runs):
    """Compare the base model and RUNS (run folders) on held-out data, side by side.

    \b
    poft-mlx eval --data data/ runs/poft runs/sft      (data/test.jsonl; mlx-lm's layout)
    poft-mlx eval --model M --data test.jsonl          (the base model alone)"""
    # lazy: keeps --help fast (mlx, the models and the harness load only for an evaluation)
    from ..evaluation.answers import jsonable, markdown, run_generation_eval
    from ..evaluation.likelihood import run_eval
    from ..evaluation.lm_eval import format_lm_eval_table, run_lm_eval
    from ..runtime.distributed import group, is_main

    runs = tuple(runs) + tuple(_adapter_run(p) for p in adapter_paths)
    data = run(heldout_file, data) if data is not None else None
    first = run_config(runs[0]) if runs else None
    models = {}
    if base:  # the target as it was before any stage: no init_adapters either
        cfg = load(configs, overrides, first, flags)
        models["base"] = (replace(cfg, init_adapters=None), None)
    for run_dir in runs:
        cfg = load(configs, overrides, run_config(run_dir), flags)
        models[str(run_dir)] = (cfg, str(RunDir(run_dir).adapters))
    if not models:
        raise click.UsageError("nothing to evaluate: give run folders and/or --base")
    if print_config_only:  # one YAML document per model
        for i, (name, (cfg, _)) in enumerate(models.items()):
            if i:
                click.echo("---")
            print_config(cfg, title=name)
        return
    if data is None and (gen or not lm_tasks):
        raise click.UsageError("Missing option '--data' (held-out JSONL)" + ("" if gen else " or --lm-eval TASKS"))
    if (gen or lm_tasks) and group().size() > 1:
        flag = "--generate" if gen else "--lm-eval"
        raise click.UsageError(f"eval {flag} runs in one process (not under mlx.launch / mpirun)")
    rows = {name: {} for name in models}
    if gen:
        result = run(run_generation_eval, models, data, out_dir, answer=answer, max_tokens=max_tokens,
                     batch_size=gen_batch_size, temperature=temperature, limit=limit, stop_at_answer=stop_at_answer,
                     log=lambda m: click.echo(m, err=True))
        click.echo(markdown(result))
        click.echo(f"written: {Path(out_dir) / 'eval.md'}, eval.json, eval.html (the answers side by side)")
        rows = dict(result["models"])
    elif data is not None:
        rows = {name: run(run_eval, cfg, data, adapters) for name, (cfg, adapters) in models.items()}
        echo_once(format_table(rows))
    if lm_tasks:
        harness = run(run_lm_eval, models, lm_tasks.split(","), include_path=lm_eval_include,
                      limit=lm_eval_limit, num_fewshot=lm_eval_fewshot, chat_template=lm_eval_chat_template,
                      log=lambda m: click.echo(m, err=True))
        click.echo(format_lm_eval_table(harness))
        for name, tasks in harness.items():
            rows[name]["lm_eval"] = tasks
    if json_out and is_main():
        Path(json_out).write_text(json.dumps(jsonable(rows), indent=1))


def _adapter_run(path: str) -> str:
    run_dir = run_folder(path)
    if not RunDir(run_dir).is_run():
        raise click.BadParameter(f"{path} is not a run's adapters folder (RUN/adapters) nor a run folder",
                                 param_hint="'--adapter-path'")
    return run_dir


def format_table(rows: dict) -> str:
    """The likelihood metrics of every model, one row each (a metric no model has is left out)."""
    cols = ["ce", "ppl", "poft_loss", "tau_mean", "win_rate", "margin", "samples"]
    cols = [c for c in cols if any(c in r for r in rows.values())]
    width = max(len(k) for k in rows) + 2
    lines = ["model".ljust(width) + "".join(c.rjust(11) for c in cols)]
    for name, r in rows.items():
        cells = "".join((f"{r[c]:11.4f}" if isinstance(r.get(c), float) else str(r.get(c, "-")).rjust(11)) for c in cols)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)
