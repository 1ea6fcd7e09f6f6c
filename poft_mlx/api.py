"""The Python API: what the commands do, as functions for notebooks and scripts.

    import poft_mlx as pm

    cfg = pm.configure(model="pypi:gemma-3-270m", chat_template="gemma",
                    aligned=["pypi:qwen2.5-coder-0.5b-instruct"],
                    data={"train": "data/train.jsonl", "valid": "data/valid.jsonl"},
                    train={"iters": 20}, run_dir="runs/poft")
    pm.score(cfg)                                  # aligned-model scores, cached
    run = pm.train(cfg)                            # PoFT (cfg.objective), returns the run folder
    sft = pm.train(pm.configure(base=cfg, objective="sft", run_dir="runs/sft"))
    pm.evaluate(cfg, "data/test.jsonl", runs=[run, sft])            # CE, tau, win rate
    pm.compare(cfg, "data/test.jsonl", runs=[run, sft], out="eval")  # generated answers side by side
    pm.generate(run, ["What is 15% of 80?"])
    pm.fuse(run, "fused/"); pm.push("fused/", "me/my-model", dry_run=True)

Every function takes a Config (pm.configure builds or loads one, with the same checks and errors
as the CLI: poft_mlx.errors.PoftError subclasses that name the key, file or record) and
returns plain data (dicts, lists, paths). Nothing here prints unless asked (`log=`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .config import Config, load_config, merge_trees, read_yaml, set_dotted
from .errors import ConfigError
from .evaluation.answers import gsm8k_answer_end, markdown, run_generation_eval
from .evaluation.likelihood import run_eval
from .export.fuse import fuse_run
from .export.hub import push as hub_push
from .models.generation import generate as generate_replies
from .models.generation import open_generator
from .rundir import RunDir
from .scoring.run import run_score
from .training.loop import Callback
from .training.run import run_train

__all__ = ["Config", "Callback", "configure", "run_config", "score", "train", "evaluate", "compare", "table",
           "generate", "fuse", "push"]


def _flatten(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and prefix not in ("data.template_kwargs",):
        for k, v in value.items():
            yield from _flatten(f"{prefix}.{k}" if prefix else k, v)
    else:
        yield prefix, value


def configure(*files: str | Path, base: dict | Config | None = None, **settings: Any) -> Config:
    """A Config from YAML `files` (applied in order over the defaults, as `-c`), then `settings`
    as keyword arguments: top-level keys (`model=`, `objective=`) and sections as dicts
    (`train={"iters": 20}`, merged key by key over what the files set). Aligned models may be
    given as a list of references. Raises ConfigError naming the key of a bad value."""
    tree: dict = {}
    if base is not None:
        tree = dataclasses.asdict(base) if isinstance(base, Config) else dict(base)
    for path in files:
        tree = merge_trees(tree, read_yaml(path))
    aligned = settings.pop("aligned", None)
    for key, value in settings.items():
        for dotted, v in _flatten(key, value):
            set_dotted(tree, dotted, v)
    if aligned is not None:
        tree["aligned"] = [a if isinstance(a, dict) else {"model": str(a)} for a in aligned]
    return load_config(base=tree)


def run_config(run: str | Path) -> Config:
    """The resolved Config a run folder was trained with (its config.yaml)."""
    return load_config(base=read_yaml(RunDir(run).config))


def score(cfg: Config, files: Sequence[str] | None = None) -> dict:
    """Score the training (and validation) data, or `files`, with every aligned model; cached
    (a second call scores nothing). Returns, per file, the sample count and mean scores."""
    return run_score(cfg, list(files) if files else None)


def train(cfg: Config, *, resume: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """Train the target with cfg.objective (poft, sft, dpo, or one registered in
    poft_mlx/training/objectives/); returns the run folder. `callbacks` observe the loop
    (poft_mlx.Callback: on_step_end, on_report, on_eval, ...). resume: continue cfg.run_dir
    from its latest checkpoint."""
    return run_train(cfg, resume=resume, callbacks=callbacks)


def evaluate(cfg: Config, data: str, runs: Sequence[str | Path] = (), *, base: bool = True) -> dict[str, dict]:
    """Likelihood metrics on held-out `data` (CE, perplexity; PoFT loss, tau and win rate when
    cfg has aligned models) for the base model and each run folder, keyed by name."""
    out = {}
    if base:
        out["base"] = run_eval(dataclasses.replace(cfg, init_adapters=None), data, None)
    for run in runs:
        out[str(run)] = run_eval(run_config(run), data, str(RunDir(run).adapters))
    return out


def compare(cfg: Config, data: str, runs: Sequence[str | Path] = (), *, out: str | Path = "eval",
            base: bool = True, answer: str = "auto", max_tokens: int = 256, batch_size: int = 8,
            temperature: float = 0.0, limit: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Generate a reply to every held-out prompt with the base model and each run, and compare:
    accuracy (answer="gsm8k", "re:PATTERN", "none" or "auto"), the aligned models' likelihood of
    the replies, reply length, with paired bootstrap intervals. Writes eval.md, eval.json and
    eval.html (the answers side by side) to `out`; returns the summary."""
    models = {"base": (dataclasses.replace(cfg, init_adapters=None), None)} if base else {}
    for run in runs:
        models[str(run)] = (run_config(run), str(RunDir(run).adapters))
    return run_generation_eval(models, data, out, answer=answer, max_tokens=max_tokens, batch_size=batch_size,
                               temperature=temperature, limit=limit, log=log or (lambda m: None))


def table(summary: dict) -> str:
    """compare()'s summary as Markdown tables (accuracy, aligned log-lik, CE..., with intervals)."""
    return markdown(summary)


def generate(source: str | Path, prompts: Sequence[str | list[dict]], *, max_tokens: int = 256,
             temperature: float = 0.0, batch_size: int = 8, chat_template: str | None = None,
             answer: str = "none") -> list[str]:
    """Replies of `source` (a run folder: its adapters and the template it trained with; a fused
    folder; any model reference) to each prompt (a string, or a conversation as a list of
    {"role", "content"} messages ending with the user's turn). answer="gsm8k" ends each reply
    once it has given its final answer ('#### N'), as `poft-mlx generate --answer gsm8k` does."""
    if answer not in ("none", "gsm8k"):
        raise ConfigError(f"answer {answer!r}: choose 'none' or 'gsm8k'")
    gen = open_generator(str(source), chat_template=chat_template)
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    replies = generate_replies(gen, conversations, max_tokens=max_tokens, temperature=temperature,
                               batch_size=batch_size, answer_end=gsm8k_answer_end if answer == "gsm8k" else None)
    return [r.text for r in replies]


def fuse(run: str | Path, out: str | Path, *, dequantize: bool = True, check: bool = True) -> Path:
    """Fuse a run's adapters into its base and write a Hugging Face model folder (checked against
    the adapters unless check=False; its tokenizer_config.json carries the run's template)."""
    fuse_run(run, out, dequantize=dequantize, check=check)
    return Path(out)


def push(path: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False) -> list:
    """Upload a fused or PEFT folder to the Hub with a model card (dry_run: show what would go)."""
    return hub_push(path, repo_id, private=private, dry_run=dry_run)
