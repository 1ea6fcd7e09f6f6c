"""Records read from their sources, checked and fitted to max_seq_length with the target's chat template."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..config import Config
from ..errors import ConfigError, DataError
from ..runtime.distributed import is_main
from . import sources
from .render import Renderer, fit_length


def log(msg: str) -> None:
    """A progress line on stderr, from rank 0 only (every rank runs the same program)."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    samples: list
    encodings: list
    report: dict


def target_renderer(tokenizer, cfg: Config) -> Renderer:
    """The target's renderer, as training renders its data (a target without a chat template
    can still train on text records; a conversation then asks for one)."""
    return Renderer(tokenizer, chat_template=cfg.chat_template, span=cfg.data.span,
                    template_kwargs=cfg.data.template_kwargs, label=f"target {cfg.model}", require_template=False)


def check_inputs(cfg: Config, *, aligned_for: str | None = None) -> None:
    """The settings a run (or scoring) cannot start without, checked before anything loads;
    aligned_for: the objective that needs aligned models, if one does."""
    if not cfg.model:
        raise ConfigError("no target model: --model M (or `model` in the config, or --set model=M)")
    if not cfg.data.train:
        raise ConfigError("no training data: --data D (or data.train in the config, or --set data.train=D)")
    if aligned_for and not cfg.aligned:
        raise ConfigError(f"objective {aligned_for} needs at least one aligned model (config key `aligned`)")
    for key in ("data.train", "data.valid"):
        spec = getattr(cfg.data, key.split(".")[1])
        if spec:
            sources.check(spec, cfg.data, key)


def prepare(spec, renderer: Renderer, cfg: Config, log=log, *, key: str = "data.train") -> Prepared:
    """Read, check, and fit every record of `spec` (any data source, data/sources.py) to
    max_seq_length with the target's template. key: the config key it came from (its default split)."""
    loaded = sources.load_records(spec, cfg.data, seed=cfg.train.seed, key=key)
    name = sources.describe(spec)
    samples, encodings = [], []
    # shortened: a conversation cut in a later prompt keeps the replies before it, whole.
    counts = {"records": 0, "ok": 0, "truncated": 0, "shortened": 0, "dropped": 0,
              "shortened_records": [], "dropped_records": [], "sources": loaded.report}
    for s in loaded.records:
        counts["records"] += 1
        fitted, enc, status = fit_length(s, renderer, cfg.data.max_seq_length, cfg.data.overlength,
                                         earlier_replies=True)
        counts[status] += 1
        if status == "shortened":
            counts["shortened_records"].append(s.source)
        if fitted is None:
            counts["dropped_records"].append(s.source)
            continue
        if enc.n_target == 0:
            raise DataError(f"{s.source}: no supervised token after rendering with the target's template")
        samples.append(fitted)
        encodings.append(enc)
    if not samples:
        raise DataError(f"{name}: every record was dropped (max_seq_length={cfg.data.max_seq_length})")
    if len(loaded.report) > 1:
        for r in loaded.report:
            log(f"  {r['source']}: {r['records']} records, weight {r['weight']:g} -> {r['drawn']} drawn")
    log(f"{name}: {counts['records']} records, {counts['truncated']} truncated, "
        f"{counts['shortened']} shortened to their earlier replies, {counts['dropped']} dropped "
        f"(max_seq_length {cfg.data.max_seq_length}, policy {cfg.data.overlength})")
    return Prepared(samples, encodings, counts)
