"""Objectives on their own: train() called directly on a tiny model (no CLI), checked against
log-likelihoods computed here from mlx-lm's own forward pass; one pinned 3-step loss
trajectory per objective (torchtune style: a refactor that changes the numbers fails);
and an objective added in this file alone, trained like the built-in ones."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from poft_mlx.config import load_config
from poft_mlx.data.prepare import prepare, target_renderer
from poft_mlx.models import modeling
from poft_mlx.rundir import RunDir
from poft_mlx.training import objectives
from poft_mlx.training.batches import EncodedData
from poft_mlx.training.dpo import PairData, prepare_pairs, reference_logprobs
from poft_mlx.training.loop import Callback, build_optimizer, train
from poft_mlx.training.objectives import REGISTRY, Objective, register
from poft_mlx.training.plan import plan
from tiny import matmul_tol, write_jsonl, write_tiny_config

STEPS = 3


class Losses(Callback):
    """Records every step's loss, as the loop reports it to observers."""

    def __init__(self):
        self.losses, self.begun = [], []

    def on_step_begin(self, loop, step):
        self.begun.append(step)

    def on_step_end(self, loop, info):
        self.losses.append(info["loss"])


def _cfg(tmp_path, tiny_models, objective: str, **extra):
    path = write_tiny_config(tmp_path, tiny_models, aligned=[], objective=objective,
                             adapter={"rank": 4, "alpha": 8, "dropout": 0.0},
                             train={"iters": STEPS, "batch_size": 4, "learning_rate": 1e-2, "lr_schedule": "constant",
                                    "seed": 0, "steps_per_report": 1, "steps_per_eval": 1000, "steps_per_save": 1000},
                             **extra)
    return load_config([path], [f"run_dir={tmp_path / 'run'}", "data.valid=null"])


def _reference_lp(model_path: Path, encodings) -> np.ndarray:
    """Summed log-likelihood of each encoding's supervised tokens from mlx-lm's full forward pass
    and a float64 log-softmax in numpy: independent of poft-mlx's gathered, chunked head."""
    from mlx_lm.utils import load

    model, _ = load(str(model_path))
    out = []
    for e in encodings:
        logits = np.array(model(mx.array(e.tokens[None, :-1]))[0].astype(mx.float32), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        t = np.nonzero(e.mask[1:])[0]
        out.append(logp[t, e.tokens[t + 1]].sum())
    return np.array(out)


def _run(cfg, data, objective: Objective, tmp_path) -> tuple[Losses, list]:
    loaded = modeling.load(cfg.model)
    mx.random.seed(cfg.train.seed)
    adapter_config = {"model": str(loaded.path), **modeling.apply_adapters(loaded.model, cfg.adapter)}
    total = plan(cfg.train, len(data)).total_steps
    seen = Losses()
    final = train(loaded.model, build_optimizer(cfg.train, total), data, None, objective, args=cfg.train,
                  run_dir=tmp_path / "run", adapter_config=adapter_config, callbacks=[seen], log=lambda *a: None)
    assert final == {}  # no validation data
    return seen, RunDir(tmp_path / "run").read_metrics()


def _samples(cfg):
    loaded = modeling.load(cfg.model)
    return prepare(cfg.data.train, target_renderer(loaded.tokenizer, cfg), cfg, log=lambda *a: None)


def _step1_rows(loop_data, cfg) -> np.ndarray:
    from poft_mlx.training.batches import shuffled_epochs

    return shuffled_epochs(loop_data.lengths(), cfg.train.batch_size, cfg.train.seed)(0)[0]


# ---------------------------------------------------------------------------- the built-in objectives


# Losses of steps 1-3 on the tiny gemma3 target (24 GSM-like records, batch 4, LoRA rank 4, lr 1e-2,
# seed 0, float32), as this version computes them. A change to the loop, the batching or an
# objective that moves them fails here; CPU BLAS kernels round alike within rel 1e-5.
PINNED = {
    "sft": [6.4857683181762695, 5.889352321624756, 6.033914566040039],
    "poft": [6.677335739135742, 6.441068649291992, 5.912112712860107],  # beta 2, gamma 0.5, r_ref a ramp
    "dpo": [0.6931470036506653, 0.28677433729171753, 0.10319041460752487],  # 12 pairs
}


def test_sft_trains_through_train_directly_and_its_first_loss_is_the_token_mean_ce(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models, "sft")
    prep = _samples(cfg)
    data = EncodedData(prep.samples, prep.encodings, np.full(len(prep.samples), np.nan, np.float32))
    seen, records = _run(cfg, data, objectives.build(cfg), tmp_path)
    assert seen.begun == [1, 2, 3] and len(seen.losses) == STEPS
    rows = _step1_rows(data, cfg)
    lp = _reference_lp(cfg.model, [prep.encodings[i] for i in rows])
    n = sum(prep.encodings[i].mask[1:].sum() for i in rows)
    assert seen.losses[0] == pytest.approx(-lp.sum() / n, rel=matmul_tol(1e-4))
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert seen.losses[-1] < seen.losses[0]
    assert seen.losses == pytest.approx(PINNED["sft"], rel=matmul_tol(1e-5))


def test_poft_first_loss_is_the_bradley_terry_loss_of_the_reference_log_likelihoods(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models, "poft", beta=2.0, gamma=0.5)
    prep = _samples(cfg)
    r_ref = np.linspace(-4.0, -1.0, len(prep.samples)).astype(np.float32)  # stand-in aligned scores
    data = EncodedData(prep.samples, prep.encodings, r_ref)
    seen, records = _run(cfg, data, objectives.build(cfg), tmp_path)
    rows = _step1_rows(data, cfg)
    lp = _reference_lp(cfg.model, [prep.encodings[i] for i in rows])
    ntok = np.array([prep.encodings[i].mask[1:].sum() for i in rows], np.float64)
    z = 2.0 * (lp / ntok - r_ref[rows]) + 0.5
    expected = np.mean(np.log1p(np.exp(-z)))  # -log sigmoid(z), averaged over the samples
    assert seen.losses[0] == pytest.approx(expected, rel=matmul_tol(1e-4))
    train_records = [r for r in records if r["split"] == "train"]
    assert 0.0 < train_records[0]["tau_mean"] < 1.0 and "win_rate" in train_records[0]
    assert seen.losses == pytest.approx(PINNED["poft"], rel=matmul_tol(1e-5))


def test_dpo_first_loss_is_log_2_and_it_trains(tmp_path, tiny_models):
    cfg = _cfg(tmp_path, tiny_models, "dpo")
    pairs = [{"prompt": f"What is {i} plus 2?", "chosen": f"It is {i + 2}.", "rejected": f"Maybe {i * 7 % 5}, or so."}
             for i in range(12)]
    cfg.data.train = str(write_jsonl(tmp_path / "pairs.jsonl", pairs))
    loaded = modeling.load(cfg.model)
    data = prepare_pairs(cfg.data.train, target_renderer(loaded.tokenizer, cfg), cfg, log=lambda *a: None)
    assert isinstance(data, PairData)
    data.r_ref = reference_logprobs(loaded.model, data, cfg.train.batch_size)
    seen, records = _run(cfg, data, objectives.build(cfg), tmp_path)
    assert seen.losses[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference before the first update
    assert seen.losses[-1] < seen.losses[0]
    assert "reward_acc" in [r for r in records if r["split"] == "train"][-1]
    assert seen.losses == pytest.approx(PINNED["dpo"], rel=matmul_tol(1e-5))


def test_every_objective_reports_exactly_the_metrics_it_declares():
    """The distributed reductions and the meter reduce what `reductions` lists: an objective
    that reports a metric it does not declare (or the reverse) would reduce wrongly across ranks."""
    rows = mx.array([-3.0, -5.0, -4.0, -6.0]), mx.array([2.0, 3.0, 2.0, 4.0]), mx.array([-1.0, -2.0, -3.0, -1.5])
    for name, cls in REGISTRY.items():
        loss, metrics = cls()(*rows, norm=1.0)
        assert set(metrics) == set(cls.reductions), name
        assert loss.shape == () and math.isfinite(loss.item()), name
        summary = cls().summary({k: float(v.item()) for k, v in metrics.items()})
        assert summary["samples"] > 0, name


# ---------------------------------------------------------------------------- adding an objective


class MeanTokenCE(Objective):
    """An objective written the way a user adds one: the mean over samples of each sample's
    token-mean cross-entropy (every sample weighs the same, whatever its length)."""

    name = "mean_token_ce"
    description = "sample-mean of token-mean cross-entropy"
    normaliser = "samples"
    reductions = {"nll_sum": "sum", "n_samples": "sum", "n_tokens": "sum", "worst": "max"}
    display = ("loss", "nll", "worst")

    def loss(self, lp_sum, n_tok, ref, *, norm):
        nll = -lp_sum / mx.maximum(n_tok, 1.0)
        return nll.sum() / norm, {"nll_sum": nll.sum(), "n_samples": mx.array(nll.shape[0], mx.float32),
                                  "n_tokens": n_tok.sum(), "worst": nll.max()}

    def summary(self, sums):
        return {"nll": sums.get("nll_sum", 0.0) / max(sums.get("n_samples", 0.0), 1.0),
                "worst": sums.get("worst", float("nan")), "samples": sums.get("n_samples", 0.0)}


@pytest.fixture
def mean_token_ce():
    register(MeanTokenCE)
    yield MeanTokenCE
    REGISTRY.pop(MeanTokenCE.name)


def test_an_objective_defined_here_trains_through_the_normal_run(tmp_path, tiny_models, mean_token_ce):
    """Adding an objective touches its own module (here: this file) and its test only: the run,
    the loop, the metric meter and validation need nothing else."""
    from poft_mlx.training.run import run_train

    cfg = _cfg(tmp_path, tiny_models, "mean_token_ce")
    cfg.data.valid = str(tmp_path / "valid.jsonl")
    seen = Losses()
    run = RunDir(run_train(cfg, callbacks=[seen]))
    records = run.read_metrics()
    val0 = next(r for r in records if r["split"] == "val" and r["step"] == 0)
    prep = _samples(load_config([], [f"model={cfg.model}", "chat_template=gemma", f"data.train={cfg.data.valid}",
                                     "data.max_seq_length=96"]))
    lp = _reference_lp(cfg.model, prep.encodings)
    nll = -lp / np.array([e.mask[1:].sum() for e in prep.encodings])
    assert val0["nll"] == pytest.approx(nll.mean(), rel=matmul_tol(1e-4))
    assert val0["loss"] == pytest.approx(nll.mean(), rel=matmul_tol(1e-4))
    assert val0["worst"] == pytest.approx(nll.max(), rel=matmul_tol(1e-4))
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3] and len(seen.losses) == STEPS
    assert run.adapter_config()["poft_mlx"]["objective"] == "mean_token_ce"


def test_an_unregistered_objective_is_a_config_error_naming_the_choices():
    from poft_mlx.errors import ConfigError

    with pytest.raises(ConfigError, match="objective: 'nope' is not one of 'dpo', 'poft', 'sft'"):
        objectives.build(load_config([], ["objective=nope"]))
