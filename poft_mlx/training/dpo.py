"""The DPO stage (Rafailov et al. 2023, arXiv 2305.18290) after PoFT or SFT.

Records are prompt / chosen / rejected (data.read_jsonl(..., preference=True)). The policy
starts from the target, with a previous stage's adapters fused into its weights when
`init_adapters` is set, and gets new adapters. The reference is that same starting model,
frozen: its summed log-likelihoods of every chosen and rejected reply are computed once,
before the new adapters are added, so no second model is held during training.

Training reuses trainer.train. A batch of B pairs is one 2B-row Batch, the B chosen replies
then the B rejected ones, and its `r_ref` field carries the reference log-likelihoods of
those rows; `dpo_objective` splits them again. Checkpoints, resume, metrics.jsonl and
validation therefore work as for PoFT and SFT.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import ADAPTER_CONFIG, ADAPTER_FILE
from ..config import Config
from ..data.records import read_jsonl
from .objectives import dpo_loss
from ..models.modeling import batch_logprobs, make_batch
from ..data.render import Renderer, fit_length
from .loop import Dataset, eval_groups


@dataclass
class PairDataset(Dataset):
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


def dpo_objective(lp_sum, n_tok, ref, *, beta: float = 0.1, norm=None):
    """DPO on a PairDataset batch: rows [0, B) are chosen replies, rows [B, 2B) rejected.

    loss = sum over pairs of -log sigmoid(h) / norm (losses.dpo_loss; norm = pairs).
    Metrics add the implicit rewards beta * (lp - ref) of each side, the chosen replies'
    token CE (to see whether DPO lowers their likelihood) and the token count.
    """
    B = lp_sum.shape[0] // 2
    lc, lr, rc, rr = lp_sum[:B], lp_sum[B:2 * B], ref[:B], ref[B:2 * B]
    loss, metrics = dpo_loss(lc, lr, rc, rr, beta=beta, norm=norm)
    metrics["reward_chosen_sum"] = (beta * (lc - rc)).astype(mx.float32).sum()
    metrics["reward_rejected_sum"] = (beta * (lr - rr)).astype(mx.float32).sum()
    metrics["ce_chosen_sum"] = -lc.astype(mx.float32).sum()
    metrics["n_tokens_chosen"] = n_tok[:B].astype(mx.float32).sum()
    metrics["n_tokens"] = n_tok.astype(mx.float32).sum()
    return loss, metrics


def reference_logprobs(model, data: PairDataset, batch_size: int, max_batches: int = -1, seed: int = 0) -> np.ndarray:
    """[N, 2] summed log-likelihoods of (chosen, rejected) under `model` in eval mode.

    Batches are grouped exactly as trainer.evaluate groups them (with the same `max_batches`
    and `seed`), so a policy equal to the reference reproduces these numbers bit for bit on
    the validation set (loss log 2); the pairs an evaluation leaves out come after.
    """
    was_training = model.training
    model.eval()
    out = np.full((len(data), 2), np.nan, np.float32)
    groups = eval_groups(data, batch_size, max_batches, seed)
    rest = np.setdiff1d(np.arange(len(data)), np.concatenate(groups))
    for g in groups + (data.batches(batch_size, among=rest) if len(rest) else []):
        lp, _ = batch_logprobs(model, data.batch(g))
        mx.eval(lp)
        lp = np.array(lp)
        out[g, 0], out[g, 1] = lp[:len(g)], lp[len(g):]
    if was_training:
        model.train()
    return out


def prepare_pairs(path: str, renderer: Renderer, cfg: Config, log=print) -> PairDataset:
    """Read preference records and fit both replies of each to data.max_seq_length."""
    samples, chosen, rejected, dropped = [], [], [], []
    records = read_jsonl(path, preference=True)
    for p in records:
        c, c_enc, _ = fit_length(p.chosen, renderer, cfg.data.max_seq_length, cfg.data.overlength)
        r, r_enc, _ = fit_length(p.rejected, renderer, cfg.data.max_seq_length, cfg.data.overlength)
        if c is None or r is None:
            dropped.append(p.source)
            continue
        if c_enc.n_target == 0 or r_enc.n_target == 0:
            raise ValueError(f"{p.source}: no supervised token after rendering with the target's template")
        samples.append(p)
        chosen.append(c_enc)
        rejected.append(r_enc)
    if not samples:
        raise ValueError(f"{path}: every pair was dropped (max_seq_length={cfg.data.max_seq_length})")
    log(f"{path}: {len(records)} pairs, {len(dropped)} dropped (max_seq_length {cfg.data.max_seq_length})")
    return PairDataset(samples, chosen, np.full((len(samples), 2), np.nan, np.float32), rejected)


def fuse_adapters(model, folder: str | Path, target_path: Path | None = None) -> None:
    """Load a previous stage's adapters (mlx-lm layout) and fold them into `model`'s weights.

    Quantized layers that carried adapters become float layers (dequantize, add B A), so the
    fused model computes exactly what the previous stage's policy computed.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    folder = Path(folder)
    if not (folder / ADAPTER_FILE).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"init_adapters {folder}: expected {ADAPTER_FILE} and {ADAPTER_CONFIG} "
                                "there (a run's RUN_DIR/adapters folder)")
    trained_on = json.loads((folder / ADAPTER_CONFIG).read_text()).get("model")
    if target_path is not None and trained_on and Path(trained_on).resolve() != Path(target_path).resolve():
        raise ValueError(f"init_adapters {folder} were trained on {trained_on}, but the target is "
                         f"{target_path}; set `model` to the previous stage's target")
    load_adapters(model, str(folder))
    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def load_policy(cfg: Config, adapter_path: str | None = None):
    """The target with `cfg.init_adapters` fused in and, optionally, a run's adapters loaded."""
    from mlx_lm.tuner.utils import load_adapters

    from ..models import modeling

    loaded = modeling.load(cfg.model, dtype=cfg.system.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.init_adapters:
        fuse_adapters(loaded.model, cfg.init_adapters, loaded.path)
    if adapter_path:
        load_adapters(loaded.model, adapter_path)
    return loaded


def _log(msg: str) -> None:
    if mx.distributed.init().rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def run_dpo(cfg: Config, *, resume: bool = False) -> Path:
    """Train the DPO stage; returns the run folder (the same layout as PoFT/SFT runs)."""
    from ..models import modeling
    from .pipeline import open_run, target_renderer
    from .loop import build_optimizer, planned_steps, train

    run_dir, group = open_run(cfg, resume=resume)
    loaded = load_policy(cfg)
    renderer = target_renderer(loaded.tokenizer, cfg)
    train_data = prepare_pairs(cfg.data.train, renderer, cfg, log=_log)
    val_data = prepare_pairs(cfg.data.valid, renderer, cfg, log=_log) if cfg.data.valid else None
    # The reference is the starting policy: score every reply before the adapters exist.
    # Validation pairs are grouped as evaluate() groups them (exact log 2 at step 0).
    _log(f"reference log-likelihoods of {len(train_data)} pairs")
    train_data.r_ref = reference_logprobs(loaded.model, train_data, cfg.train.batch_size)
    if val_data is not None:
        val_data.r_ref = reference_logprobs(loaded.model, val_data, cfg.train.batch_size,
                                            cfg.train.val_batches, cfg.train.seed)
    mx.random.seed(cfg.train.seed)
    adapter_config = {"model": str(loaded.path), **modeling.apply_adapters(loaded.model, cfg.adapter)}
    init = str(Path(cfg.init_adapters).resolve()) if cfg.init_adapters else None  # fuse may run elsewhere
    adapter_config["poft_mlx"] = {"target": cfg.model, "objective": "dpo", "init_adapters": init}
    total = planned_steps(cfg.train, len(train_data))
    optimizer = build_optimizer(cfg.train, total)
    objective_fn = partial(dpo_objective, beta=cfg.dpo.beta)
    start = f" from {cfg.init_adapters}" if cfg.init_adapters else ""
    _log(f"training {cfg.model}{start} with dpo (beta {cfg.dpo.beta}) for {total} steps -> {run_dir}")
    train(loaded.model, optimizer, train_data, val_data, objective_fn, args=cfg.train, objective="dpo",
          run_dir=run_dir, adapter_config=adapter_config, resume=resume, log=_log,
          clear_cache_threshold=cfg.system.clear_cache_threshold_gb)
    return run_dir
