"""The array work of a training step, eager or compiled with mx.compile (train.compile).

Three parts: the loss and gradients of one micro-batch, the gradient norm (and clipping), and
the optimizer update. Compiled, as mlx-lm's trainer compiles its step, each part declares the
state it reads and writes (the gradients: model.state and mx.random.state, for LoRA dropout;
the update: model.state and optimizer.state), is traced once per input shape and then replayed
with its elementwise chains fused. What lies between the parts stays in Python, the same code
for both paths: adding the micro-batches' gradients, the data-parallel sum, and the NaN policy,
which reads the step's loss and gradient norm before it lets the update run.

A new shape is a new trace (about a second for a 135M model), so a compiled run pads each batch
to bucket lengths (modeling.pad_to_buckets) and shapes repeat; the padding is masked out of
every sum, so the loss is the same.
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..models.modeling import Batch, pad_to_buckets, split_head
from ..runtime import device

_ARRAYS = tuple(f.name for f in fields(Batch) if f.name != "index")


def use_compile(setting: str | bool, *, world: int, backend: str | None = None) -> tuple[bool, str]:
    """Whether to compile the step, and why (for the log).

    `auto` compiles on a GPU (Metal, CUDA), where the fused elementwise kernels pay, and stays
    eager on the CPU, where a step is bound by BLAS and mx.compile's CPU code (a C++ file built
    per fused kernel) did not pay on our 2-core machine (docs/benchmarks.md, "Compiled step").
    Data-parallel runs are always eager: the collectives run between the parts either way, but
    no test covers compiled ranks.
    """
    if world > 1:
        return False, "data-parallel run: eager (compiled ranks are untested)"
    if setting is True:
        return True, "train.compile=true"
    if setting is False:
        return False, "train.compile=false"
    backend = backend or device.backend()
    if backend == "cpu":
        return False, "train.compile=auto on the CPU: eager"
    return True, f"train.compile=auto on {backend}: compiled"


def _own_nodes(out):
    loss, metrics = out
    return loss, tree_map(lambda m: m * 1, metrics)


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


class StepParts:
    """grad(batch, norm) -> ((loss, metrics), grads); clip(grads) -> (grads, norm);
    update(grads) applies the optimizer. Build it after a resume has loaded the optimizer
    state: the compiled update holds on to the state dict that is current then."""

    def __init__(self, model, optimizer, loss_fn, *, max_grad_norm: float | None, compiled: bool):
        self.compiled = compiled
        self.shapes: set = set()  # the distinct micro-batch shapes seen (each one trace when compiled)
        value_and_grad = nn.value_and_grad(model, loss_fn)

        def clip(grads):
            if max_grad_norm:
                return optim.clip_grad_norm(grads, max_grad_norm)
            return grads, _global_norm(grads)

        if not compiled:
            self._grad = lambda batch, norm: value_and_grad(model, batch, norm)
            self.clip = clip
            self.update = lambda grads: optimizer.update(model, grads)
            return
        # Read back arrays once, eagerly, before any trace: the output-layer probe and the
        # optimizer's first moments (a trace cannot create state it does not declare).
        split_head(model)
        optimizer.init(model.trainable_parameters())
        # MLX 0.32 fails a compiled value_and_grad ("_Map_base::at") whose auxiliary output is
        # also a node of the loss (PoFT's poft_sum is the loss before it is divided by norm);
        # a multiply by 1 makes each metric a node of its own, the same value.
        value_and_grad = nn.value_and_grad(model, lambda *a: _own_nodes(loss_fn(*a)))
        grad_state = [model.state, mx.random.state]
        update_state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=grad_state, outputs=grad_state)
        def grad(arrays, norm):
            return value_and_grad(model, Batch(*arrays, index=None), norm)

        @partial(mx.compile, inputs=update_state, outputs=update_state)
        def update(grads):
            optimizer.update(model, grads)

        self._grad = lambda batch, norm: grad([getattr(batch, k) for k in _ARRAYS], mx.array(norm, mx.float32))
        self.clip = mx.compile(clip)
        self.update = update

    def prepare(self, batch: Batch) -> Batch:
        """The batch as the gradient part takes it: padded to bucket lengths when compiled."""
        if self.compiled:
            batch = pad_to_buckets(batch)
        self.shapes.add((batch.tokens.shape, batch.pos.shape))
        return batch

    def grad(self, batch: Batch, norm: float):
        return self._grad(batch, norm)
