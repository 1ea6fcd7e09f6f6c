"""Records read from their sources, checked and fitted to max_seq_length with the target's chat template."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from ..config import Config
from ..errors import ConfigError, DataError
from ..runtime.distributed import is_main
from . import sources
from .batched import fit_many
from .encoding_cache import STATUSES, EncodingCache, MemoryWriter, home, key_desc
from .render import Renderer


def log(msg: str) -> None:
    """A progress line on stderr, from rank 0 only (every rank runs the same program)."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    samples: list
    encodings: list  # of render.Encoded (an encoding_cache.EncodingTable)
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


def prepare(spec, renderer: Renderer, cfg: Config, log=log, *, key: str = "data.train",
            cache: bool = True) -> Prepared:
    """Read, check, and fit every record of `spec` (any data source, data/sources.py) to
    max_seq_length with the target's template. key: the config key it came from (its default split).

    The encodings come from the encoding cache when it holds this data, tokenizer and settings
    (data/encoding_cache.py), else they are computed (data/batched.fit_many) and stored there;
    cache=False, or a streamed source (nothing local names its content), computes them only."""
    loaded = sources.load_records(spec, cfg.data, seed=cfg.train.seed, key=key)
    name = sources.describe(spec)
    records = loaded.records
    store = _cache_for(spec, renderer, cfg, key) if cache else None
    entry = store.load(len(records)) if store is not None else None
    if store is not None and store.problem:
        log(store.problem)
    if entry is None:
        entry = _encode(records, renderer, cfg, store)
    statuses = [STATUSES[int(k)] for k in entry.status]
    # shortened: a conversation cut in a later prompt keeps the replies before it, whole.
    counts = {"records": len(records), **{k: statuses.count(k) for k in STATUSES},
              "shortened_records": [s.source for s, k in zip(records, statuses) if k == "shortened"],
              "dropped_records": [s.source for s, k in zip(records, statuses) if k == "dropped"],
              "sources": loaded.report}
    samples = [_fitted(s, entry.fitted.get(i)) for i, (s, k) in enumerate(zip(records, statuses)) if k != "dropped"]
    if not samples:
        raise DataError(f"{name}: every record was dropped (max_seq_length={cfg.data.max_seq_length})")
    if len(loaded.report) > 1:
        for r in loaded.report:
            log(f"  {r['source']}: {r['records']} records, weight {r['weight']:g} -> {r['drawn']} drawn")
    log(f"{name}: {counts['records']} records, {counts['truncated']} truncated, "
        f"{counts['shortened']} shortened to their earlier replies, {counts['dropped']} dropped "
        f"(max_seq_length {cfg.data.max_seq_length}, policy {cfg.data.overlength})")
    return Prepared(samples, entry.table, counts)


def _cache_for(spec, renderer: Renderer, cfg: Config, key: str) -> EncodingCache | None:
    if cfg.data.streaming and any(e.path.startswith("hf:") for e in sources.entries(spec, cfg.data)):
        return None
    data = sources.fingerprint(spec, cfg.data, seed=cfg.train.seed, key=key)
    desc = key_desc(data, renderer, key=key, max_len=cfg.data.max_seq_length, policy=cfg.data.overlength,
                    earlier_replies=True)
    return EncodingCache(home() / "encodings", desc)


def _encode(records: list, renderer: Renderer, cfg: Config, store: EncodingCache | None):
    """Fit every record (fit_many), streamed into a new cache entry (or an in-memory one)."""
    writer = store.writer() if store is not None else MemoryWriter()
    try:
        fits = fit_many(records, renderer, cfg.data.max_seq_length, cfg.data.overlength, earlier_replies=True)
        for s, (new, enc, status) in zip(records, fits):
            if new is not None and enc.n_target == 0:
                raise DataError(f"{s.source}: no supervised token after rendering with the target's template")
            writer.add(s, new, enc, status)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def _fitted(sample, fitted: dict | None):
    """The record as fitted: itself, or its cut text (an entry's `fitted`)."""
    if fitted is None:
        return sample
    if fitted.get("text") is not None:
        return replace(sample, text=fitted["text"], meta=fitted["meta"])
    return replace(sample, messages=fitted["messages"], meta=fitted["meta"])
