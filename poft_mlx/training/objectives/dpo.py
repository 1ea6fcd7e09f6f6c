"""DPO (Rafailov et al. 2023, arXiv 2305.18290) on preference pairs, after PoFT or SFT."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .base import Objective, register


def dpo_loss(lp_chosen, lp_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1, norm=None):
    """DPO (eq. 7) on summed log-likelihoods:

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


@register
class Dpo(Objective):
    """A batch of B pairs is 2B rows, the B chosen replies then the B rejected ones
    (training/dpo.PairDataset), and `ref` holds the frozen reference's summed
    log-likelihoods of those rows. norm counts pairs."""

    name = "dpo"
    description = "Direct Preference Optimization (DPO, arXiv 2305.18290)"
    normaliser = "samples"
    pairs = True
    reductions = {k: "sum" for k in ("reward_acc_sum", "margin_sum", "n_samples", "reward_chosen_sum",
                                     "reward_rejected_sum", "ce_chosen_sum", "n_tokens_chosen", "n_tokens")}
    display = ("loss", "margin")

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    @classmethod
    def from_config(cls, cfg) -> "Dpo":
        return cls(beta=cfg.dpo.beta)

    @classmethod
    def hyperparameters(cls, config: dict) -> dict:
        dpo = config.get("dpo")
        return {"beta": dpo.get("beta") if isinstance(dpo, dict) else None}

    def loss(self, lp_sum, n_tok, ref, *, norm):
        """loss = sum over pairs of -log sigmoid(h) / norm (dpo_loss). Metrics add the implicit
        rewards beta * (lp - ref) of each side, the chosen replies' token CE (to see whether DPO
        lowers their likelihood) and the token count."""
        beta = self.beta
        B = lp_sum.shape[0] // 2
        lc, lr, rc, rr = lp_sum[:B], lp_sum[B:2 * B], ref[:B], ref[B:2 * B]
        loss, metrics = dpo_loss(lc, lr, rc, rr, beta=beta, norm=norm)
        metrics["reward_chosen_sum"] = (beta * (lc - rc)).astype(mx.float32).sum()
        metrics["reward_rejected_sum"] = (beta * (lr - rr)).astype(mx.float32).sum()
        metrics["ce_chosen_sum"] = -lc.astype(mx.float32).sum()
        metrics["n_tokens_chosen"] = n_tok[:B].astype(mx.float32).sum()
        metrics["n_tokens"] = n_tok.astype(mx.float32).sum()
        return loss, metrics

    def summary(self, s: dict) -> dict:
        n = max(s.get("n_samples", 0.0), 1.0)
        out = {}
        if "reward_acc_sum" in s:
            out = {"reward_acc": s["reward_acc_sum"] / n, "margin": s["margin_sum"] / n,
                   "reward_chosen": s["reward_chosen_sum"] / n, "reward_rejected": s["reward_rejected_sum"] / n,
                   "ce_chosen": s["ce_chosen_sum"] / max(s["n_tokens_chosen"], 1.0), "tokens": s["n_tokens"]}
        out["samples"] = s.get("n_samples", 0.0)
        return out
