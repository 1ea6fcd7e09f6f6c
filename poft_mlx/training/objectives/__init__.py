"""Training objectives: each one a class in its own module of this package, found by name.

An objective is a pure function of per-sample log-likelihoods (float32 reductions) plus what
the trainer, the metric meter and the distributed reductions need to know about it, so that
none of them switches on objective names:

    loss(lp_sum, n_tok, ref, norm)   (loss, metric sums) for the rows of one micro-batch
    normaliser                       "samples" or "tokens": what `norm` counts over a step's rows
    reductions                       every metric sum it reports -> "sum", "min" or "max"
    summary(sums)                    metric sums -> the means that are logged
    display                          the logged keys shown in a log line
    needs_aligned, pairs             what data it trains on (aligned scores; preference pairs)

Inputs per row i: lp_sum[i] = summed log p(y_t | ...) over the supervised tokens, n_tok[i] =
their count, ref[i] = the reference quantity the objective compares with (aligned scores for
PoFT, the frozen model's log-likelihoods for DPO; NaN where unknown). `loss` is a sum over
the local rows divided by `norm`, the count over the whole global batch, so gradients summed
over data-parallel ranks equal the single-process gradient.

Adding an objective: a module in this package with a subclass decorated @register; the
package imports every module in it, so nothing else changes (tests/test_objectives.py
shows one defined in a test).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, MetricMeter, Objective, build, register


def _discover() -> None:
    """Import every module of this package: each registers its objective."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


_discover()

from .dpo import Dpo, dpo_loss  # noqa: E402  (the built-in objectives, importable from here)
from .poft import Poft, poft_loss, sequence_scores  # noqa: E402
from .sft import Sft, sft_loss  # noqa: E402

__all__ = ["Objective", "REGISTRY", "register", "build", "MetricMeter", "Poft", "Sft", "Dpo",
           "poft_loss", "sft_loss", "dpo_loss", "sequence_scores"]
