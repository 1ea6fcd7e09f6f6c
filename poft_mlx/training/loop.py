"""The training loop: one explicit `train()`; the objective and the data are passed in.

SFT and PoFT differ only in the objective function. A step consumes
`grad_accumulation_steps` micro-batches of `batch_size` samples (the global batch;
each data-parallel rank takes every world-size-th row), then applies one update.
An epoch has as many steps for any number of ranks (steps_per_epoch): its last, partial
group is kept, and a rank whose share of it is empty adds zero gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import checkpoint as ckpt
from ..runtime import distributed as dist
from ..config import TrainConfig
from .objectives import MetricMeter
from ..models.modeling import batch_logprobs, make_batch
from ..runtime.progress import Progress


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Dataset:
    """Encoded samples with their reference scores (NaN where not needed)."""

    samples: list
    encodings: list
    r_ref: np.ndarray

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> np.ndarray:
        """Tokens per sample (a pair: its longer reply): what batching sorts by."""
        return np.array([len(e.tokens) for e in self.encodings], np.int64)

    def batches(self, batch_size: int, among=None) -> list[np.ndarray]:
        """Length-sorted groups of the samples `among` (default all), so that padding stays small:
        evaluation's batches (training draws new groups each epoch: epoch_groups)."""
        idx = np.arange(len(self)) if among is None else np.sort(np.asarray(among, np.int64))
        order = idx[np.argsort(self.lengths()[idx], kind="stable")]
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def batch(self, index: np.ndarray, rank: int = 0, world: int = 1):
        mine = index[rank::world]
        return make_batch([self.encodings[i] for i in mine], mine, self.r_ref[mine])


# Written into checkpoints: how training batches are composed (epoch_groups), so that a
# resumed run can tell a checkpoint of another composition.
DATA_ORDER = "length-buckets-reshuffled-per-epoch"


def length_buckets(lengths: np.ndarray, pad_to: int = 16) -> np.ndarray:
    """Classes of samples that may share a batch at little padding cost: rows are padded to a
    multiple of `pad_to` anyway (modeling.make_batch), and longer ones group within ~9%."""
    padded = np.maximum(-(-np.asarray(lengths, np.int64) // pad_to) * pad_to, pad_to)
    return np.floor(8 * np.log2(padded)).astype(np.int64)


def epoch_groups(lengths: np.ndarray, group_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Which samples share a step in `epoch`: sorted by length bucket, randomly within a
    bucket, then cut into groups of `group_size` (the last one may be smaller).

    A function of (seed, epoch) alone, so a resumed run composes the same groups; a new
    draw each epoch, so epoch 2 does not repeat epoch 1's groups in another order.
    """
    lengths = np.asarray(lengths)
    tie = np.random.default_rng([seed, epoch, 1]).permutation(len(lengths))
    order = np.lexsort((tie, length_buckets(lengths)))
    return [order[i:i + group_size] for i in range(0, len(order), group_size)]


def steps_per_epoch(n_samples: int, batch_size: int, accum: int) -> int:
    """One step per group of batch_size * accum samples, the last partial one included, for
    every number of ranks: dropping a group smaller than world * accum made a 2-rank run
    take a step fewer than one process. Losses are sums normalised over the whole group
    and reduced across ranks, so uneven shares of a group change nothing."""
    return -(-n_samples // (batch_size * accum))


def planned_steps(args: TrainConfig, n_samples: int) -> int:
    """The run's length: train.iters, else train.epochs epochs."""
    return args.iters or max((args.epochs or 1) * steps_per_epoch(n_samples, args.batch_size,
                                                                  args.grad_accumulation_steps), 1)


def shares(group: np.ndarray, accum: int, rank: int, world: int) -> list[np.ndarray]:
    """The rows of `group` that `rank` computes, one array per micro-batch; an array is empty
    where the group has fewer rows than accum * world (an epoch's last group)."""
    n = len(group)
    return [group[k * n // accum:(k + 1) * n // accum][rank::world] for k in range(accum)]


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch's groups are visited."""
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def build_schedule(args: TrainConfig, total_steps: int):
    warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)
    lr, end = args.learning_rate, args.learning_rate * args.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if args.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, end)
    elif args.lr_schedule == "linear":
        main = optim.linear_schedule(lr, end, decay_steps)
    else:
        main = lambda step: mx.array(lr, mx.float32)  # noqa: E731
    if warmup <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def build_optimizer(args: TrainConfig, total_steps: int):
    lr = build_schedule(args, total_steps)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=args.weight_decay)


def global_norm(batch_index: np.ndarray, data: Dataset, objective: str) -> float:
    """The loss normaliser over the whole global batch: samples (PoFT) or tokens (SFT)."""
    if objective == "sft":
        return float(sum(data.encodings[i].mask[1:].sum() for i in batch_index))
    return float(len(batch_index))


def eval_groups(data: Dataset, batch_size: int, max_batches: int = -1, seed: int = 0) -> list[np.ndarray]:
    """The batches an evaluation takes: all of `data`, or `max_batches` batches of a seeded
    sample of it, the same sample at every evaluation so that the losses compare.

    Not the first batches of the length-sorted set: those hold only its shortest samples.
    """
    if max_batches <= 0 or max_batches * batch_size >= len(data):
        return data.batches(batch_size)
    pick = np.random.default_rng([seed, 0x76616C]).choice(len(data), max_batches * batch_size, replace=False)
    return data.batches(batch_size, among=pick)


def evaluate(model, data: Dataset, objective_fn: Callable, objective: str, *, batch_size: int,
             max_batches: int = -1, group=None, beta=1.0, gamma=0.0, seed: int = 0) -> dict:
    """Validation metrics over `data` (or a seeded sample of `max_batches`; eval_groups):
    loss, CE, ppl, tau, win rate.

    With a `group`, rank r takes rows [r::world] of each batch and the sums are reduced
    over the ranks (a rank whose share of the last batch is empty contributes nothing).
    """
    world, rank = (group.size(), group.rank()) if group else (1, 0)
    was_training = model.training
    model.eval()
    meter = MetricMeter()
    groups = eval_groups(data, batch_size, max_batches, seed)
    total_norm = 0.0
    for g in groups:
        total_norm += global_norm(g, data, objective)
        if len(g[rank::world]) == 0:
            continue
        b = data.batch(g, rank, world)
        lp, n = batch_logprobs(model, b)
        loss_sum, metrics = objective_fn(lp, n, b.r_ref, norm=1.0)
        metrics["loss_sum"] = loss_sum
        mx.eval(metrics)
        meter.add(metrics)
    if world > 1:
        meter.sums = dist.reduce_metrics(meter.sums, metric_keys(objective_fn) + ["loss_sum"], "validating")
    if was_training:
        model.train()
    out = meter.summary()
    out["loss"] = meter.sums.get("loss_sum", 0.0) / max(total_norm, 1e-12)
    return out


def metric_keys(objective_fn: Callable) -> list[str]:
    """The metric names `objective_fn` reports (the same on every rank, whatever its data)."""
    two = mx.array([-1.0, -1.0])  # two rows: DPO reads them as one (chosen, rejected) pair
    return list(objective_fn(two, mx.array([1.0, 1.0]), two, norm=1.0)[1])


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


@contextlib.contextmanager
def _grad_checkpointing(model, enabled: bool):
    """mlx-lm's grad_checkpoint patches the block *class*; undo it afterwards, or every later
    model of that architecture in the process (reference models, the next run) stays patched,
    which redraws dropout masks in the backward pass."""
    if not enabled:
        yield
        return
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(model.layers[0])
    original = cls.__call__
    grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        cls.__call__ = original


def train(model, *positional, args: TrainConfig, **kwargs) -> dict:
    """Train `model` in place (see _train); returns the final validation metrics (or {})."""
    with _grad_checkpointing(model, args.grad_checkpoint):
        return _train(model, *positional, args=args, **kwargs)


def _train(model, optimizer, train_data: Dataset, val_data: Dataset | None, objective_fn: Callable, *,
          args: TrainConfig, objective: str, run_dir: Path, adapter_config: dict, resume: bool = False,
          reference: Callable | None = None, log: Callable = print, clear_cache_threshold: float = 0.0) -> dict:
    """Train `model` in place; returns the final validation metrics (or {})."""
    group = dist.group()
    world, rank = group.size(), group.rank()
    main_rank = rank == 0
    accum = args.grad_accumulation_steps
    # One step = one group of batch_size * accum samples, fed as `accum` micro-batches
    # of batch_size, normalised over the whole group: accumulation == a larger batch.
    lengths = train_data.lengths()
    composed = {}

    def groups_of(epoch: int) -> list[np.ndarray]:
        if epoch not in composed:
            composed.clear()
            composed[epoch] = epoch_groups(lengths, args.batch_size * accum, args.seed, epoch)
        return composed[epoch]

    groups = groups_of(0)
    if not groups:
        raise ValueError("the training set is empty")
    total_steps = planned_steps(args, len(train_data))
    def loss_fn(model, batch, norm):
        lp, n = batch_logprobs(model, batch, checkpoint=args.grad_checkpoint)
        return objective_fn(lp, n, batch.r_ref, norm=norm)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = {"step": 0, "best_val": None, "best_step": None, "bad_evals": 0, "skipped": 0}
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        loaded = _resume(run_dir, model, optimizer, group)
        if loaded.get("data_order") != DATA_ORDER:
            log(f"note: the checkpoint was written by a version that composed batches otherwise "
                f"({loaded.get('data_order', 'fixed length-sorted groups')}); from here on they are "
                f"{DATA_ORDER}")
        state.update(loaded)
        if main_rank:
            _truncate_metrics(metrics_path, state["step"])
            ckpt.clean_partial(run_dir)  # a checkpoint whose writing was cut off
        log(f"resumed from {ckpt.latest_checkpoint(run_dir)} at step {state['step']}/{total_steps}")
    state["data_order"] = DATA_ORDER

    def write(record: dict) -> None:
        if main_rank:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(step: int) -> Path | None:
        if not main_rank:
            return None
        # The open report window too, so that a resumed run logs the same means.
        window = {"losses": losses, "sums": meter.sums}
        path = ckpt.save_checkpoint(run_dir, step, model, optimizer, adapter_config,
                                    dict(state, step=step, window=window))
        ckpt.save_adapters(model, run_dir / "adapters", adapter_config)
        ckpt.prune(run_dir, args.keep_last)
        return path

    def validate(step: int) -> bool:
        """Evaluate, keep the best adapters; returns True when early stopping triggers."""
        if val_data is None or len(val_data) == 0:
            return False
        m = evaluate(model, val_data, objective_fn, objective, batch_size=args.batch_size,
                     max_batches=args.val_batches, group=group, seed=args.seed)
        write({"split": "val", "step": step, **m})
        log(f"val   step {step}: " + _fmt(m))
        if state["best_val"] is None or m["loss"] < state["best_val"]:
            state.update(best_val=m["loss"], best_step=step, bad_evals=0)
            if main_rank:
                ckpt.save_adapters(model, run_dir / "best", adapter_config)
        else:
            state["bad_evals"] += 1
        return bool(args.early_stopping_patience) and state["bad_evals"] >= args.early_stopping_patience

    model.train()
    keys = metric_keys(objective_fn)
    meter, window_tokens, window_time, losses = MetricMeter(), 0, 0.0, []
    window = state.pop("window", None) or {}
    losses = list(window.get("losses", []))  # global values; the sums are rank 0's own
    if world == 1:
        meter.sums = dict(window.get("sums", {}))
    step = state["step"]
    if step == 0 and val_data is not None and not resume:
        validate(0)
    stopped_early = False
    with _StopFlag() as stop, Progress(total_steps, "train", enabled=main_rank) as bar:
        bar.n = step
        while step < total_steps:
            tic = time.perf_counter()
            grads, loss_acc, tokens, step_metrics = None, 0.0, 0, []
            epoch, pos = divmod(step, len(groups))
            g = groups_of(epoch)[epoch_order(len(groups), args.seed, epoch)[pos]]
            norm = global_norm(g, train_data, objective)
            for rows in shares(g, accum, rank, world):
                if len(rows) == 0:
                    continue
                batch = train_data.batch(rows)
                if reference is not None:
                    batch.r_ref = mx.array(reference([train_data.samples[i] for i in batch.index]), mx.float32)
                (loss, metrics), grad = value_and_grad(model, batch, norm)
                grads = grad if grads is None else tree_map(mx.add, grads, grad)
                mx.eval(grads, loss, metrics)
                loss_acc += loss.item()
                step_metrics.append(metrics)
                tokens += int(metrics["n_tokens"].item())
            if grads is None:  # no row of this (partial) group is this rank's: it adds nothing
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            stopping = stop.signum is not None
            if world > 1:  # the ranks also agree on stopping: one rank's signal stops all at this step
                grads = dist.sum_gradients(grads, group)
                shared = mx.distributed.all_sum(mx.array([loss_acc, stopping], mx.float64), group=group, stream=mx.cpu)
                dist.wait([grads, shared], f"summing gradients at step {step + 1}")
                loss_acc, stopping = shared[0].item(), shared[1].item() > 0
            gnorm = optim.clip_grad_norm(grads, args.max_grad_norm)[1] if args.max_grad_norm else _norm(grads)
            if args.max_grad_norm:
                grads = optim.clip_grad_norm(grads, args.max_grad_norm)[0]
            finite = math.isfinite(loss_acc) and math.isfinite(gnorm.item())
            if not finite:
                if args.nan_policy == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss_acc}) or gradient norm ({gnorm.item()}) at step {step + 1}; "
                        f"the last good checkpoint is kept in {run_dir / 'checkpoints'} "
                        "(set train.nan_policy=skip to skip such batches)")
                state["skipped"] += 1
                log(f"step {step + 1}: non-finite loss or gradient, batch skipped (nan_policy=skip)")
            else:
                optimizer.update(model, grads)
                mx.eval(model.trainable_parameters(), optimizer.state)
                for m in step_metrics:  # a skipped batch stays out of the logged means
                    meter.add(m)
                losses.append(loss_acc)
            if clear_cache_threshold and mx.get_cache_memory() > clear_cache_threshold * 1e9:
                mx.clear_cache()
            step += 1
            window_tokens += tokens * world  # for the progress bar; the log sums the ranks' counts
            window_time += time.perf_counter() - tic
            bar.advance(1, info=f"loss {loss_acc:.4f} | {window_tokens / max(window_time, 1e-9):.0f} tok/s | "
                                f"peak {mx.get_peak_memory() / 1e9:.2f} GB")
            if step % args.steps_per_report == 0 or step == total_steps:
                if world > 1:
                    meter.sums = dist.reduce_metrics(meter.sums, keys, f"reducing metrics at step {step}")
                m = meter.summary()
                rec = {"split": "train", "step": step, "loss": float(np.mean(losses)) if losses else None, **m,
                       "lr": float(optimizer.learning_rate.item()), "grad_norm": _finite(gnorm.item()),
                       "skipped": state["skipped"],
                       "tokens_per_sec": meter.sums.get("n_tokens", 0.0) / max(window_time, 1e-9),
                       "peak_memory_gb": mx.get_peak_memory() / 1e9, "epoch": step / len(groups)}
                write(rec)
                meter, window_tokens, window_time, losses = MetricMeter(), 0, 0.0, []
            if step % args.steps_per_eval == 0 and step != total_steps:
                stopped_early = validate(step)
            if stopping and not stopped_early:  # after this step's evaluation, which resuming would skip
                path = save(step)
                raise Interrupted(f"stopped by signal {stop.signum or 'on another rank'} at step {step}; "
                                  f"checkpoint {path}")
            if step % args.steps_per_save == 0 and step != total_steps:
                save(step)
            if stopped_early:
                log(f"early stopping at step {step}: no improvement in {args.early_stopping_patience} evaluations")
                break
    final = {}
    if not stopped_early:
        validate(step)
    if val_data is not None and state["best_step"] is not None:
        final = {"best_val_loss": state["best_val"], "best_step": state["best_step"]}
    state["step"] = step
    save(step)
    return final


def _resume(run_dir: Path, model, optimizer, group) -> dict:
    """Load the latest checkpoint on rank 0 and send it to the other ranks, which need no
    copy of the run folder (only its config.yaml, which the CLI reads)."""
    if group.rank() == 0:
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint to resume from")
        state = ckpt.load_checkpoint(path, model, optimizer)
    else:
        optimizer.init(model.trainable_parameters())
        state = None
    if group.size() > 1:
        what = "receiving the checkpoint from rank 0"
        params, opt_state, rng = dist.broadcast(
            [model.trainable_parameters(), optimizer.state, [mx.random.state[0]]], what)
        model.update(params)
        optimizer.state = opt_state
        ckpt.set_rng_key(rng[0])
        state = dist.broadcast_json(state, what)
    return state


def _norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except (json.JSONDecodeError, AttributeError):
            pass  # a line cut off by a kill
    path.write_text("".join(ln + "\n" for ln in keep))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt(m: dict) -> str:
    keys = ("loss", "ce", "ppl", "tau_mean", "win_rate", "margin")
    return " | ".join(f"{k} {m[k]:.4f}" for k in keys if k in m and m[k] == m[k])
