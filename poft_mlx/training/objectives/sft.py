"""Supervised fine-tuning: token-mean cross-entropy (PoFT's quantities logged when aligned scores are known)."""

from __future__ import annotations

import mlx.core as mx

from .base import Objective, register
from .poft import PREFERENCE_REDUCTIONS, preference_metrics, preference_summary, sequence_scores


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
    return loss, preference_metrics(lp_sum, n_tok, r_theta, r_ref.astype(mx.float32), z)


@register
class Sft(Objective):
    name = "sft"
    description = "supervised fine-tuning (cross-entropy)"
    normaliser = "tokens"
    reductions = PREFERENCE_REDUCTIONS
    display = ("loss", "ce", "ppl", "tau_mean", "win_rate", "margin")

    def __init__(self, beta: float = 1.0, gamma: float = 0.0):
        self.beta, self.gamma = beta, gamma  # for the logged PoFT quantities only

    @classmethod
    def from_config(cls, cfg) -> "Sft":
        return cls(beta=cfg.beta, gamma=cfg.gamma)

    def loss(self, lp_sum, n_tok, ref, *, norm):
        return sft_loss(lp_sum, n_tok, ref, beta=self.beta, gamma=self.gamma, norm=norm)

    def summary(self, sums: dict) -> dict:
        return preference_summary(sums)
