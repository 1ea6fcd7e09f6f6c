"""The flag-first command line: mlx-lm's flag names, each mapped onto keys of the one typed config.

    poft-mlx train --model M --aligned A1 --aligned A2 --data D --iters 200

needs no YAML file. Every flag is an override of one or a few dotted keys of config.py's
dataclasses (TABLE below): its value is cast by that key's own type and checked by its bounds,
so a bad value is a one-line error naming the flag and the key, and `--help` shows the key and
its default from the dataclass. Nothing here holds a default of its own.

Precedence, lowest first: the dataclass defaults; a run's config.yaml (`train --resume RUN`,
each run folder `eval` compares); the -c files in order; the flags; the --set overrides in
order. So `-c base.yaml --learning-rate 1e-4 --set train.learning_rate=2e-4` trains at 2e-4.

Flags whose meaning is more than one key:

- `--data D`: a folder holding mlx-lm's split files (train.jsonl, valid.jsonl, test.jsonl)
  sets data.train, data.valid (null when the folder has no valid.jsonl) and data.test (where
  the config has that key); anything else (a file, or any other source data.train accepts) is
  data.train as given.
- `--adapter-path P`: where the adapters go, as in mlx-lm. Adapters live in RUN_DIR/adapters,
  so P names the run folder: `--adapter-path runs/x/adapters` is run_dir=runs/x (the adapters
  land in exactly P), and any other P (`runs/x`) is run_dir=P (adapters in P/adapters).
- `--epochs N`: train.epochs=N and train.iters=null (iters, when set, would win over epochs).
- `--report-to`: repeatable or comma-separated (mlx-lm's 'wandb,swanlab'); `none` clears it.

mlx-lm flags with no clean counterpart are left out rather than approximated:
`--resume-adapter-file` (poft-mlx resumes a whole run: `train --resume RUN_DIR`; a previous
stage's adapters are `--set init_adapters=...`, fused first), `--mask-prompt` (poft-mlx always
supervises replies only; data.span picks which), `--test` (use `poft-mlx eval`), and
`--lr-schedule`, `--clear-cache-threshold` (config keys with other shapes: use --set).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

import click

from ..config import Config, DataConfig, build, check_bounds
from ..errors import ConfigError

SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}  # mlx-lm's names


def data_keys(value: str) -> dict[str, Any]:
    """--data: a folder of mlx-lm split files -> data.train/valid/test; anything else -> data.train."""
    folder = Path(value)
    found = {split: folder / name for split, name in SPLIT_FILES.items() if (folder / name).is_file()}
    if not folder.is_dir() or not found:
        return {"data.train": value}
    has = {f.name for f in dataclasses.fields(DataConfig)}
    keys = {f"data.{split}": str(found[split]) if split in found else None for split in SPLIT_FILES if split in has}
    if "train" not in found:  # the data layer names the missing file, as for any data.train
        keys["data.train"] = str(folder / SPLIT_FILES["train"])
    return keys


def run_folder(adapter_path: str) -> str:
    """--adapter-path: the run folder whose adapters folder is (or is inside) `adapter_path`."""
    path = Path(adapter_path)
    if path.name == "adapters" and path.parent != Path("."):
        return str(path.parent)
    return str(path)


def heldout_file(value: str) -> str:
    """eval --data: any data source (a file, hf:ID:SPLIT, a saved data set...; data/sources.py),
    or a folder of mlx-lm split files (its test.jsonl). InputMissing / ConfigError naming --data."""
    from ..data.sources import check  # lazy: keeps --help fast

    folder = Path(value)
    if value.startswith("hf:") or not folder.is_dir() or not any(folder.glob("*.jsonl")):
        check(value, key="--data")
        return value
    if not (folder / SPLIT_FILES["test"]).is_file():
        raise ConfigError(f"--data: {folder} is a folder without {SPLIT_FILES['test']} (mlx-lm's test split)")
    return str(folder / SPLIT_FILES["test"])


def report_to_keys(values: list[str]) -> dict[str, Any]:
    """--report-to: repeatable and comma-separated (mlx-lm's 'wandb,swanlab'); `none` alone clears it."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return {"train.report_to": [] if names == ["none"] else names}


@dataclass(frozen=True)
class Mapped:
    """A flag that sets more than one key, or a key from a transformed value."""

    keys: Callable[[Any], dict[str, Any]]  # the flag's value -> {dotted key: value}
    sets: tuple[str, ...]  # the keys it may set (the first gives the value's type)


DATA = Mapped(data_keys, ("data.train", "data.valid", "data.test"))
RUN_DIR = Mapped(lambda v: {"run_dir": run_folder(v)}, ("run_dir",))
EPOCHS = Mapped(lambda v: {"train.epochs": v, "train.iters": None}, ("train.epochs", "train.iters"))
REPORT_TO = Mapped(report_to_keys, ("train.report_to",))

# flag -> the dotted key it sets, per command (None: not a flag of that command): a key, or a
# Mapped for the flags above.
TABLE: dict[str, tuple] = {
    # flag                         train                           score                eval
    "--model":                     ("model",                       "model",             "model"),
    "--aligned":                   ("aligned",                     "aligned",           "aligned"),
    "--chat-template":             ("chat_template",               "chat_template",     "chat_template"),
    "--data":                      (DATA,                          DATA,                None),  # eval: its own
    "--objective":                 ("objective",                   None,                None),
    "--fine-tune-type":            ("adapter.type",                None,                None),
    "--num-layers":                ("adapter.num_layers",          None,                None),
    "--batch-size":                ("train.batch_size",            "score.batch_size",  "score.batch_size"),
    "--learning-rate":             ("train.learning_rate",         None,                None),
    "--optimizer":                 ("train.optimizer",             None,                None),
    "--iters":                     ("train.iters",                 None,                None),
    "--epochs":                    (EPOCHS,                        None,                None),
    "--grad-accumulation-steps":   ("train.grad_accumulation_steps", None,              None),
    "--max-seq-length":            ("data.max_seq_length",         "data.max_seq_length", "data.max_seq_length"),
    "--seed":                      ("train.seed",                  None,                None),
    "--val-batches":               ("train.val_batches",           None,                None),
    "--steps-per-report":          ("train.steps_per_report",      None,                None),
    "--steps-per-eval":            ("train.steps_per_eval",        None,                None),
    "--save-every":                ("train.steps_per_save",        None,                None),
    "--grad-checkpoint":           ("train.grad_checkpoint",       None,                None),
    "--adapter-path":              (RUN_DIR,                       None,                None),  # eval: its own
    "--report-to":                 (REPORT_TO,                     None,                None),
    "--project-name":              ("train.project_name",          None,                None),
    "--trust-remote-code":         ("trust_remote_code",           "trust_remote_code", "trust_remote_code"),
}
COMMANDS = ("train", "score", "eval")
SWITCHES = {"--grad-checkpoint", "--trust-remote-code"}  # --X / --no-X
REPEATABLE = {"--aligned", "--report-to"}
METAVAR = {"--model": "MODEL", "--aligned": "MODEL", "--chat-template": "TEMPLATE", "--data": "PATH",
           "--adapter-path": "PATH", "--report-to": "NAMES", "--objective": "NAME", "--project-name": "NAME"}
HELP = {
    "--model": "The target model: a folder, a .gguf file, pypi:NAME or a Hub id.",
    "--aligned": "An aligned model (repeatable; replaces the config's list).",
    "--chat-template": "The target's chat template (a builtin name, a .jinja file or the text).",
    "--data": "A folder with train.jsonl / valid.jsonl / test.jsonl (as mlx-lm), or the training data.",
    "--objective": "poft, sft or dpo (any objective in training/objectives/).",
    "--fine-tune-type": "LoRA, DoRA or full fine-tuning.",
    "--num-layers": "Adapt the last N transformer blocks (-1: all).",
    "--batch-size": "Batch size.",
    "--learning-rate": "Peak learning rate.",
    "--optimizer": "Optimizer.",
    "--iters": "Optimizer steps (wins over epochs).",
    "--epochs": "Epochs (clears iters).",
    "--grad-accumulation-steps": "Micro-batches per optimizer step.",
    "--max-seq-length": "Longest sample in tokens (longer ones: data.overlength).",
    "--seed": "Seed of the data order, adapters and dropout.",
    "--val-batches": "Validation batches per evaluation (-1: the whole validation set).",
    "--steps-per-report": "Steps between train records in metrics.jsonl.",
    "--steps-per-eval": "Steps between validations.",
    "--save-every": "Steps between checkpoints.",
    "--grad-checkpoint": "Gradient checkpointing (less memory, more compute).",
    "--adapter-path": "Where the adapters go: RUN/adapters (or RUN) makes RUN the run folder.",
    "--report-to": "Experiment trackers: wandb, tensorboard, trackio (repeatable or comma-separated; none).",
    "--project-name": "The trackers' project name.",
    "--trust-remote-code": "Allow code from model repositories (off by default).",
}


@dataclass(frozen=True)
class Given:
    """The flags given on one command line: (flag, value) in TABLE's order."""

    command: str
    items: tuple = ()

    def keys(self, flag: str, value: Any) -> dict[str, Any]:
        spec = TABLE[flag][COMMANDS.index(self.command)]
        return spec.keys(value) if isinstance(spec, Mapped) else {spec: value}

    def apply(self, tree: dict) -> dict:
        """`tree` (a full config mapping) with every flag's keys set; ConfigError naming the flag."""
        for flag, value in self.items:
            if flag == "--objective":
                _check_objective(value)
            for key, v in self.keys(flag, value).items():
                _set(tree, key, v)
            try:  # the tree was valid before this flag, so a problem now is this flag's
                check_bounds(build(Config, tree))
            except ConfigError as e:
                raise ConfigError(f"{flag}: {e}") from None
        return tree


def _check_objective(name: str) -> None:
    """The config checks objective names only when training starts; a flag is checked now."""
    from ..training.objectives import REGISTRY  # lazy: loads mlx; keeps --help fast

    if name not in REGISTRY:
        raise ConfigError(f"--objective: {name!r} is not one of {', '.join(map(repr, sorted(REGISTRY)))}")


def _set(tree: dict, dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    for s in sections:
        tree = tree.setdefault(s, {})
    tree[name] = value


def field_of(dotted: str) -> tuple[Any, Any]:
    """(type, default) of a dotted config key, from the dataclasses."""
    cls, tp, default = Config, Config, None
    for part in dotted.split("."):
        tp = typing.get_type_hints(cls)[part]
        f = next(f for f in dataclasses.fields(cls) if f.name == part)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        cls = tp
    return tp, default


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return _metavar(typing.get_args(tp)[0])
    return {int: "INT", float: "FLOAT"}.get(tp, "TEXT")


def _param(flag: str) -> str:
    return "flag_" + flag[2:].replace("-", "_")  # apart from the command's own parameter names


def _option(flag: str, spec):
    if isinstance(spec, Mapped):
        tp, _ = field_of(spec.sets[0])
        where = ", ".join(spec.sets)
    else:
        tp, default = field_of(spec)
        where = spec + (f", default {default!r}" if default not in (None, [], {}) else "")
    help_text = f"{HELP[flag]} [{where}]"
    if flag in SWITCHES:
        return click.option(f"{flag}/--no-{flag[2:]}", _param(flag), default=None, help=help_text)
    return click.option(flag, _param(flag), multiple=flag in REPEATABLE, default=None,
                        metavar=METAVAR.get(flag) or _metavar(tp), help=help_text)


def flag_options(command: str) -> Callable:
    """Add TABLE's flags for `command` and --print-config; the command gets `flags: Given` and
    `print_config_only: bool` instead of one argument per flag."""
    column = COMMANDS.index(command)
    flags = [(flag, specs[column]) for flag, specs in TABLE.items() if specs[column] is not None]

    def decorate(fn):
        @functools.wraps(fn)
        def command_fn(*args, **kwargs):
            items = []
            for flag, _ in flags:
                value = kwargs.pop(_param(flag))
                if value is not None and value != ():
                    items.append((flag, list(value) if flag in REPEATABLE else value))
            if command == "train" and {"--iters", "--epochs"} <= {f for f, _ in items}:
                raise click.UsageError("--iters and --epochs: give one (iters would win over epochs)")
            return fn(*args, flags=Given(command, tuple(items)), **kwargs)

        for flag, spec in reversed(flags):
            command_fn = _option(flag, spec)(command_fn)
        return click.option("--print-config", "print_config_only", is_flag=True,
                            help="Print the resolved configuration as YAML and exit (nothing runs).")(command_fn)

    return decorate
