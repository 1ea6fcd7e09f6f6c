"""End to end on tiny models: score -> train -> eval through the CLI, and trainer invariants."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from poft_mlx.cli.main import main
from tiny import matmul_tol, write_tiny_config


@pytest.fixture
def setup(tmp_path, tiny_models):
    path = write_tiny_config(
        tmp_path, tiny_models,
        adapter={"rank": 4, "alpha": 8, "num_layers": -1},
        train={"iters": 6, "batch_size": 4, "learning_rate": 1e-2, "steps_per_report": 2,
               "steps_per_eval": 3, "steps_per_save": 3, "lr_schedule": "constant"},
        score={"batch_size": 4},
    )
    return tmp_path, path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def metrics(run, split="train"):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def test_score_then_train_then_eval(setup):
    tmp, cfg = setup
    r = invoke("score", "-c", cfg)
    assert r.exit_code == 0, r.output
    again = invoke("score", "-c", cfg)
    assert again.exit_code == 0 and "already scored" in again.output + (again.stderr if again.stderr_bytes else "")
    poft_run, sft_run = tmp / "poft", tmp / "sft"
    r = invoke("train", "-c", cfg, "--set", f"run_dir={poft_run}")
    assert r.exit_code == 0, r.output
    assert "scoring" not in r.output  # everything came from the cache
    r = invoke("train", "-c", cfg, "--set", f"run_dir={sft_run}", "--set", "objective=sft")
    assert r.exit_code == 0, r.output
    for run in (poft_run, sft_run):
        assert (run / "adapters" / "adapters.safetensors").exists()
        assert (run / "config.yaml").exists() and (run / "best" / "adapters.safetensors").exists()
        tr = metrics(run)
        assert [m["step"] for m in tr] == [2, 4, 6]
        for key in ("loss", "ce", "tau_mean", "tau_min", "tau_max", "win_rate", "margin", "tokens_per_sec", "peak_memory_gb"):
            assert np.isfinite(tr[-1][key]), key
        assert [m["step"] for m in metrics(run, "val")] == [0, 3, 6]
    # PoFT's loss is the Bradley-Terry loss; SFT's is the CE.
    assert metrics(sft_run, "val")[-1]["loss"] == pytest.approx(metrics(sft_run, "val")[-1]["ce"], rel=1e-5)
    assert metrics(poft_run, "val")[-1]["loss"] == pytest.approx(metrics(poft_run, "val")[-1]["poft_loss"], rel=1e-5)
    r = invoke("eval", "--data", tmp / "valid.jsonl", poft_run, sft_run, "--json-out", tmp / "eval.json")
    assert r.exit_code == 0, r.output
    table = json.loads((tmp / "eval.json").read_text())
    assert set(table) == {"base", str(poft_run), str(sft_run)}
    # Training lowered the held-out CE of both runs relative to the base model.
    assert table[str(sft_run)]["ce"] < table["base"]["ce"]
    assert table[str(poft_run)]["ce"] < table["base"]["ce"]
    assert "win_rate" in r.output and "tau_mean" in r.output
    # The adapters load in mlx-lm as they are, and mlx-lm's model with them computes what ours does.
    from mlx_lm.utils import load

    from poft_mlx.models.adapters import load_policy
    from poft_mlx.config import load_config

    base_path = json.loads((poft_run / "adapters" / "adapter_config.json").read_text())["model"]
    theirs, _ = load(str(base_path), adapter_path=str(poft_run / "adapters"))
    stock, _ = load(str(base_path))
    ours = load_policy(load_config([cfg]), str(poft_run / "adapters")).model
    x = mx.array([[1, 5, 9, 14, 3, 7, 2, 11]])
    lt, ls, lo = (np.array(m(x).astype(mx.float32)) for m in (theirs, stock, ours))
    np.testing.assert_allclose(lo, lt, rtol=matmul_tol(1e-5), atol=matmul_tol(1e-5))
    assert np.abs(lt - ls).max() > 1e-3  # the adapters changed the model


def test_cached_and_resident_modes_give_the_same_losses(setup):
    tmp, cfg = setup
    common = ["--set", "train.iters=3", "--set", "data.valid=null"]
    assert invoke("train", "-c", cfg, "--set", f"run_dir={tmp / 'c'}", *common).exit_code == 0
    assert invoke("train", "-c", cfg, "--set", f"run_dir={tmp / 'r'}", "--set", "reference_mode=resident", *common).exit_code == 0
    a, b = metrics(tmp / "c"), metrics(tmp / "r")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=matmul_tol(1e-5), abs=1e-6)
        assert x["tau_mean"] == pytest.approx(y["tau_mean"], rel=matmul_tol(1e-5), abs=1e-6)


def test_training_refuses_samples_without_scores(setup):
    tmp, cfg = setup
    r = CliRunner().invoke(main, ["train", "-c", str(cfg), "--set", "score.on_missing=error",
                                  "--set", f"run_dir={tmp / 'x'}"])
    assert r.exit_code == 1
    assert "lack a score from" in r.output and "train.jsonl:1" in r.output and "poft-mlx score" in r.output


def test_same_seed_same_result_and_accumulation_equals_larger_batch(setup):
    tmp, cfg = setup
    base = ["--set", "data.valid=null", "--set", "train.steps_per_report=1", "--set", "adapter.dropout=0.0"]
    runs = {
        "a": ["--set", "train.iters=3", "--set", "train.batch_size=4"],
        "b": ["--set", "train.iters=3", "--set", "train.batch_size=4"],
        "acc": ["--set", "train.iters=3", "--set", "train.batch_size=2", "--set", "train.grad_accumulation_steps=2",
                "--set", "train.optimizer=sgd"],
        "big": ["--set", "train.iters=3", "--set", "train.batch_size=4", "--set", "train.optimizer=sgd"],
    }
    for name, extra in runs.items():
        assert invoke("train", "-c", cfg, "--set", f"run_dir={tmp / name}", *base, *extra).exit_code == 0
    wa = mx.load(str(tmp / "a" / "adapters" / "adapters.safetensors"))
    wb = mx.load(str(tmp / "b" / "adapters" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)
    # One step = one group of batch_size * accum samples; accumulating its two halves
    # gives the same update as the whole group at once.
    w_acc = mx.load(str(tmp / "acc" / "adapters" / "adapters.safetensors"))
    w_big = mx.load(str(tmp / "big" / "adapters" / "adapters.safetensors"))
    assert any(np.abs(np.array(w_big[k])).max() > 0 for k in w_big if k.endswith("lora_b"))
    for k in w_big:
        np.testing.assert_allclose(np.array(w_acc[k]), np.array(w_big[k]), rtol=matmul_tol(1e-4), atol=matmul_tol(1e-6))
    assert [m["loss"] for m in metrics(tmp / "acc")] == pytest.approx([m["loss"] for m in metrics(tmp / "big")],
                                                                      rel=matmul_tol(1e-5))


def test_refuses_to_overwrite_a_run(setup):
    tmp, cfg = setup
    args = ["train", "-c", str(cfg), "--set", f"run_dir={tmp / 'once'}", "--set", "train.iters=1", "--set", "data.valid=null"]
    assert invoke(*args).exit_code == 0
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "already holds a run" in r.output and "--resume" in r.output


@pytest.mark.parametrize("extra", [
    ["--set", "adapter.type=dora"],
    ["--set", "adapter.type=full", "--set", "train.learning_rate=1e-3"],
    ["--set", "adapter.keys=[self_attn.q_proj, self_attn.v_proj]", "--set", "adapter.num_layers=1"],
])
def test_adapter_kinds_train_and_load_in_mlx_lm(setup, extra):
    from mlx_lm.utils import load

    tmp, cfg = setup
    run = tmp / "kind"
    r = invoke("train", "-c", cfg, "--set", f"run_dir={run}", "--set", "train.iters=2", "--set", "data.valid=null", *extra)
    assert r.exit_code == 0, r.output
    conf = json.loads((run / "adapters" / "adapter_config.json").read_text())
    model, _ = load(conf["model"], adapter_path=str(run / "adapters"))
    saved = mx.load(str(run / "adapters" / "adapters.safetensors"))
    if "adapter.type=full" in extra:
        assert conf["fine_tune_type"] == "full" and len(saved) > 10
    elif "adapter.num_layers=1" in extra:
        assert {k.split(".")[-2] for k in saved} == {"q_proj", "v_proj"}
        assert all(k.startswith("model.layers.1.") for k in saved)  # only the last block
    else:
        assert conf["fine_tune_type"] == "dora" and any(k.endswith(".m") for k in saved)


def test_gradient_checkpointing_gives_the_same_losses(setup):
    tmp, cfg = setup
    common = ["--set", "train.iters=2", "--set", "data.valid=null", "--set", "train.steps_per_report=1"]
    assert invoke("train", "-c", cfg, "--set", f"run_dir={tmp / 'plain'}", *common).exit_code == 0
    assert invoke("train", "-c", cfg, "--set", f"run_dir={tmp / 'ckpt'}", "--set", "train.grad_checkpoint=true",
                  *common).exit_code == 0
    assert [m["loss"] for m in metrics(tmp / "plain")] == pytest.approx([m["loss"] for m in metrics(tmp / "ckpt")], rel=1e-5)
    # The patch of the block class is undone: later models of the same architecture are unaffected.
    from mlx_lm.models.gemma3_text import TransformerBlock
    assert TransformerBlock.__call__.__name__ != "checkpointed_fn"


def test_quantized_target_trains(setup, tiny_models):
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    tmp, cfg = setup
    model, tok, config = load(str(tiny_models["aligned_a"]), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    qdir = tmp / "q4"
    save_model(qdir, model)
    save_config(config, qdir / "config.json")
    tok.save_pretrained(str(qdir))
    r = invoke("train", "-c", cfg, "--set", f"model={qdir}", "--set", "chat_template=null", "--set", f"run_dir={tmp / 'q'}",
               "--set", "train.iters=2", "--set", "data.valid=null")
    assert r.exit_code == 0, r.output
    saved = mx.load(str(tmp / "q" / "adapters" / "adapters.safetensors"))
    assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved)


def test_unknown_model_reference_is_one_clear_error(setup, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp, cfg = setup
    r = CliRunner().invoke(main, ["train", "-c", str(cfg), "--set", "model=no-such-org/no-such-model",
                                  "--set", f"run_dir={tmp / 'm'}"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "no-such-org/no-such-model" in r.output
