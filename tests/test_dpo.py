"""The DPO stage on tiny models: exact loss values, the step-0 identity, learning, PoFT -> DPO."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import load_adapters

from poft_mlx.models import modeling
from poft_mlx.cli.main import main
from poft_mlx.config import AdapterConfig, load_config
from poft_mlx.models.adapters import load_policy
from poft_mlx.training.dpo import prepare_pairs, reference_logprobs
from poft_mlx.training.objectives import Dpo
from poft_mlx.data.prepare import target_renderer
from tiny import matmul_tol, write_jsonl

LOG2 = math.log(2.0)


def pairs(n: int, offset: int = 0) -> list[dict]:
    """Chosen: the right sum; rejected: a wrong one (some with a system prompt, some as chat)."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rec = {"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
               "rejected": f"{a} plus {b} is {a + b + 3}. The quick brown fox."}
        if i % 3 == 0:
            rec["system"] = "You are a helpful assistant."
        if i % 4 == 1:
            rec["prompt"] = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": rec["prompt"]}]
        out.append(rec)
    return out


def _hand_logprob(model, enc) -> float:
    """sum_t log softmax(logits_t)[x_{t+1}] over supervised targets, from full logits in numpy."""
    logits = np.array(model(mx.array(enc.tokens[None, :-1]))[0].astype(mx.float32), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    t = np.nonzero(enc.mask[1:])[0]
    return float(logp[t, enc.tokens[t + 1]].sum())


def test_dpo_objective_on_a_tiny_model_matches_the_formula(tmp_path, tiny_models):
    """ref_c, ref_r: the frozen model's summed log-likelihoods of each reply; lp_c, lp_r the
    policy's (the same model plus random LoRA weights);
    loss = mean_i -log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))), beta = 0.25."""
    cfg = load_config([], [f"model={tiny_models['target']}", "chat_template=gemma", "data.max_seq_length=96"])
    loaded = modeling.load(cfg.model)
    model = loaded.model
    data = prepare_pairs(str(write_jsonl(tmp_path / "p.jsonl", pairs(6))), target_renderer(loaded.tokenizer, cfg), cfg)
    data.r_ref = reference_logprobs(model, data, batch_size=4)
    ref = np.array([[_hand_logprob(model, c), _hand_logprob(model, r)] for c, r in zip(data.encodings, data.rejected)])
    np.testing.assert_allclose(data.r_ref, ref, rtol=matmul_tol(1e-5))

    mx.random.seed(3)
    modeling.apply_adapters(model, AdapterConfig(rank=4, num_layers=-1))
    lora_b = [(k, 0.3 * mx.random.normal(w.shape)) for k, w in tree_flatten(model.trainable_parameters())
              if k.endswith("lora_b")]
    assert lora_b
    model.load_weights(lora_b, strict=False)
    model.eval()
    pol = np.array([[_hand_logprob(model, c), _hand_logprob(model, r)] for c, r in zip(data.encodings, data.rejected)])
    beta = 0.25
    h = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    assert np.abs(h).min() > 1e-3  # the policy really differs from the reference

    batch = data.batch(np.arange(len(data)))
    lp, n = modeling.batch_logprobs(model, batch)
    loss, m = Dpo(beta=beta)(lp, n, batch.r_ref, norm=None)
    assert loss.item() == pytest.approx(float(np.mean(np.log1p(np.exp(-h)))), rel=1e-4)
    assert m["reward_acc_sum"].item() == float((h > 0).sum())
    assert m["margin_sum"].item() == pytest.approx(float((h / beta).sum()), rel=1e-3, abs=1e-4)
    assert m["reward_chosen_sum"].item() == pytest.approx(beta * float((pol[:, 0] - ref[:, 0]).sum()), rel=1e-3, abs=1e-4)
    assert m["n_tokens"].item() == sum(e.mask[1:].sum() for e in data.encodings + data.rejected)


@pytest.fixture
def dpo_setup(tmp_path, tiny_models):
    write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    cfg = {
        "model": str(tiny_models["target"]), "chat_template": "gemma", "objective": "dpo",
        "data": {"train": str(tmp_path / "pairs.jsonl"), "valid": str(tmp_path / "pairs.jsonl"), "max_seq_length": 96},
        "adapter": {"rank": 4, "alpha": 8},
        "train": {"iters": 12, "batch_size": 4, "learning_rate": 1e-2, "lr_schedule": "constant",
                  "steps_per_report": 1, "steps_per_eval": 6, "steps_per_save": 6},
        "dpo": {"beta": 0.5},
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def _metrics(run, split):
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["split"] == split]


def _invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def test_dpo_starts_at_log2_and_learns_the_preferences(dpo_setup):
    tmp = dpo_setup
    _invoke("train", "-c", tmp / "dpo.yaml", "--set", f"run_dir={tmp / 'run'}")
    val, tr = _metrics(tmp / "run", "val"), _metrics(tmp / "run", "train")
    assert [m["step"] for m in val] == [0, 6, 12]
    # Step 0: the policy is the reference (LoRA B = 0), so h = 0 for every pair.
    assert val[0]["loss"] == pytest.approx(LOG2, rel=1e-6)
    assert val[0]["margin"] == 0.0 and val[0]["reward_acc"] == 0.0
    assert tr[0]["loss"] == pytest.approx(LOG2, rel=1e-5)  # the first step's loss, before its update
    # A few steps learn to prefer the right sums.
    assert val[-1]["reward_acc"] >= 0.75
    assert val[-1]["margin"] > 0 and val[-1]["loss"] < LOG2 - 0.05
    assert val[-1]["reward_chosen"] > val[-1]["reward_rejected"]
    for key in ("reward_acc", "margin", "ce_chosen", "tokens_per_sec"):
        assert np.isfinite(tr[-1][key]), key
    assert (tmp / "run" / "adapters" / "adapters.safetensors").exists()


def test_dpo_resume_equals_uninterrupted(dpo_setup):
    tmp = dpo_setup
    common = ["-c", tmp / "dpo.yaml", "--set", "data.valid=null", "--set", "train.iters=4",
              "--set", "train.steps_per_save=2"]
    _invoke("train", *common, "--set", f"run_dir={tmp / 'full'}")
    _invoke("train", *common, "--set", f"run_dir={tmp / 'cut'}", "--set", "train.iters=2")
    # Continue the cut run to 4 steps: same schedule length as the full run.
    cfg = yaml.safe_load((tmp / "cut" / "config.yaml").read_text())
    cfg["train"]["iters"] = 4
    (tmp / "cut" / "config.yaml").write_text(yaml.safe_dump(cfg))
    _invoke("train", "--resume", tmp / "cut")
    a = mx.load(str(tmp / "full" / "adapters" / "adapters.safetensors"))
    b = mx.load(str(tmp / "cut" / "adapters" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-7)


def test_poft_then_dpo_through_the_cli(dpo_setup, tiny_models):
    """PoFT run -> DPO with init_adapters: the reference (and starting policy) is the PoFT
    policy, so DPO's step-0 CE on the chosen replies is the PoFT run's CE on them."""
    tmp = dpo_setup
    sft = [{"prompt": p["prompt"], "completion": p["chosen"], **({"system": p["system"]} if "system" in p else {})}
           for p in pairs(8)]
    write_jsonl(tmp / "chosen.jsonl", sft)
    poft_cfg = {
        "model": str(tiny_models["target"]), "chat_template": "gemma",
        "aligned": [str(tiny_models["aligned_a"]), str(tiny_models["aligned_b"])],
        "data": {"train": str(tmp / "chosen.jsonl"), "max_seq_length": 96},
        "adapter": {"rank": 4, "alpha": 8},
        "train": {"iters": 6, "batch_size": 4, "learning_rate": 1e-2, "lr_schedule": "constant"},
    }
    (tmp / "poft.yaml").write_text(yaml.safe_dump(poft_cfg))
    _invoke("train", "-c", tmp / "poft.yaml", "--set", f"run_dir={tmp / 'poft'}")
    _invoke("train", "-c", tmp / "dpo.yaml", "--set", f"run_dir={tmp / 'dpo'}",
            "--set", f"init_adapters={tmp / 'poft' / 'adapters'}", "--set", "train.iters=6")
    _invoke("eval", "-c", tmp / "dpo.yaml", "--set", "objective=sft", "--data", tmp / "chosen.jsonl",
            tmp / "poft", tmp / "dpo", "--json-out", tmp / "eval.json")
    table = json.loads((tmp / "eval.json").read_text())
    val = _metrics(tmp / "dpo", "val")
    assert val[0]["loss"] == pytest.approx(LOG2, rel=1e-6)
    assert val[0]["ce_chosen"] == pytest.approx(table[str(tmp / "poft")]["ce"], rel=matmul_tol(1e-5))
    assert abs(table[str(tmp / "poft")]["ce"] - table["base"]["ce"]) > 1e-2  # PoFT changed the model
    # eval loads the DPO run as init_adapters (fused) + its own adapters: its final state.
    assert val[-1]["ce_chosen"] == pytest.approx(table[str(tmp / "dpo")]["ce"], rel=matmul_tol(1e-5))
    assert abs(table[str(tmp / "dpo")]["ce"] - table[str(tmp / "poft")]["ce"]) > 1e-3
    assert json.loads((tmp / "dpo" / "adapters" / "adapter_config.json").read_text())["poft_mlx"]["init_adapters"] \
        == str((tmp / "poft" / "adapters").resolve())
    # Export: the fused DPO model is base + PoFT stage + DPO stage, not base + DPO adapters.
    _invoke("fuse", tmp / "dpo", tmp / "fused")
    policy = load_policy(load_config([tmp / "dpo" / "config.yaml"]), str(tmp / "dpo" / "adapters")).model
    without_init = modeling.load(str(tiny_models["target"])).model
    load_adapters(without_init, str(tmp / "dpo" / "adapters"))
    fused = modeling.load(str(tmp / "fused")).model
    for m in (policy, without_init, fused):
        m.eval()
    tokens = mx.array([[2, 17, 33, 5, 60, 8, 91, 12]])
    want = np.array(policy(tokens))
    assert np.abs(np.array(fused(tokens)) - want).max() <= matmul_tol(1e-5) * np.abs(want).max()
    assert np.abs(np.array(without_init(tokens)) - want).max() > 1e-3  # the PoFT stage matters
    r = CliRunner().invoke(main, ["export-peft", str(tmp / "dpo"), str(tmp / "peft")])
    assert r.exit_code == 1 and "init_adapters" in r.output and "poft-mlx fuse" in r.output


def test_init_adapters_must_exist(dpo_setup):
    tmp = dpo_setup
    r = CliRunner().invoke(main, ["train", "-c", str(tmp / "dpo.yaml"), "--set", f"run_dir={tmp / 'x'}",
                                  "--set", f"init_adapters={tmp / 'nowhere'}"])
    assert r.exit_code == 1 and "init_adapters" in r.output and "RUN_DIR/adapters" in r.output
