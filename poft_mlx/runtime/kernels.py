"""CPU-tuned replacements for the exp-heavy parts of a decoder, and a memory-bounded output layer.

MLX's CPU backend evaluates `exp` (and so sigmoid, silu, softmax) one element at a time,
several times slower than the same float32 polynomial written as vectorisable array ops
(4-6x measured, docs/benchmarks.md). Next to the BLAS matmuls those ops are a large share of
a small model's step: SwiGLU at every token and attention's softmax over the causal square,
which mx.fast.scaled_dot_product_attention computes whole on the CPU. On the CPU,
`patched(model)` swaps mlx-lm's SwiGLU and attention for the versions below while poft-mlx
runs the model; other backends keep MLX's own fused kernels.

`chunked_logprobs` (every backend) bounds the output layer's memory when the supervised
positions x vocabulary do not fit one chunk: in training it forms each position's gradient
with respect to its hidden state in the forward pass (d lp / d h = W[y] - softmax(hW^T) W,
linear in the upstream gradient), so no chunk's logits or softmax outlive the chunk.
"""

from __future__ import annotations

import contextlib
import os
import sys

import mlx.core as mx

# The float32 polynomial of MLX's own exp (mlx/backend/cpu/simd/math.h): 2^x = 2^n * p(f).
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)


def _exp_raw(x):
    t = mx.clip(x.astype(mx.float32) * 1.4426950408889634, -126.0, 127.0)
    n = (t + 128.5).astype(mx.int32)  # round(t) + 128 >= 2: truncation is floor here
    f = t - (n - 128).astype(mx.float32)
    p = _EXP2_POLY[0] * f + _EXP2_POLY[1]
    for c in _EXP2_POLY[2:]:
        p = p * f + c
    return p * mx.view((n - 1) << 23, mx.float32)  # 2^(n - 128) from its IEEE-754 bits


def _sigmoid_raw(x):
    return 1.0 / (1.0 + _exp_raw(-x))


# Compiled, not shapeless (View needs known shapes). MLX fuses each into a few loops when
# called directly, and runs them op by op inside value_and_grad: faster than exp either way.
_exp = mx.compile(_exp_raw)
_swiglu_fwd = mx.compile(lambda gate, x: gate * _sigmoid_raw(gate) * x)


@mx.compile
def _swiglu_bwd(gate, x, cotangent):
    s = _sigmoid_raw(gate)
    gs = gate * s
    return cotangent * x * (s + gs * (1.0 - s)), cotangent * gs


@mx.compile
def _softmax_fwd(x):
    e = _exp_raw(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@mx.compile
def _softmax_bwd(p, cotangent):
    return p * (cotangent - (cotangent * p).sum(axis=-1, keepdims=True))


@mx.custom_function
def exp(x):
    """exp(x) in float32 from vectorisable ops (within 2 ulp of mx.exp; 0 below -87.3 is ~1e-38)."""
    return _exp(x)


@exp.vjp
def _exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


@mx.custom_function
def swiglu(gate, x):
    """silu(gate) * x (mlx_lm.models.activations.swiglu), float32."""
    return _swiglu_fwd(gate, x)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_bwd(*primals, cotangent)


@mx.custom_function
def softmax(x):
    """Softmax over the last axis."""
    return _softmax_fwd(x)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (_softmax_bwd(output, cotangent),)


def _causal_bias(q_len: int, k_len: int, start: int, reps: int) -> mx.array:
    """Additive mask for queries start..start+q_len over keys 0..k_len, tiled `reps` times.

    Built in the graph (not cached), so that a compiled training step can trace it.
    """
    q = mx.arange(reps * q_len, dtype=mx.int32) % q_len + start if reps > 1 else mx.arange(start, start + q_len)
    return mx.where(q[:, None] >= mx.arange(k_len)[None], 0.0, -mx.inf).astype(mx.float32)


def attention(q, k, v, *, scale: float, mask=None, block: int = 64):
    """Scaled dot-product attention for [B, H, L, D] queries over [B, Hkv, S, D] keys/values;
    mask None or "causal".

    Grouped-query heads share one matmul per key head (queries of a group stacked along L);
    a causal mask skips the key blocks above the diagonal: query block i reads keys up to
    its own end, so about half of the square is never computed. 64-query blocks measured
    fastest on 2 x86 cores (forward + backward 2.4x faster than mx.fast at L = 240-480).
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    reps = H // Hkv
    q = (q * scale).reshape(B, Hkv, reps, L, D)
    causal = isinstance(mask, str) and mask == "causal"
    if causal and L != S:
        raise ValueError("causal attention needs as many keys as queries")
    bounds = list(range(0, L, block)) + [L] if causal else [0, L]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        end = b if causal else S
        qb = q[:, :, :, a:b].reshape(B, Hkv, reps * (b - a), D)
        s = qb @ k[:, :, :end].swapaxes(-1, -2)
        if causal:
            s = s + _causal_bias(b - a, end, a, reps)
        p = softmax(s)
        outs.append((p @ v[:, :, :end]).reshape(B, Hkv, reps, b - a, D))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(B, H, L, D)


def sdpa(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx_lm.models.base.scaled_dot_product_attention for float32 training and scoring on the CPU."""
    from mlx_lm.models import base  # lazy: mlx-lm's import is slow

    plain = cache is None and sinks is None and queries.dtype == mx.float32 and (
        mask is None or (isinstance(mask, str) and mask == "causal" and queries.shape[2] == keys.shape[2]))
    if not plain:
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return attention(queries, keys, values, scale=scale, mask=mask)


def enabled() -> bool:
    """CPU kernels are on for the CPU backend unless POFT_MLX_CPU_KERNELS=0."""
    return mx.default_device() == mx.cpu and os.environ.get("POFT_MLX_CPU_KERNELS", "1") != "0"


_PATCHES = {"scaled_dot_product_attention": sdpa, "swiglu": swiglu}


@contextlib.contextmanager
def patched(model):
    """While building `model`'s graph, its architecture module uses the CPU kernels above.

    Only the names the module imported from mlx-lm (scaled_dot_product_attention, swiglu)
    are swapped, and only for the duration of the block; other models are unaffected.
    """
    module = sys.modules.get(type(model).__module__)
    if not enabled() or module is None:
        yield
        return
    saved = {k: getattr(module, k) for k in _PATCHES if hasattr(module, k)}
    try:
        for k in saved:
            setattr(module, k, _PATCHES[k])
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


# ---------------------------------------------------------------------------- output layer
# Log-probabilities over the vocabulary: [positions, vocab] arrays, the largest of a step.
# On the CPU the exponentials use the polynomial above (MLX's exp costs ~11 ns per element
# there: 0.7 s per logsumexp of 1228 positions x 49152 tokens); elsewhere MLX's own exp.


@mx.compile
def _softmax_parts_fast(logits):
    m = logits.max(axis=-1, keepdims=True)
    e = _exp_raw(logits - m)
    return m, e, e.sum(axis=-1, keepdims=True)


def _softmax_parts(logits):
    """(row max m, e = exp(logits - m), row sum of e), float32 logits [K, V]."""
    if enabled():
        return _softmax_parts_fast(logits)
    m = logits.max(axis=-1, keepdims=True)
    e = mx.exp(logits - m)
    return m, e, e.sum(axis=-1, keepdims=True)


@mx.compile
def _softmax_cotangent_fast(x, lse, cotangent):
    return cotangent * _exp_raw(x - lse)


@mx.compile
def _onehot_minus(e, inv_s, targets):
    """onehot(targets) - e * inv_s in one pass over [K, V]."""
    return (mx.arange(e.shape[-1], dtype=targets.dtype)[None] == targets[:, None]).astype(e.dtype) - e * inv_s


@mx.custom_function
def _logsumexp_fast(x):
    m, _, s = _softmax_parts_fast(x)
    return (m + mx.log(s))[..., 0]


@_logsumexp_fast.vjp
def _logsumexp_fast_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals  # one input: MLX passes the array
    return (_softmax_cotangent_fast(x, output[..., None], cotangent[..., None]),)


def logsumexp(x):
    """log sum exp over the last axis of float32 [K, V] (differentiable)."""
    return _logsumexp_fast(x) if enabled() else mx.logsumexp(x, axis=-1)


def token_logprobs(head, h, targets):
    """log p(targets | h) for hidden states h [K, d] through `head`, float32 [K]."""
    logits = head(h).astype(mx.float32)
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - logsumexp(logits)


def chunked_logprobs(head, h, targets, chunk: int, *, with_grad: bool = False, checkpoint: bool = False):
    """token_logprobs over chunks of `chunk` positions, for memory bounded in positions x vocab.

    with_grad (training with a frozen head): each chunk's d lp / d h is formed in the forward
    pass (module docstring), so the backward pass keeps no logits. checkpoint: recompute each
    chunk in the backward pass instead (a trainable head). Each chunk depends on the previous
    chunk's results, or MLX would schedule them side by side and hold all their logits at once.
    """
    fn = _fused_logprobs(head) if with_grad else lambda x, t: (token_logprobs(head, x, t),)
    if checkpoint and not with_grad and h.shape[0] > chunk:
        fn = mx.checkpoint(fn)
    out, done = [], []
    for i in range(0, h.shape[0], chunk):
        hc = h[i:i + chunk]
        if done:
            hc = mx.depends(hc, done)
        done = list(fn(hc, targets[i:i + chunk]))
        out.append(done[0])
    return mx.concatenate(out) if len(out) > 1 else out[0]


def _fused_logprobs(head):
    @mx.custom_function
    def fused(h, targets):
        logits = head(h).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        m, e, s = _softmax_parts(logits)
        lp = picked - (m + mx.log(s))[:, 0]
        d = _onehot_minus(e, 1.0 / s, targets)  # d lp / d logits
        grad_h = mx.vjp(head, [h], [d.astype(h.dtype)])[1][0]  # (onehot - p) W
        return lp, grad_h

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        g = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        return g[:, None].astype(outputs[1].dtype) * outputs[1], mx.zeros_like(primals[1])

    return fused
