"""The command line: one module per command family over the shared options in common.py."""

from .main import main

__all__ = ["main"]
