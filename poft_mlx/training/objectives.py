"""Objectives as pure functions of per-sample log-likelihoods (float32 reductions).

Inputs per sample i: ``lp_sum[i]`` = sum of log p(y_t | ...) over the supervised tokens,
``n_tok[i]`` = their count. Each objective returns (loss, metrics) where ``loss`` is a
sum over the local samples divided by ``norm`` (the global count of samples or tokens,
so gradients summed over data-parallel ranks equal the single-process gradient).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def sequence_scores(lp_sum: mx.array, n_tok: mx.array) -> mx.array:
    """Token-mean log-likelihood r(x, y) = log p(y|x) / T(y)  [B]."""
    return lp_sum.astype(mx.float32) / mx.maximum(n_tok.astype(mx.float32), 1.0)


def poft_loss(lp_sum, n_tok, r_ref, *, beta: float = 1.0, gamma: float = 0.0, norm=None):
    """PoFT (Fan et al. 2024, arXiv 2412.12865, eq. 4): Bradley-Terry over models.

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
    return per_sample.sum() / norm, _metrics(lp_sum, n_tok, r_theta, r_ref, z)


def sft_loss(lp_sum, n_tok, r_ref=None, *, beta: float = 1.0, gamma: float = 0.0, norm=None):
    """Token-mean cross-entropy over the batch: -sum_i lp_sum_i / sum_i n_tok_i.

    (norm = the number of supervised tokens.) PoFT metrics are logged when r_ref is known.
    """
    norm = n_tok.astype(mx.float32).sum() if norm is None else norm
    loss = -lp_sum.astype(mx.float32).sum() / norm
    r_theta = sequence_scores(lp_sum, n_tok)
    if r_ref is None:
        r_ref = mx.full(r_theta.shape, mx.nan)
    z = beta * (r_theta - r_ref.astype(mx.float32)) + gamma
    return loss, _metrics(lp_sum, n_tok, r_theta, r_ref.astype(mx.float32), z)


def dpo_loss(lp_chosen, lp_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1, norm=None):
    """DPO (Rafailov et al. 2023, eq. 7) on summed log-likelihoods:

        h_i  = beta * ((lp_c - ref_c) - (lp_r - ref_r))
        L_i  = -log sigmoid(h_i),  loss = sum_i L_i / norm

    Reference log-likelihoods are constants (the frozen model before this stage).
    """
    h = beta * ((lp_chosen - mx.stop_gradient(ref_chosen)) - (lp_rejected - mx.stop_gradient(ref_rejected)))
    h = h.astype(mx.float32)
    per_sample = -nn.log_sigmoid(h)
    norm = per_sample.shape[0] if norm is None else norm
    metrics = {
        "reward_acc_sum": (h > 0).astype(mx.float32).sum(),
        "margin_sum": (h / beta).sum(),
        "n_samples": mx.array(per_sample.shape[0], mx.float32),
    }
    return per_sample.sum() / norm, metrics


def _metrics(lp_sum, n_tok, r_theta, r_ref, z) -> dict:
    """Sums (not means) so that they reduce exactly across batches and ranks."""
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


OBJECTIVES = {"poft": poft_loss, "sft": sft_loss}


class MetricMeter:
    """Accumulates metric sums from batches; `summary()` turns them into means."""

    def __init__(self):
        self.sums: dict[str, float] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = float(v.item() if hasattr(v, "item") else v)
            if k == "tau_min":
                self.sums[k] = min(self.sums.get(k, float("inf")), v)
            elif k == "tau_max":
                self.sums[k] = max(self.sums.get(k, float("-inf")), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v

    def summary(self) -> dict:
        import math

        s = self.sums
        n = max(s.get("n_samples", 0.0), 1.0)
        out = {}
        if "reward_acc_sum" in s:  # DPO (checked first: it also counts tokens)
            out["reward_acc"] = s["reward_acc_sum"] / n
            out["margin"] = s["margin_sum"] / n
            for k in ("reward_chosen", "reward_rejected"):
                if f"{k}_sum" in s:
                    out[k] = s[f"{k}_sum"] / n
            if "n_tokens_chosen" in s:
                out["ce_chosen"] = s["ce_chosen_sum"] / max(s["n_tokens_chosen"], 1.0)
            if "n_tokens" in s:
                out["tokens"] = s["n_tokens"]
        elif "n_tokens" in s:
            ntok = max(s["n_tokens"], 1.0)
            out["ce"] = s["ce_sum"] / ntok
            out["ppl"] = math.exp(min(out["ce"], 50.0))
            out["poft_loss"] = s["poft_sum"] / n
            out["tau_mean"] = s["tau_sum"] / n
            out["tau_min"] = s["tau_min"]
            out["tau_max"] = s["tau_max"]
            out["win_rate"] = s["win_sum"] / n
            out["margin"] = s["margin_sum"] / n
            out["tokens"] = s["n_tokens"]
        out["samples"] = s.get("n_samples", 0.0)
        return out
