"""The Objective base class, the registry and the metric meter (see the package docstring)."""


from __future__ import annotations

import math
from typing import ClassVar, Mapping

import numpy as np

from ...errors import ConfigError

REGISTRY: dict[str, type["Objective"]] = {}
IDENTITY = {"sum": 0.0, "min": math.inf, "max": -math.inf}
REDUCE = {"sum": lambda a, b: a + b, "min": min, "max": max}


class Objective:
    """Base class; subclasses set the class attributes and define loss() and summary()."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, e.g. for the model card
    normaliser: ClassVar[str] = "samples"  # or "tokens"
    needs_aligned: ClassVar[bool] = False  # training needs aligned-model scores (config `aligned`)
    pairs: ClassVar[bool] = False  # trains on preference pairs (prompt / chosen / rejected)
    reductions: ClassVar[Mapping[str, str]] = {}
    display: ClassVar[tuple[str, ...]] = ("loss",)

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        """The objective with its hyperparameters from a Config."""
        return cls()

    @classmethod
    def hyperparameters(cls, config: dict) -> dict:
        """The settings this objective uses, from a run's config as a mapping (config.yaml;
        the model card states them)."""
        return {}

    def loss(self, lp_sum, n_tok, ref, *, norm):
        raise NotImplementedError

    def __call__(self, lp_sum, n_tok, ref, *, norm):
        return self.loss(lp_sum, n_tok, ref, norm=norm)

    def norm(self, n_tokens: np.ndarray) -> float:
        """The normaliser of a step over rows with `n_tokens` supervised tokens each."""
        if self.normaliser == "tokens":
            return float(np.sum(n_tokens))
        return float(len(n_tokens))

    def summary(self, sums: dict) -> dict:
        raise NotImplementedError

    def format(self, metrics: dict) -> str:
        """A log line: the display keys that have a number."""
        return " | ".join(f"{k} {metrics[k]:.4f}" for k in self.display
                          if isinstance(metrics.get(k), float) and metrics[k] == metrics[k])


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` the objective called `cls.name`."""
    unknown = set(cls.reductions.values()) - set(REDUCE)
    if unknown:
        raise TypeError(f"objective {cls.name}: reductions must be sum, min or max, not {sorted(unknown)}")
    if cls.normaliser not in ("samples", "tokens"):
        raise TypeError(f"objective {cls.name}: normaliser must be 'samples' or 'tokens'")
    REGISTRY[cls.name] = cls
    return cls


def build(cfg) -> Objective:
    """The objective `cfg.objective` names, configured from `cfg`; ConfigError for an unknown name."""
    if cfg.objective not in REGISTRY:
        raise ConfigError(f"objective: {cfg.objective!r} is not one of {', '.join(map(repr, sorted(REGISTRY)))}")
    return REGISTRY[cfg.objective].from_config(cfg)


class MetricMeter:
    """Accumulates an objective's metric sums over batches (each by its reduction)."""

    def __init__(self, reductions: Mapping[str, str], sums: dict | None = None):
        self.reductions = dict(reductions)
        self.sums: dict[str, float] = dict(sums or {})

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = float(v.item() if hasattr(v, "item") else v)
            how = self.reductions.get(k, "sum")
            self.sums[k] = REDUCE[how](self.sums.get(k, IDENTITY[how]), v)
