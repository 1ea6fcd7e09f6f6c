"""CPU kernels and the chunked output layer: same values and gradients as MLX's own ops, bounded memory."""

import gc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu
from mlx_lm.tuner.utils import linear_to_lora_layers

import poft_mlx  # noqa: F401
from poft_mlx.runtime import kernels
from poft_mlx.models import modeling
from poft_mlx.training.objectives import poft_loss
from tiny import Enc, matmul_tol


def close(a, b, rel=1e-5):
    """Max-abs difference within `rel` of the largest magnitude (TF32 matmuls on CUDA: looser)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= matmul_tol(rel) * max(np.max(np.abs(b)), 1e-6), np.max(np.abs(a - b))


def test_exp_matches_mlx_over_the_float32_range():
    x = mx.concatenate([mx.linspace(-87, 88, 10001), mx.random.normal((1000,)) * 10])
    close(kernels.exp(x), mx.exp(x), rel=1e-6)
    assert kernels.exp(mx.array([-1e4]))[0].item() < 1e-37  # far below the range: ~0, not NaN


def test_swiglu_values_and_gradients():
    g, x, c = (mx.random.normal((3, 7, 48)) * 4 for _ in range(3))
    close(kernels.swiglu(g, x), mlx_lm_swiglu(g, x))
    ours = mx.vjp(kernels.swiglu, [g, x], [c])[1]
    ref = mx.vjp(mlx_lm_swiglu, [g, x], [c])[1]
    for a, b in zip(ours, ref):
        close(a, b)


@pytest.mark.parametrize("L,mask", [(200, "causal"), (64, "causal"), (130, None)])
def test_attention_matches_fast_sdpa(L, mask):
    q = mx.random.normal((2, 6, L, 16))
    k, v = mx.random.normal((2, 2, L, 16)), mx.random.normal((2, 2, L, 16))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    close(kernels.attention(q, k, v, scale=0.25, mask=mask, block=64), ref)
    c = mx.random.normal(ref.shape)
    ours = mx.vjp(lambda *a: kernels.attention(*a, scale=0.25, mask=mask, block=64), [q, k, v], [c])[1]
    theirs = mx.vjp(lambda *a: mx.fast.scaled_dot_product_attention(*a, scale=0.25, mask=mask), [q, k, v], [c])[1]
    for a, b in zip(ours, theirs):
        close(a, b)


def tiny_model(vocab=500, tied=True):
    mx.random.seed(3)
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
                           tie_word_embeddings=tied)
    model = llama.Model(args)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))  # nonzero lora_b
    mx.eval(model.parameters())
    return model


def batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    encs = [Enc(rng.integers(0, vocab, n), n // 3) for n in lengths]
    return modeling.make_batch(encs, range(len(encs)), r_ref=-np.arange(5.0, 5.0 + len(encs)))


def loss_and_grads(model, b, **kw):
    fn = lambda m: poft_loss(*modeling.batch_logprobs(m, b, **kw), b.r_ref, norm=float(b.size))[0]  # noqa: E731
    loss, grads = nn.value_and_grad(model, fn)(model)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


def plain_logprobs(model, b):
    logits = model(b.tokens[:, :-1]).reshape(-1, model.args.vocab_size)[b.pos]
    lp = (mx.take_along_axis(logits, b.targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)) * b.valid
    return (b.row[None, :] == mx.arange(b.size)[:, None]).astype(mx.float32) @ lp


def plain_loss_and_grads(model, b):
    """The textbook computation: full logits from mlx-lm's model, MLX's logsumexp, autodiff."""
    fn = lambda m: poft_loss(plain_logprobs(m, b), b.n_tok, b.r_ref, norm=float(b.size))[0]  # noqa: E731
    loss, grads = nn.value_and_grad(model, fn)(model)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


def test_logsumexp_values_and_gradients():
    x = mx.concatenate([mx.random.normal((5, 3000)) * 30, mx.full((1, 3000), -1e4), mx.zeros((1, 3000))]) + 50
    close(kernels.logsumexp(x), mx.logsumexp(x, axis=-1), rel=1e-6)
    c = mx.random.normal((x.shape[0],))
    close(mx.vjp(kernels.logsumexp, [x], [c])[1][0], mx.vjp(lambda a: mx.logsumexp(a, axis=-1), [x], [c])[1][0])


@pytest.mark.parametrize("tied", [True, False])
def test_kernels_and_chunked_head_leave_losses_and_gradients_unchanged(monkeypatch, tied):
    model, b = tiny_model(tied=tied), batch(500, [37, 50, 23])
    monkeypatch.setenv("POFT_MLX_CPU_KERNELS", "0")
    ref_loss, ref_grads = plain_loss_and_grads(model, b)
    small = 64 * 500 * 4  # 64 positions per chunk: several chunks, gradients formed in the forward pass
    for env, kw in (("0", {}), ("1", {}), ("1", {"budget": small}), ("0", {"budget": small})):
        monkeypatch.setenv("POFT_MLX_CPU_KERNELS", env)
        loss, grads = loss_and_grads(model, b, **kw)
        assert loss == pytest.approx(ref_loss, rel=matmul_tol(1e-6))
        for k in ref_grads:
            close(grads[k], ref_grads[k], rel=1e-5)
    model.eval()
    for env in ("0", "1"):
        monkeypatch.setenv("POFT_MLX_CPU_KERNELS", env)
        close(modeling.batch_logprobs(model, b, budget=small)[0], modeling.batch_logprobs(model, b)[0])
        close(modeling.batch_logprobs(model, b)[0], plain_logprobs(model, b))


def test_patch_is_scoped_to_the_call():
    model = tiny_model()
    with kernels.patched(model):  # only on the CPU backend
        assert (llama.scaled_dot_product_attention is kernels.sdpa) == kernels.enabled()
    assert llama.scaled_dot_product_attention is not kernels.sdpa
    assert llama.swiglu is mlx_lm_swiglu


cpu_only = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend behaviour")


# MLX's GPU backends allocate a graph's buffers as they encode it, ahead of execution, so
# there the chunks' transients are bounded by mx.set_memory_limit rather than by their order.
@cpu_only
def test_training_memory_does_not_grow_with_positions_times_vocabulary():
    vocab, L = 32000, 256
    model = tiny_model(vocab=vocab)
    budget = 16 * 2**20

    def peak(n):
        b = batch(vocab, [L] * n, seed=n)
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        loss_and_grads(model, b, budget=budget)
        return mx.get_peak_memory() - base

    growth = peak(6) - peak(1)
    logits_growth = 5 * (L - 1) * vocab * 4  # what holding the logits of 5 more sequences would add
    assert growth < 0.25 * logits_growth, (growth, logits_growth)


@cpu_only  # poft-mlx swaps in dequantized matmuls on the CPU backend only
def test_dequantized_matmuls_match_quantized_matmul():
    mx.random.seed(4)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
                           tie_word_embeddings=True)
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    mx.eval(model.parameters())
    b = batch(256, [40, 33])
    ref_loss, ref_grads = loss_and_grads(model, b)
    model.eval()
    ref_lp = modeling.batch_logprobs(model, b)[0]
    model.train()
    assert modeling.use_dequantized_matmuls(model) == 2 * 7 + 1  # 7 linears per block + the tied head
    # The head dequantized once per batch (fits the budget), or per chunk (a budget smaller than it).
    for kw in ({}, {"budget": 32 * 1024}):
        loss, grads = loss_and_grads(model, b, **kw)
        assert loss == pytest.approx(ref_loss, rel=matmul_tol(1e-5))
        for k in ref_grads:
            close(grads[k], ref_grads[k], rel=1e-4)
        model.eval()
        close(modeling.batch_logprobs(model, b, **kw)[0], ref_lp)
        model.train()
