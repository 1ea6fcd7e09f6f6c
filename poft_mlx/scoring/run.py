"""`poft-mlx score` as a library function: every aligned model's scores of the data, cached."""

from __future__ import annotations

import numpy as np

from ..config import Config
from ..data.prepare import check_inputs, log, prepare, target_renderer
from ..data.sources import describe
from ..models.modeling import resolve
from ..runtime import distributed as dist
from .references import reference_scores, score_all


def run_score(cfg: Config, files: list | None = None) -> dict:
    """Score the training (and validation) data with every aligned model; cached. files: other
    data sources instead (data/sources.py); the result is keyed by each one's description."""
    from mlx_lm.utils import load_tokenizer  # lazy: mlx-lm's import is slow

    check_inputs(cfg, aligned_for="poft")
    dist.set_timeout(cfg.system.peer_timeout_s)
    tok = load_tokenizer(resolve(cfg.model))
    renderer = target_renderer(tok, cfg)
    keyed = [("data.train", f) for f in files] if files else [
        (k, f) for k, f in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)) if f]
    out = {}
    group = dist.group()
    for key, f in keyed:
        prep = prepare(f, renderer, cfg, key=key)
        handles = score_all(cfg, prep.samples, group=group, log=log)
        r_ref, per_model = reference_scores(handles, prep.samples)
        out[describe(f)] = {"samples": len(prep.samples), "r_ref_mean": float(np.mean(r_ref)),
                            **{f"r[{k}]": float(np.mean(v)) for k, v in per_model.items()}}
    return out
