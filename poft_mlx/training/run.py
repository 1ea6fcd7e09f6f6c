"""`poft-mlx train` as a library function: score (cached mode), then train; returns the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import Config
from ..data.prepare import Prepared, check_inputs, log, prepare, target_renderer
from ..models import modeling
from ..runtime import distributed as dist
from ..scoring.references import ResidentReference, open_aligned, reference_scores, score_all
from . import objectives
from .batches import EncodedData
from .dpo import run_pairs
from .loop import build_optimizer, train
from .plan import plan
from .setup import create_run, finished
from .trackers import trackers_for


def encoded_data(prep: Prepared, cfg: Config, need_ref: bool) -> EncodedData:
    """Prepared records with their aligned scores r_ref (NaN when `need_ref` is false): scored
    now with score.on_missing=score, else read from the score cache."""
    r_ref = np.full(len(prep.samples), np.nan, np.float32)
    if need_ref:
        if cfg.score.on_missing == "score":
            handles = score_all(cfg, prep.samples, group=dist.group(), log=log)
        else:
            handles = [open_aligned(cfg, a) for a in cfg.aligned]
        r_ref = reference_scores(handles, prep.samples)[0].astype(np.float32)
    return EncodedData(prep.samples, prep.encodings, r_ref)


def run_train(cfg: Config, *, resume: bool = False, callbacks=()) -> Path:
    """Train the target with cfg.objective; returns the run folder. callbacks: loop.Callback observers
    (the trackers of train.report_to join them, for every objective)."""
    objective = objectives.build(cfg)
    callbacks = [*callbacks, *trackers_for(cfg)]  # a tracker that is not installed: an error now
    check_inputs(cfg, aligned_for=objective.name if objective.needs_aligned else None)
    if objective.pairs:
        return finished(run_pairs(cfg, objective, resume=resume, callbacks=callbacks))
    run, group = create_run(cfg, resume=resume)
    loaded = modeling.load(cfg.model, dtype=cfg.system.dtype, trust_remote_code=cfg.trust_remote_code)
    renderer = target_renderer(loaded.tokenizer, cfg)
    train_prep = prepare(cfg.data.train, renderer, cfg)
    val_prep = prepare(cfg.data.valid, renderer, cfg, key="data.valid") if cfg.data.valid else None
    if group.rank() == 0:
        report = {"train": train_prep.report, "valid": val_prep.report if val_prep else None}
        run.data_report.write_text(json.dumps(report, indent=1))
    resident = cfg.reference_mode == "resident" and bool(cfg.aligned)
    need_ref = bool(cfg.aligned) and not resident
    train_data = encoded_data(train_prep, cfg, need_ref)
    val_data = encoded_data(val_prep, cfg, bool(cfg.aligned)) if val_prep else None
    reference = ResidentReference(cfg) if resident else None
    mx.random.seed(cfg.train.seed)  # here: building models above draws random numbers too
    adapter_config = {"model": str(loaded.path), **modeling.apply_adapters(loaded.model, cfg.adapter)}
    adapter_config["poft_mlx"] = {"target": cfg.model, "objective": cfg.objective}
    total = plan(cfg.train, len(train_data)).total_steps
    optimizer = build_optimizer(cfg.train, total)
    log(f"training {cfg.model} with {cfg.objective} for {total} steps -> {run}")
    train(loaded.model, optimizer, train_data, val_data, objective, args=cfg.train, run_dir=run,
          adapter_config=adapter_config, resume=resume, reference=reference, log=log, callbacks=callbacks,
          clear_cache_threshold=cfg.system.clear_cache_threshold_gb)
    return finished(run.root)
