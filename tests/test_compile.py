"""The compiled training step (train.compile, training/compiled.py) and bucket padding.

Compiled and eager steps give the same losses and trained parameters (LoRA with dropout, so
the RNG state must be threaded through; gradient accumulation and clipping on); a resumed
compiled run equals an uninterrupted one; the NaN policy still stops and skips; batches are
padded to bucket lengths so shapes repeat, and the padding does not change the log-likelihoods.
"""

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from poft_mlx.config import AdapterConfig, TrainConfig
from poft_mlx.models import modeling
from poft_mlx.models.modeling import bucket, make_batch, pad_to_buckets
from poft_mlx.training.batches import EncodedData
from poft_mlx.training.compiled import use_compile
from poft_mlx.training.loop import build_optimizer, train
from poft_mlx.training.objectives import Poft
from test_resume import AtStep, assert_same_run, assert_step_skipped, invoke, invoke_with, read_metrics, split, weights
from tiny import Enc, write_tiny_config

LENGTH_BUCKETS = [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 368, 432, 512]


def encodings(n: int, seed: int = 0, lo: int = 20, hi: int = 90) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        out.append(Enc(rng.integers(5, 250, length), int(rng.integers(3, length // 2))))
    return out


# ---------------------------------------------------------------------------- buckets


def test_bucket_lengths_are_a_geometric_grid_of_multiples():
    assert sorted({bucket(n, 16) for n in range(1, 513)}) == LENGTH_BUCKETS
    assert [bucket(n, 64) for n in (1, 64, 65, 500, 513, 1025)] == [64, 64, 128, 512, 640, 1280]
    for n in range(1, 3000):
        b = bucket(n, 64)
        assert b >= n and b % 64 == 0 and (b <= 4 * 64 or b < 1.2 * n + 64)


def test_padding_to_buckets_repeats_shapes_and_keeps_the_logprobs(tiny_models):
    model = modeling.load(str(tiny_models["target"])).model
    encs = encodings(40, lo=10, hi=300)
    shapes, padded_shapes = set(), set()
    for i in range(0, 40, 2):
        batch = make_batch(encs[i:i + 2], np.arange(i, i + 2))
        padded = pad_to_buckets(batch)
        shapes.add((batch.tokens.shape, batch.pos.shape))
        padded_shapes.add((padded.tokens.shape, padded.pos.shape))
        assert padded.tokens.shape[1] in LENGTH_BUCKETS and padded.pos.shape[0] == bucket(batch.pos.shape[0], 64)
        assert float(padded.valid.sum()) == float(batch.valid.sum())
        if i % 8 == 0:
            for train_mode in (False, True):
                model.train(train_mode)
                lp, n = modeling.batch_logprobs(model, batch)
                lp_b, n_b = modeling.batch_logprobs(model, padded)
                np.testing.assert_array_equal(np.array(n), np.array(n_b))
                np.testing.assert_allclose(np.array(lp_b), np.array(lp), rtol=1e-5, atol=1e-4)
    lengths = lambda s: {shape[0][1] for shape in s}  # noqa: E731
    assert len(lengths(padded_shapes)) < len(lengths(shapes)) and len(padded_shapes) < len(shapes)


def test_auto_compiles_on_a_gpu_only_and_never_across_ranks():
    assert use_compile("auto", world=1, backend="cpu")[0] is False
    assert use_compile("auto", world=1, backend="metal")[0] is True
    assert use_compile(True, world=1, backend="cpu")[0] is True
    assert use_compile(False, world=1, backend="metal")[0] is False
    assert use_compile(True, world=2, backend="metal")[0] is False


# ---------------------------------------------------------------------------- compiled == eager


def _train(path: Path, compile: bool, adapter_type: str):
    loaded = modeling.load(str(path))
    mx.random.seed(0)
    adapter_config = modeling.apply_adapters(loaded.model, AdapterConfig(type=adapter_type, rank=4, dropout=0.1))
    args = TrainConfig(iters=6, batch_size=4, grad_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=1.0,
                       steps_per_report=1, steps_per_eval=100, steps_per_save=100, compile=compile)
    encs = encodings(24)
    r_ref = np.random.default_rng(1).normal(-3.0, 0.5, len(encs)).astype(np.float32)
    data = EncodedData(list(range(len(encs))), encs, r_ref)
    logs = []
    with tempfile.TemporaryDirectory() as run:
        train(loaded.model, build_optimizer(args, 6), data, None, Poft(), args=args, run_dir=Path(run),
              adapter_config=adapter_config, log=logs.append)
        records = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    params = {k: np.array(v) for k, v in tree_flatten(loaded.model.trainable_parameters())}
    return [r for r in records if r["split"] == "train"], params, logs


@pytest.mark.parametrize("adapter_type", ["lora", "dora", "full"])
def test_compiled_and_eager_steps_give_the_same_run(tiny_models, adapter_type):
    eager, p_eager, _ = _train(tiny_models["target"], False, adapter_type)
    compiled, p_compiled, logs = _train(tiny_models["target"], True, adapter_type)
    assert "training step: train.compile=true" in logs
    assert len(eager) == len(compiled) == 6
    for key in ("loss", "ce", "tau_mean", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in compiled], [r[key] for r in eager], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    assert p_eager.keys() == p_compiled.keys()
    for k in p_eager:
        np.testing.assert_allclose(p_compiled[k], p_eager[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------- resume and NaN policy, compiled


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """A compiled config with LoRA dropout, and its uninterrupted run."""
    root = tmp_path_factory.mktemp("compiled")
    cfg = write_tiny_config(
        root, tiny_models, adapter={"rank": 4, "alpha": 8, "dropout": 0.1},
        train={"iters": 6, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 2, "steps_per_report": 1,
               "steps_per_eval": 3, "steps_per_save": 1, "keep_last": 10, "compile": True},
        score={"batch_size": 4, "cache_dir": str(root / "scores")})
    ref = root / "reference"
    r = invoke("train", "-c", cfg, "--set", f"run_dir={ref}")
    assert r.exit_code == 0 and "training step: train.compile=true" in r.output, r.output
    return type("Env", (), {"root": root, "cfg": cfg, "ref": ref})


def test_a_resumed_compiled_run_equals_the_uninterrupted_one(env):
    run = env.root / "stopped"
    r = invoke_with(AtStep(4, sigint=True), "train", "-c", env.cfg, "--set", f"run_dir={run}")
    assert r.exit_code == 130 and "at step 4;" in r.output, r.output
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0 and "at step 4/6" in r.output, r.output
    assert_same_run(run, env.ref)


def test_a_compiled_run_matches_the_eager_one_end_to_end(env):
    run = env.root / "eager"
    r = invoke("train", "-c", env.cfg, "--set", f"run_dir={run}", "--set", "train.compile=false")
    assert r.exit_code == 0 and "training step: train.compile=false" in r.output, r.output
    assert_same_run(run, env.ref)


def test_nan_stop_and_skip_with_compile_on(env):
    run = env.root / "nan-stop"
    r = invoke_with(AtStep(3, nan=True), "train", "-c", env.cfg, "--set", f"run_dir={run}",
                    "--set", "data.valid=null")
    assert r.exit_code == 1 and "non-finite loss" in r.output and "at step 3" in r.output, r.output
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]

    run = env.root / "nan-skip"
    r = invoke_with(AtStep(3, nan=True), "train", "-c", env.cfg, "--set", f"run_dir={run}",
                    "--set", "data.valid=null", "--set", "train.nan_policy=skip")
    assert r.exit_code == 0 and "step 3: non-finite loss or gradient, batch skipped" in r.output, r.output
    train_records = {x["step"]: x for x in split(read_metrics(run), "train")}
    assert [train_records[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert_step_skipped(run, 3)
