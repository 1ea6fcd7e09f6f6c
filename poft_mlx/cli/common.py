"""What every command shares: the -c/--set options and the flags (flags.py), loading a config,
running library code.

`run(fn, ...)` is the one place where an exception becomes a message: a PoftError (errors.py,
a problem the user can fix) is printed as one line, `Error: ...`, with exit code 1; a full disk
in a write that has no message of its own is told the same way. Anything else is a bug and
keeps its traceback. Command modules import from here only, never from each other or main.py.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

import poft_mlx  # noqa: F401  (loads the optimised BLAS before mlx)

from ..config import load_config, read_yaml, to_dict
from ..errors import PoftError
from ..rundir import RunDir
from ..runtime.diskspace import is_disk_full, message
from .flags import Given, flag_options, heldout_file, run_folder  # noqa: F401  (the commands' flags)

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


def run(fn, *args, **kwargs):
    """Call library code; a user error becomes one clear message, a bug keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except PoftError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a full disk in a write without its own message: still one line
        if not is_disk_full(e):
            raise
        raise click.ClickException(message(e.filename or "a file", None)) from None


def echo_once(msg: str, **kwargs) -> None:
    """Print on rank 0 only: under mlx.launch / mpirun every rank runs the command."""
    from ..runtime.distributed import is_main  # lazy: loads mlx; keeps --help fast

    if is_main():
        click.echo(msg, **kwargs)


def load(configs, overrides, base: dict | None = None, flags: Given | None = None):
    """The Config from the defaults, `base` (a run's config), the -c files, the flags and the
    --set overrides, in that order (flags.py)."""
    def resolve():
        if flags is None or not flags.items:
            return load_config(list(configs), list(overrides), base=base)
        tree = flags.apply(to_dict(load_config(list(configs), [], base=base)))
        return load_config([], list(overrides), base=tree)

    return run(resolve)


def print_config(cfg, title: str | None = None) -> None:
    """--print-config: the resolved config as YAML, as the run folder's config.yaml holds it."""
    click.echo((f"# {title}\n" if title else "") + yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)


def run_config(run_dir: str | Path) -> dict:
    """RUN_DIR/config.yaml as a mapping, for a command that continues or reads a run; one line
    naming the file when it is missing or is not valid YAML."""
    return run(read_yaml, RunDir(run_dir).config)
