"""The DPO stage (Rafailov et al. 2023, arXiv 2305.18290) after PoFT or SFT.

Records are prompt / chosen / rejected (data.sources.load_records(..., preference=True)). The
policy starts from the target, with a previous stage's adapters fused into its weights when
`init_adapters` is set, and gets new adapters. The reference is that same starting model,
frozen: its summed log-likelihoods of every chosen and rejected reply are computed once,
before the new adapters are added, so no second model is held during training.

Training is loop.train with the Dpo objective (objectives/dpo.py). A batch of B pairs is one
2B-row Batch, the B chosen replies then the B rejected ones, and its `r_ref` field carries
the reference log-likelihoods of those rows. Checkpoints, resume, metrics.jsonl and
validation therefore work as for PoFT and SFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import Config
from ..data.prepare import log, target_renderer
from ..data.sources import describe, load_records
from ..data.render import Renderer, fit_length
from ..errors import DataError
from ..models import modeling
from ..models.adapters import load_policy
from ..models.modeling import make_batch, sequence_logprobs
from .batches import EncodedData, eval_groups
from .loop import build_optimizer, train
from .objectives import Objective
from .plan import plan
from .setup import create_run


@dataclass
class PairData(EncodedData):
    """Preference pairs. `encodings` holds the chosen replies, `rejected` the rejected ones,
    `r_ref` [N, 2] the reference's summed log-likelihoods (chosen, rejected)."""

    rejected: list = field(default_factory=list)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(c.tokens), len(r.tokens)) for c, r in zip(self.encodings, self.rejected)], np.int64)

    def batch(self, index: np.ndarray, rank: int = 0, world: int = 1):
        mine = np.asarray(index)[rank::world]
        encs = [self.encodings[i] for i in mine] + [self.rejected[i] for i in mine]
        ref = np.concatenate([self.r_ref[mine, 0], self.r_ref[mine, 1]])
        return make_batch(encs, np.concatenate([mine, mine]), ref)


def reference_logprobs(model, data: PairData, batch_size: int, max_batches: int = -1, seed: int = 0) -> np.ndarray:
    """[N, 2] summed log-likelihoods of (chosen, rejected) under `model` in eval mode.

    Batches are grouped exactly as loop.evaluate groups them (with the same `max_batches`
    and `seed`), so a policy equal to the reference reproduces these numbers bit for bit on
    the validation set (loss log 2); the pairs an evaluation leaves out come after.
    """
    out = np.full((len(data), 2), np.nan, np.float32)
    groups = eval_groups(data, batch_size, max_batches, seed)
    rest = np.setdiff1d(np.arange(len(data)), np.concatenate(groups))
    groups += data.batches(batch_size, among=rest) if len(rest) else []
    for batch, lp, _ in sequence_logprobs(model, (data.batch(g) for g in groups)):
        g = batch.index[:len(batch.index) // 2]  # the chosen rows, then the same pairs' rejected ones
        out[g, 0], out[g, 1] = lp[:len(g)], lp[len(g):]
    return out


def prepare_pairs(path, renderer: Renderer, cfg: Config, log=log, *, key: str = "data.train") -> PairData:
    """Read preference records (any data source, data/sources.py) and fit both replies of each
    to data.max_seq_length."""
    samples, chosen, rejected, dropped = [], [], [], []
    records = load_records(path, cfg.data, seed=cfg.train.seed, preference=True, key=key).records
    for p in records:
        c, c_enc, _ = fit_length(p.chosen, renderer, cfg.data.max_seq_length, cfg.data.overlength)
        r, r_enc, _ = fit_length(p.rejected, renderer, cfg.data.max_seq_length, cfg.data.overlength)
        if c is None or r is None:
            dropped.append(p.source)
            continue
        if c_enc.n_target == 0 or r_enc.n_target == 0:
            raise DataError(f"{p.source}: no supervised token after rendering with the target's template")
        samples.append(p)
        chosen.append(c_enc)
        rejected.append(r_enc)
    if not samples:
        raise DataError(f"{describe(path)}: every pair was dropped (max_seq_length={cfg.data.max_seq_length})")
    log(f"{describe(path)}: {len(records)} pairs, {len(dropped)} dropped (max_seq_length {cfg.data.max_seq_length})")
    return PairData(samples, chosen, np.full((len(samples), 2), np.nan, np.float32), rejected)


def run_pairs(cfg: Config, objective: Objective, *, resume: bool = False, callbacks=()) -> Path:
    """Train on preference pairs (DPO); returns the run folder (the same layout as PoFT/SFT runs)."""
    run, _ = create_run(cfg, resume=resume)
    loaded = load_policy(cfg)
    renderer = target_renderer(loaded.tokenizer, cfg)
    train_data = prepare_pairs(cfg.data.train, renderer, cfg)
    val_data = prepare_pairs(cfg.data.valid, renderer, cfg, key="data.valid") if cfg.data.valid else None
    # The reference is the starting policy: score every reply before the adapters exist.
    # Validation pairs are grouped as evaluate() groups them (exact log 2 at step 0).
    log(f"reference log-likelihoods of {len(train_data)} pairs")
    train_data.r_ref = reference_logprobs(loaded.model, train_data, cfg.train.batch_size)
    if val_data is not None:
        val_data.r_ref = reference_logprobs(loaded.model, val_data, cfg.train.batch_size,
                                            cfg.train.val_batches, cfg.train.seed)
    mx.random.seed(cfg.train.seed)
    adapter_config = {"model": str(loaded.path), **modeling.apply_adapters(loaded.model, cfg.adapter)}
    init = str(Path(cfg.init_adapters).resolve()) if cfg.init_adapters else None  # fuse may run elsewhere
    adapter_config["poft_mlx"] = {"target": cfg.model, "objective": cfg.objective, "init_adapters": init}
    total = plan(cfg.train, len(train_data)).total_steps
    optimizer = build_optimizer(cfg.train, total)
    start = f" from {cfg.init_adapters}" if cfg.init_adapters else ""
    log(f"training {cfg.model}{start} with {cfg.objective} (beta {cfg.dpo.beta}) for {total} steps -> {run}")
    train(loaded.model, optimizer, train_data, val_data, objective, args=cfg.train, run_dir=run,
          adapter_config=adapter_config, resume=resume, log=log, callbacks=callbacks,
          clear_cache_threshold=cfg.system.clear_cache_threshold_gb)
    return run.root
