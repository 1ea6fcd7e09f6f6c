"""The `poft-mlx` command line: a thin click layer over the library."""

from __future__ import annotations

import click

import poft_mlx  # noqa: F401  (loads the optimised BLAS before mlx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(poft_mlx.__version__, prog_name="poft-mlx")
def main() -> None:
    """Preference-Oriented Supervised Fine-Tuning (PoFT) on MLX."""


# Commands living in other modules register here, one line each.
def _register() -> None:
    pass


_register()
