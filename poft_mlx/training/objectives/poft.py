"""PoFT (Fan et al. 2024, arXiv 2412.12865, eq. 4): Bradley-Terry between the target and aligned models."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .base import Objective, register


def sequence_scores(lp_sum: mx.array, n_tok: mx.array) -> mx.array:
    """Token-mean log-likelihood r(x, y) = log p(y|x) / T(y)  [B]."""
    return lp_sum.astype(mx.float32) / mx.maximum(n_tok.astype(mx.float32), 1.0)


def poft_loss(lp_sum, n_tok, r_ref, *, beta: float = 1.0, gamma: float = 0.0, norm=None):
    """PoFT's loss:

        r_theta = lp_sum / n_tok                      (target, token-mean log-lik)
        L_i     = -log sigmoid(beta * (r_theta - r_ref) + gamma)
        loss    = sum_i L_i / norm                    (norm = number of samples)

    r_ref is a constant (no gradient). dL_i/dtheta = beta * tau_i * dCE_i/dtheta with
    tau_i = sigmoid(-(beta * (r_theta - r_ref) + gamma)) and CE_i = -r_theta: the
    per-sample cross-entropy gradient, softly weighted.
    """
    r_theta = sequence_scores(lp_sum, n_tok)
    r_ref = mx.stop_gradient(r_ref.astype(mx.float32))
    z = beta * (r_theta - r_ref) + gamma
    per_sample = -nn.log_sigmoid(z)
    norm = per_sample.shape[0] if norm is None else norm
    return per_sample.sum() / norm, preference_metrics(lp_sum, n_tok, r_theta, r_ref, z)


def preference_metrics(lp_sum, n_tok, r_theta, r_ref, z) -> dict:
    """CE and the PoFT quantities as sums (not means), so that they reduce exactly across
    batches and ranks (PREFERENCE_REDUCTIONS says how)."""
    tau = mx.sigmoid(-z)
    return {
        "ce_sum": -lp_sum.astype(mx.float32).sum(),  # summed over tokens
        "n_tokens": n_tok.astype(mx.float32).sum(),
        "poft_sum": (-nn.log_sigmoid(z)).sum(),
        "tau_sum": tau.sum(),
        "tau_min": tau.min(),
        "tau_max": tau.max(),
        "win_sum": (r_theta > r_ref).astype(mx.float32).sum(),
        "margin_sum": (r_theta - r_ref).sum(),
        "n_samples": mx.array(r_theta.shape[0], mx.float32),
    }


PREFERENCE_REDUCTIONS = {"ce_sum": "sum", "n_tokens": "sum", "poft_sum": "sum", "tau_sum": "sum",
                         "tau_min": "min", "tau_max": "max", "win_sum": "sum", "margin_sum": "sum",
                         "n_samples": "sum"}


def preference_summary(s: dict) -> dict:
    """The logged means of preference_metrics' sums."""
    n = max(s.get("n_samples", 0.0), 1.0)
    out = {}
    if "n_tokens" in s:
        ce = s["ce_sum"] / max(s["n_tokens"], 1.0)
        out = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "poft_loss": s["poft_sum"] / n,
               "tau_mean": s["tau_sum"] / n, "tau_min": s["tau_min"], "tau_max": s["tau_max"],
               "win_rate": s["win_sum"] / n, "margin": s["margin_sum"] / n, "tokens": s["n_tokens"]}
    out["samples"] = s.get("n_samples", 0.0)
    return out


@register
class Poft(Objective):
    name = "poft"
    description = "Preference-Oriented Supervised Fine-Tuning (PoFT, arXiv 2412.12865)"
    normaliser = "samples"
    needs_aligned = True
    reductions = PREFERENCE_REDUCTIONS
    display = ("loss", "ce", "ppl", "tau_mean", "win_rate", "margin")

    def __init__(self, beta: float = 1.0, gamma: float = 0.0):
        self.beta, self.gamma = beta, gamma

    @classmethod
    def from_config(cls, cfg) -> "Poft":
        return cls(beta=cfg.beta, gamma=cfg.gamma)

    @classmethod
    def hyperparameters(cls, config: dict) -> dict:
        return {"beta": config.get("beta"), "gamma": config.get("gamma")}

    def loss(self, lp_sum, n_tok, ref, *, norm):
        return poft_loss(lp_sum, n_tok, ref, beta=self.beta, gamma=self.gamma, norm=norm)

    def summary(self, sums: dict) -> dict:
        return preference_summary(sums)
