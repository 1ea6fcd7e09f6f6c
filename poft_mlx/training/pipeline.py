"""What each command does, as library functions: score, train, eval.

The CLI parses arguments and calls these; they take a Config and return results.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..runtime import device
from ..runtime import distributed as dist
from ..config import Config, save_config
from ..data.records import fingerprint, read_jsonl
from .objectives import OBJECTIVES
from ..scoring.references import ResidentReference, open_aligned, reference_scores, score_all
from ..data.render import Renderer, fit_length
from .loop import Dataset


def log(msg: str) -> None:
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    samples: list
    encodings: list
    report: dict


def prepare(path: str, renderer: Renderer, cfg: Config) -> Prepared:
    """Read, check, and fit every record to max_seq_length with the target's template."""
    samples, encodings = [], []
    # shortened: a conversation cut in a later prompt keeps the replies before it, whole.
    counts = {"records": 0, "ok": 0, "truncated": 0, "shortened": 0, "dropped": 0,
              "shortened_records": [], "dropped_records": []}
    for s in read_jsonl(path):
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
            raise ValueError(f"{s.source}: no supervised token after rendering with the target's template")
        samples.append(fitted)
        encodings.append(enc)
    if not samples:
        raise ValueError(f"{path}: every record was dropped (max_seq_length={cfg.data.max_seq_length})")
    log(f"{path}: {counts['records']} records, {counts['truncated']} truncated, "
        f"{counts['shortened']} shortened to their earlier replies, {counts['dropped']} dropped "
        f"(max_seq_length {cfg.data.max_seq_length}, policy {cfg.data.overlength})")
    return Prepared(samples, encodings, counts)


def target_renderer(tokenizer, cfg: Config) -> Renderer:
    return Renderer(tokenizer, chat_template=cfg.chat_template, span=cfg.data.span,
                    template_kwargs=cfg.data.template_kwargs, label=f"target {cfg.model}")


def _require(cfg: Config, *, aligned: bool) -> None:
    if not cfg.model:
        raise ValueError("no target model: set `model` in the config or --set model=...")
    if not cfg.data.train:
        raise ValueError("no training data: set data.train in the config or --set data.train=FILE")
    if aligned and not cfg.aligned:
        raise ValueError("objective poft needs at least one aligned model (config key `aligned`)")
    for key, f in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"{key}: {f} is not a file")


def run_score(cfg: Config, files: list[str] | None = None) -> dict:
    """Score the training (and validation) data with every aligned model; cached."""
    from mlx_lm.utils import load_tokenizer

    from ..models.modeling import resolve

    _require(cfg, aligned=True)
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


def _dataset(prep: Prepared, cfg: Config, need_ref: bool) -> Dataset:
    r_ref = np.full(len(prep.samples), np.nan, np.float32)
    if need_ref:
        if cfg.score.on_missing == "score":
            handles = score_all(cfg, prep.samples, group=dist.group(), log=log)
        else:
            handles = [open_aligned(cfg, a) for a in cfg.aligned]
        r_ref = reference_scores(handles, prep.samples)[0].astype(np.float32)
    return Dataset(prep.samples, prep.encodings, r_ref)


def open_run(cfg: Config, *, resume: bool):
    """Check and create the run folder (rank 0 writes config and data fingerprint); returns (run_dir, group).

    Rank 0 first locks the folder for the whole run (runlock.lock_run): a second process on it
    gets RunLocked naming the first, on every rank. Refuses to start a new run over an existing
    one, so nothing already done is lost.
    """
    from ..runtime.runlock import RunLocked, lock_run

    run_dir = Path(cfg.run_dir)
    dist.set_timeout(cfg.system.peer_timeout_s)
    group = dist.group()
    refused = None
    if group.rank() == 0:
        try:
            lock_run(run_dir, log=log)
        except RunLocked as e:
            refused = str(e)
    if group.size() > 1:
        refused = dist.broadcast_json(refused, "locking the run folder")
    if refused:
        raise RunLocked(refused)
    if not resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                              "or choose another run_dir")
    device.set_memory_limits(cfg.system.memory_limit_gb, cfg.system.cache_limit_gb)
    if group.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "data_fingerprint.txt").write_text(fingerprint(cfg.data.train) + "\n")
    return run_dir, group


def run_train(cfg: Config, *, resume: bool = False) -> Path:
    """Score (cached mode), then train; returns the run folder."""
    import mlx.core as mx

    from ..models import modeling
    from .loop import build_optimizer, planned_steps, train

    _require(cfg, aligned=cfg.objective == "poft")
    if cfg.objective == "dpo":
        from .dpo import run_dpo
        return _released(run_dpo(cfg, resume=resume))
    run_dir, group = open_run(cfg, resume=resume)
    loaded = modeling.load(cfg.model, dtype=cfg.system.dtype, trust_remote_code=cfg.trust_remote_code)
    renderer = target_renderer(loaded.tokenizer, cfg)
    train_prep = prepare(cfg.data.train, renderer, cfg)
    val_prep = prepare(cfg.data.valid, renderer, cfg) if cfg.data.valid else None
    if group.rank() == 0:
        report = {"train": train_prep.report, "valid": val_prep.report if val_prep else None}
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=1))
    resident = cfg.reference_mode == "resident" and bool(cfg.aligned)
    need_ref = bool(cfg.aligned) and not resident
    train_data = _dataset(train_prep, cfg, need_ref)
    val_data = _dataset(val_prep, cfg, bool(cfg.aligned)) if val_prep else None
    reference = ResidentReference(cfg) if resident else None
    mx.random.seed(cfg.train.seed)  # here: building models above draws random numbers too
    adapter_config = {"model": str(loaded.path), **modeling.apply_adapters(loaded.model, cfg.adapter)}
    adapter_config["poft_mlx"] = {"target": cfg.model, "objective": cfg.objective}
    total = planned_steps(cfg.train, len(train_data))
    optimizer = build_optimizer(cfg.train, total)
    objective_fn = partial(OBJECTIVES[cfg.objective], beta=cfg.beta, gamma=cfg.gamma)
    log(f"training {cfg.model} with {cfg.objective} for {total} steps -> {run_dir}")
    train(loaded.model, optimizer, train_data, val_data, objective_fn, args=cfg.train,
          objective=cfg.objective, run_dir=run_dir, adapter_config=adapter_config, resume=resume,
          reference=reference, log=log, clear_cache_threshold=cfg.system.clear_cache_threshold_gb)
    return _released(run_dir)


def _released(run_dir: Path) -> Path:
    """A finished run gives its folder's lock up (a failed one keeps it until the process exits)."""
    from ..runtime.runlock import release_run

    release_run(run_dir)
    return run_dir


def run_eval(cfg: Config, data: str, adapter_path: str | None, loaded=None) -> dict:
    """CE, perplexity, PoFT loss, tau and win rate on `data` for a model (+ adapters).

    loaded: the model already loaded as load_policy(cfg, adapter_path) loads it (eval --generate
    reuses the generator's), else it is loaded here."""
    from functools import partial as _p

    from .dpo import load_policy
    from .loop import evaluate

    dist.set_timeout(cfg.system.peer_timeout_s)
    if loaded is None:
        loaded = load_policy(cfg, adapter_path)  # a DPO run's init_adapters fused first
    renderer = target_renderer(loaded.tokenizer, cfg)
    prep = prepare(data, renderer, cfg)
    ds = _dataset(prep, cfg, bool(cfg.aligned))
    objective = "poft" if cfg.aligned else "sft"
    fn = _p(OBJECTIVES[objective], beta=cfg.beta, gamma=cfg.gamma)
    m = evaluate(loaded.model, ds, fn, objective, batch_size=cfg.score.batch_size, group=dist.group())
    if objective == "sft":
        m["loss"] = m.get("ce")
    return m
