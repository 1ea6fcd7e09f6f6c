"""The `poft-mlx` command line: the click group, and every command registered on it.

One module per command family, each over the shared options and helpers in common.py:
train.py (score, train), evaluate.py (eval), report.py (report, plot), generate.py (generate,
chat), convert.py, export.py (fuse, export-peft, export-gguf, push), data.py (data gsm8k) and
quickstart.py. A command parses, loads the config, and calls one library function through
common.run; the library is imported inside the command, so `poft-mlx --help` stays fast.
"""

from __future__ import annotations

import click

import poft_mlx  # loads the optimised BLAS before mlx

from .convert import convert
from .data import data
from .evaluate import eval_cmd
from .export import export_gguf, export_peft, fuse, push
from .generate import chat, generate
from .quickstart import quickstart
from .report import plot, report
from .train import score, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(poft_mlx.__version__, prog_name="poft-mlx")
def main() -> None:
    """Preference-Oriented Supervised Fine-Tuning (PoFT) on MLX."""


for _command in (score, train, eval_cmd, data, quickstart, generate, chat, convert, fuse, export_peft, export_gguf,
                 push, report, plot):
    main.add_command(_command)
