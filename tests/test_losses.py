"""Exact-value and gradient tests for the objectives (math in each docstring)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from poft_mlx.training.objectives import MetricMeter, Poft, dpo_loss, poft_loss, sft_loss
from tiny import matmul_tol


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_poft_loss_matches_hand_computed_values():
    """r_theta = lp/n: [-2/2, -6/3] = [-1, -2]; r_ref = [-1.5, -1.0].
    z = beta*(r_theta - r_ref) + gamma with beta=1, gamma=0: [0.5, -1.0].
    L = mean(-log sigmoid(z)) = (softplus(-0.5) + softplus(1.0)) / 2."""
    lp, n, r_ref = mx.array([-2.0, -6.0]), mx.array([2.0, 3.0]), mx.array([-1.5, -1.0])
    loss, m = poft_loss(lp, n, r_ref)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["tau_sum"].item() == pytest.approx(_sig(-0.5) + _sig(1.0), rel=1e-6)
    assert m["win_sum"].item() == 1.0  # only sample 0 beats its reference
    assert m["margin_sum"].item() == pytest.approx(0.5 - 1.0)
    assert m["ce_sum"].item() == pytest.approx(8.0)


def test_poft_beta_gamma():
    """beta=2, gamma=0.3: z = 2*(-1 - (-1.5)) + 0.3 = 1.3; L = softplus(-1.3)."""
    loss, m = poft_loss(mx.array([-2.0]), mx.array([2.0]), mx.array([-1.5]), beta=2.0, gamma=0.3)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.3)), rel=1e-6)
    assert m["tau_sum"].item() == pytest.approx(_sig(-1.3), rel=1e-6)


def test_poft_loss_normaliser_sums_over_samples():
    lp, n, r = mx.array([-1.0, -3.0, -2.0]), mx.array([1.0, 2.0, 4.0]), mx.array([-1.0, -1.0, -1.0])
    full, _ = poft_loss(lp, n, r)
    a, _ = poft_loss(lp[:2], n[:2], r[:2], norm=3)
    b, _ = poft_loss(lp[2:], n[2:], r[2:], norm=3)
    assert (a + b).item() == pytest.approx(full.item(), rel=1e-6)


def test_sft_loss_is_token_mean_ce():
    """CE = -(lp_0 + lp_1) / (n_0 + n_1) = 8 / 5."""
    loss, _ = sft_loss(mx.array([-2.0, -6.0]), mx.array([2.0, 3.0]))
    assert loss.item() == pytest.approx(8 / 5)


def test_no_gradient_flows_into_r_ref():
    g = mx.grad(lambda r: poft_loss(mx.array([-2.0]), mx.array([2.0]), r)[0])(mx.array([-1.5]))
    assert g.item() == 0.0


def test_poft_gradient_is_tau_times_ce_gradient_per_sample():
    """For a tiny linear-softmax model, grad L_i == tau_i * grad CE_i with
    CE_i = -r_theta_i (token-mean), tau_i = sigmoid(r_ref_i - r_theta_i)."""
    mx.random.seed(0)
    model = nn.Linear(6, 11)
    x = mx.random.normal((2, 5, 6))
    y = mx.random.randint(0, 11, (2, 5))
    mask = mx.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], mx.float32)
    r_ref = mx.array([-1.0, -4.0])

    def lp_of(m, i):
        logits = m(x[i])
        lp = -nn.losses.cross_entropy(logits, y[i]) * mask[i]
        return lp.sum(), mask[i].sum()

    for i in range(2):
        def poft(m):
            lp, n = lp_of(m, i)
            return poft_loss(lp[None], n[None], r_ref[i:i + 1])[0]

        def ce(m):
            lp, n = lp_of(m, i)
            return -lp / n

        g_poft = nn.value_and_grad(model, poft)(model)[1]
        g_ce = nn.value_and_grad(model, ce)(model)[1]
        lp, n = lp_of(model, i)
        tau = _sig(r_ref[i].item() - (lp / n).item())
        for k in ("weight", "bias"):
            np.testing.assert_allclose(np.array(g_poft[k]), tau * np.array(g_ce[k]), rtol=matmul_tol(1e-4),
                                       atol=matmul_tol(1e-7))
        assert 0.0 < tau < 1.0


def test_dpo_loss_exact():
    """h = beta*((lc - rc) - (lr - rr)) = 0.1*((-10+12) - (-20+19)) = 0.3; L = softplus(-0.3)."""
    loss, m = dpo_loss(mx.array([-10.0]), mx.array([-20.0]), mx.array([-12.0]), mx.array([-19.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)
    assert m["reward_acc_sum"].item() == 1.0
    assert m["margin_sum"].item() == pytest.approx(3.0, rel=1e-5)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    """dL/dlc = -beta*sigmoid(-h), dL/dlr = +beta*sigmoid(-h)."""
    f = lambda lc, lr: dpo_loss(lc, lr, mx.array([-12.0]), mx.array([-19.0]), beta=0.1)[0]  # noqa: E731
    gc, gr = mx.grad(f, argnums=(0, 1))(mx.array([-10.0]), mx.array([-20.0]))
    assert gc.item() == pytest.approx(-0.1 * _sig(-0.3), rel=1e-5)
    assert gr.item() == pytest.approx(0.1 * _sig(-0.3), rel=1e-5)


def test_metric_meter_reduces_exactly():
    meter = MetricMeter(Poft.reductions)
    for lp, n, r in [([-2.0], [2.0], [-1.5]), ([-6.0], [3.0], [-1.0])]:
        meter.add(poft_loss(mx.array(lp), mx.array(n), mx.array(r))[1])
    s = Poft().summary(meter.sums)
    assert s["ce"] == pytest.approx(8 / 5)
    assert s["win_rate"] == pytest.approx(0.5)
    assert s["tau_min"] == pytest.approx(_sig(-0.5), rel=1e-6)
    assert s["tau_max"] == pytest.approx(_sig(1.0), rel=1e-6)
    assert s["ppl"] == pytest.approx(math.exp(8 / 5), rel=1e-6)
