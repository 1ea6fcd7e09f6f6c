"""`poft-mlx score` as a library function: every aligned model's scores of the data, cached."""

from __future__ import annotations

import numpy as np

from ..config import Config
from ..data.prepare import check_inputs, log, prepare, target_renderer
from ..models.modeling import resolve
from ..runtime import distributed as dist
from .references import reference_scores, score_all


def run_score(cfg: Config, files: list[str] | None = None) -> dict:
    """Score the training (and validation) data with every aligned model; cached."""
    from mlx_lm.utils import load_tokenizer  # lazy: mlx-lm's import is slow

    check_inputs(cfg, aligned_for="poft")
    dist.set_timeout(cfg.system.peer_timeout_s)
    tok = load_tokenizer(resolve(cfg.model))
    renderer = target_renderer(tok, cfg)
    files = files or [f for f in (cfg.data.train, cfg.data.valid) if f]
    out = {}
    group = dist.group()
    for f in files:
        prep = prepare(f, renderer, cfg)
        handles = score_all(cfg, prep.samples, group=group, log=log)
        r_ref, per_model = reference_scores(handles, prep.samples)
        out[f] = {"samples": len(prep.samples), "r_ref_mean": float(np.mean(r_ref)),
                  **{f"r[{k}]": float(np.mean(v)) for k, v in per_model.items()}}
    return out
