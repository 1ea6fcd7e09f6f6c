"""The training loop: `train()` runs an Objective over EncodedData, with hooks for observers.

A step consumes `grad_accumulation_steps` micro-batches of `batch_size` samples (the global
batch; each data-parallel rank takes every world-size-th row), then applies one update; the
plan (training/plan.py) says how many. The loop's state is a TrainState, which is what a
checkpoint's state.json stores, so a resumed run continues exactly. Observers (tests, the
benchmark, experiment trackers) subclass Callback instead of patching the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..config import TrainConfig
from ..errors import DataError, InputMissing, Interrupted, NonFiniteLoss
from ..models.modeling import batch_logprobs, sequence_logprobs
from ..rundir import RunDir
from ..runtime import distributed as dist
from ..runtime.progress import Progress
from . import checkpoint as ckpt
from .compiled import StepParts, use_compile
from .batches import DATA_ORDER, EncodedData, eval_groups, shares, shuffled_epochs
from .objectives import MetricMeter, Objective
from .plan import plan as make_plan


@dataclass
class TrainState:
    """Where a run stands; saved as each checkpoint's state.json."""

    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    skipped: int = 0
    data_order: str | None = DATA_ORDER  # None: written before checkpoints recorded it
    window: dict = field(default_factory=dict)  # the open report window: {"losses": [...], "sums": {...}}

    @classmethod
    def from_json(cls, data: dict) -> "TrainState":
        names = {f.name for f in fields(cls)}
        return cls(**{"data_order": None, **{k: v for k, v in data.items() if k in names}})

    def to_json(self) -> dict:
        return asdict(self)


class Callback:
    """Hooks into train(); override what you need. `loop` is the running Loop (loop.state,
    loop.model, loop.main_rank...). Called on every rank, in this order each step:
    on_step_begin, on_batch per micro-batch, on_step_end, then on_report / on_eval / on_save
    when the step logs, evaluates or saves."""

    def on_train_begin(self, loop: "Loop") -> None: ...
    def on_step_begin(self, loop: "Loop", step: int) -> None: ...  # step: the 1-based step about to run
    def on_batch(self, loop: "Loop", batch) -> None: ...  # a micro-batch before its forward pass
    def on_step_end(self, loop: "Loop", info: dict) -> None: ...  # step, loss, grad_norm, tokens, applied
    def on_report(self, loop: "Loop", record: dict) -> None: ...  # a train record of metrics.jsonl
    def on_eval(self, loop: "Loop", record: dict) -> None: ...  # a val record of metrics.jsonl
    def on_save(self, loop: "Loop", path) -> None: ...  # a checkpoint written (rank 0)
    def on_train_end(self, loop: "Loop", final: dict) -> None: ...


# ---------------------------------------------------------------------------- optimizer


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


# ---------------------------------------------------------------------------- evaluation


def evaluate(model, data: EncodedData, objective: Objective, *, batch_size: int, max_batches: int = -1,
             group=None, seed: int = 0) -> dict:
    """Validation metrics over `data` (or a seeded sample of `max_batches`; eval_groups): the
    objective's loss and summary (CE, ppl, tau, win rate for PoFT and SFT).

    With a `group`, rank r takes rows [r::world] of each batch and the sums are reduced
    over the ranks (a rank whose share of the last batch is empty contributes nothing).
    """
    world, rank = (group.size(), group.rank()) if group else (1, 0)
    reductions = {**objective.reductions, "loss_sum": "sum"}
    meter = MetricMeter(reductions)
    groups = eval_groups(data, batch_size, max_batches, seed)
    supervised = data.supervised_tokens()
    total_norm = sum(objective.norm(supervised[g]) for g in groups)
    mine = (data.batch(g, rank, world) for g in groups if len(g[rank::world]))
    for batch, lp, n in sequence_logprobs(model, mine):
        loss_sum, metrics = objective(mx.array(lp), mx.array(n), batch.r_ref, norm=1.0)
        metrics["loss_sum"] = loss_sum
        mx.eval(metrics)
        meter.add(metrics)
    if world > 1:
        meter.sums = dist.reduce_metrics(meter.sums, reductions, "validating")
    out = objective.summary(meter.sums)
    out["loss"] = meter.sums.get("loss_sum", 0.0) / max(total_norm, 1e-12)
    return out


# ---------------------------------------------------------------------------- the loop


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


def train(model, optimizer, train_data: EncodedData, val_data: EncodedData | None, objective: Objective, *,
          args: TrainConfig, run_dir, adapter_config: dict, resume: bool = False,
          reference: Callable | None = None, log: Callable = print, clear_cache_threshold: float = 0.0,
          callbacks: Sequence[Callback] = (), schedule: Callable[[int], list] | None = None) -> dict:
    """Train `model` in place; returns the final validation metrics ({} without validation data).

    reference: aligned models kept in memory (scoring.references.ResidentReference) that score
    each micro-batch, instead of train_data.r_ref. schedule: epoch -> its groups of sample
    indices in visit order (default: length buckets reshuffled each epoch, batches.shuffled_epochs).
    """
    loop = Loop(model, optimizer, train_data, val_data, objective, args=args, run=RunDir(run_dir),
                adapter_config=adapter_config, reference=reference, log=log,
                clear_cache_threshold=clear_cache_threshold, callbacks=callbacks, schedule=schedule)
    with _grad_checkpointing(model, args.grad_checkpoint), wired_limit():
        return loop.run(resume)


@contextlib.contextmanager
def wired_limit():
    """On Metal, wire the device's recommended working set for the run, as mlx-lm's trainer does
    (mlx_lm.utils.maybe_set_recommended_wired_limit), so weights and optimizer state are not paged
    out between steps; the previous limit comes back afterwards. A no-op without Metal (the CPU)."""
    size = mx.device_info().get("max_recommended_working_set_size") if mx.metal.is_available() else None
    if size is None:
        yield
        return
    old = mx.set_wired_limit(size)
    try:
        yield
    finally:
        mx.set_wired_limit(old)


class Loop:
    """One training run in progress (see train())."""

    def __init__(self, model, optimizer, train_data, val_data, objective, *, args: TrainConfig, run: RunDir,
                 adapter_config, reference, log, clear_cache_threshold, callbacks, schedule):
        if len(train_data) == 0:
            raise DataError("the training set is empty")
        self.model, self.optimizer, self.objective, self.args, self.rundir = model, optimizer, objective, args, run
        self.train_data, self.val_data = train_data, val_data
        self.adapter_config, self.reference, self.log = adapter_config, reference, log
        self.clear_cache_threshold, self.callbacks = clear_cache_threshold, list(callbacks)
        self.group = dist.group()
        self.world, self.rank = self.group.size(), self.group.rank()
        self.main_rank = self.rank == 0
        # One step = one group of batch_size * accum samples, fed as `accum` micro-batches
        # of batch_size, normalised over the whole group: accumulation == a larger batch.
        self.plan = make_plan(args, len(train_data))
        self.schedule = schedule or shuffled_epochs(train_data.lengths(), self.plan.group_size, args.seed)
        self._epoch = (None, None)
        self.supervised = train_data.supervised_tokens()
        self.state = TrainState()
        self._open_window({})
        self.parts: StepParts | None = None  # built in run(), after a resume has loaded the optimizer

    def _loss(self, model, batch, norm):
        lp, n = batch_logprobs(model, batch, checkpoint=self.args.grad_checkpoint)
        return self.objective(lp, n, batch.r_ref, norm=norm)

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def _open_window(self, window: dict) -> None:
        """A report window: the step losses and metric sums since the last train record."""
        self.losses = list(window.get("losses", []))  # global values; the sums are rank 0's own
        sums = window.get("sums", {}) if self.world == 1 else {}
        self.meter = MetricMeter(self.objective.reductions, sums)
        self.window_tokens, self.window_time = 0, 0.0

    def groups_at(self, step: int) -> np.ndarray:
        """The sample indices of (0-based) step `step`."""
        epoch, pos = self.plan.epoch(step)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self.schedule(epoch))
        return self._epoch[1][pos]

    # -- the run

    def run(self, resume: bool) -> dict:
        if self.main_rank:
            self.rundir.root.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        elif self.val_data is not None:
            self.validate(0)
        compiled, why = use_compile(self.args.compile, world=self.world)
        if compiled or self.args.compile != "auto":
            self.log(f"training step: {why}")
        self.parts = StepParts(self.model, self.optimizer, self._loss, max_grad_norm=self.args.max_grad_norm,
                               compiled=compiled)
        self.model.train()
        self._emit("on_train_begin")
        stopped_early = False
        total = self.plan.total_steps
        with _StopFlag() as stop, Progress(total, "train", enabled=self.main_rank) as bar:
            bar.n = self.state.step
            while self.state.step < total:
                stopping = self.step(stop, bar)
                step = self.state.step
                if step % self.args.steps_per_report == 0 or step == total:
                    self.report()
                if step % self.args.steps_per_eval == 0 and step != total:
                    stopped_early = self.validate(step)
                if stopping and not stopped_early:  # after this step's evaluation, which resuming would skip
                    path = self.save()
                    raise Interrupted(f"stopped by signal {stop.signum or 'on another rank'} at step {step}; "
                                      f"checkpoint {path}")
                if step % self.args.steps_per_save == 0 and step != total:
                    self.save()
                if stopped_early:
                    self.log(f"early stopping at step {step}: no improvement in "
                             f"{self.args.early_stopping_patience} evaluations")
                    break
        if not stopped_early:
            self.validate(self.state.step)
        final = {}
        if self.val_data is not None and self.state.best_step is not None:
            final = {"best_val_loss": self.state.best_val, "best_step": self.state.best_step}
        self.save()
        self._emit("on_train_end", final)
        return final

    def step(self, stop: _StopFlag, bar) -> bool:
        """One optimizer step (all its micro-batches); returns whether any rank is stopping (a
        signal that arrived before this step's gradients are summed stops the run after it)."""
        args, st = self.args, self.state
        self._emit("on_step_begin", st.step + 1)
        tic = time.perf_counter()
        g = self.groups_at(st.step)
        norm = self.objective.norm(self.supervised[g])
        grads, loss, tokens, step_metrics = None, 0.0, 0, []
        for rows in shares(g, args.grad_accumulation_steps, self.rank, self.world):
            if len(rows) == 0:
                continue
            batch = self.parts.prepare(self.train_data.batch(rows))
            if self.reference is not None:
                batch.r_ref = mx.array(self.reference([self.train_data.samples[i] for i in batch.index]), mx.float32)
            self._emit("on_batch", batch)
            (part, metrics), grad = self.parts.grad(batch, norm)
            grads = grad if grads is None else tree_map(mx.add, grads, grad)
            mx.eval(grads, part, metrics)
            loss += part.item()
            step_metrics.append(metrics)
            tokens += int(metrics["n_tokens"].item()) if "n_tokens" in metrics else 0
        if grads is None:  # no row of this (partial) group is this rank's: it adds nothing
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        stopping = stop.signum is not None
        if self.world > 1:  # the ranks also agree on stopping: one rank's signal stops all at this step
            grads = dist.sum_gradients(grads, self.group)
            shared = mx.distributed.all_sum(mx.array([loss, stopping], mx.float64), group=self.group,
                                            stream=mx.cpu)
            dist.wait([grads, shared], f"summing gradients at step {st.step + 1}")
            loss, stopping = shared[0].item(), shared[1].item() > 0
        grads, gnorm = self.parts.clip(grads)
        applied = math.isfinite(loss) and math.isfinite(gnorm.item())
        if applied:  # the NaN policy decides before the (compiled or eager) update runs
            self.parts.update(grads)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
            for m in step_metrics:  # a skipped batch stays out of the logged means
                self.meter.add(m)
            self.losses.append(loss)
        elif args.nan_policy == "stop":
            raise NonFiniteLoss(
                f"non-finite loss ({loss}) or gradient norm ({gnorm.item()}) at step {st.step + 1}; "
                f"the last good checkpoint is kept in {self.rundir.checkpoints} "
                "(set train.nan_policy=skip to skip such batches)")
        else:
            st.skipped += 1
            self.log(f"step {st.step + 1}: non-finite loss or gradient, batch skipped (nan_policy=skip)")
        if self.clear_cache_threshold and mx.get_cache_memory() > self.clear_cache_threshold * 1e9:
            mx.clear_cache()
        st.step += 1
        self.grad_norm = gnorm.item()
        self.window_tokens += tokens * self.world  # for the progress bar; the log sums the ranks' counts
        self.window_time += time.perf_counter() - tic
        bar.advance(1, info=f"loss {loss:.4f} | {self.window_tokens / max(self.window_time, 1e-9):.0f} tok/s | "
                            f"peak {mx.get_peak_memory() / 1e9:.2f} GB")
        self._emit("on_step_end", {"step": st.step, "loss": loss, "grad_norm": self.grad_norm,
                                   "tokens": tokens, "applied": applied})
        return stopping

    def report(self) -> None:
        """Write the train record of the window that ends at this step; open the next one."""
        step = self.state.step
        if self.world > 1:
            self.meter.sums = dist.reduce_metrics(self.meter.sums, self.objective.reductions,
                                                  f"reducing metrics at step {step}")
        record = {"split": "train", "step": step, "loss": float(np.mean(self.losses)) if self.losses else None,
                  **self.objective.summary(self.meter.sums),
                  "lr": float(self.optimizer.learning_rate.item()), "grad_norm": _finite(self.grad_norm),
                  "skipped": self.state.skipped,
                  "tokens_per_sec": self.meter.sums.get("n_tokens", 0.0) / max(self.window_time, 1e-9),
                  "peak_memory_gb": mx.get_peak_memory() / 1e9, "epoch": step / self.plan.steps_per_epoch}
        self._write(record)
        self._emit("on_report", record)
        self._open_window({})

    def validate(self, step: int) -> bool:
        """Evaluate, keep the best adapters; returns True when early stopping triggers."""
        if self.val_data is None or len(self.val_data) == 0:
            return False
        st, args = self.state, self.args
        m = evaluate(self.model, self.val_data, self.objective, batch_size=args.batch_size,
                     max_batches=args.val_batches, group=self.group, seed=args.seed)
        record = {"split": "val", "step": step, **m}
        self._write(record)
        self.log(f"val   step {step}: " + self.objective.format(m))
        self._emit("on_eval", record)
        if st.best_val is None or m["loss"] < st.best_val:
            st.best_val, st.best_step, st.bad_evals = m["loss"], step, 0
            if self.main_rank:
                ckpt.save_adapters(self.model, self.rundir.best, self.adapter_config)
        else:
            st.bad_evals += 1
        return bool(args.early_stopping_patience) and st.bad_evals >= args.early_stopping_patience

    def save(self):
        """Checkpoint and latest adapters (rank 0); returns the checkpoint's path (None elsewhere)."""
        if not self.main_rank:
            return None
        # The open report window too, so that a resumed run logs the same means.
        self.state.window = {"losses": self.losses, "sums": self.meter.sums}
        path = ckpt.save_checkpoint(self.rundir, self.state.step, self.model, self.optimizer, self.adapter_config,
                                    self.state.to_json())
        ckpt.save_adapters(self.model, self.rundir.adapters, self.adapter_config)
        ckpt.prune(self.rundir, self.args.keep_last)
        self._emit("on_save", path)
        return path

    def _write(self, record: dict) -> None:
        if self.main_rank:
            with open(self.rundir.metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _resume(self) -> None:
        """Load the latest checkpoint on rank 0 and send it to the other ranks, which need no
        copy of the run folder (only its config.yaml, which the CLI reads)."""
        if self.main_rank:
            path = ckpt.latest_checkpoint(self.rundir)
            if path is None:
                raise InputMissing(f"{self.rundir}: no complete checkpoint to resume from")
            loaded = ckpt.load_checkpoint(path, self.model, self.optimizer)
        else:
            self.optimizer.init(self.model.trainable_parameters())
            loaded = None
        if self.world > 1:
            what = "receiving the checkpoint from rank 0"
            params, opt_state, rng = dist.broadcast(
                [self.model.trainable_parameters(), self.optimizer.state, [mx.random.state[0]]], what)
            self.model.update(params)
            self.optimizer.state = opt_state
            ckpt.set_rng_key(rng[0])
            loaded = dist.broadcast_json(loaded, what)
        self.state = TrainState.from_json(loaded)
        if self.state.data_order != DATA_ORDER:
            self.log(f"note: the checkpoint was written by a version that composed batches otherwise "
                     f"({self.state.data_order or 'fixed length-sorted groups'}); from here on they are "
                     f"{DATA_ORDER}")
        self.state.data_order = DATA_ORDER
        if self.main_rank:
            _truncate_metrics(self.rundir.metrics, self.state.step)
            ckpt.clean_partial(self.rundir)  # a checkpoint whose writing was cut off
        self.log(f"resumed from {ckpt.latest_checkpoint(self.rundir)} at step {self.state.step}/{self.plan.total_steps}")
        self._open_window(self.state.window)
        self.state.window = {}


def _truncate_metrics(path, step: int) -> None:
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
