"""Convert a llama.cpp GGUF checkpoint into a model folder for mlx-lm and transformers.

A GGUF file holds the weights (usually quantized), the hyper-parameters and the tokenizer as
metadata. `convert_gguf` rebuilds the files of a Hugging Face model folder from it:

    config.json               architectures, model_type and every hyper-parameter
    model.safetensors         Hugging Face tensor names
    tokenizer.json            rebuilt from the vocabulary with the `tokenizers` library
    tokenizer_config.json     PreTrainedTokenizerFast, special tokens, add_bos_token, chat_template
    special_tokens_map.json, generation_config.json
    poft_conversion.json      where the folder came from and with which options

`quantize` chooses what happens to the quantized tensors:

    None    dequantize everything to `dtype`; mlx-lm and transformers both load the folder.
    "keep"  Q4_0, Q4_1 and Q8_0 matrices become MLX affine triples (weight, scales, biases;
            group size 32, float16 scales and biases, float32 for dtype float32) holding exactly
            the GGUF values.
            Tensors of any other type (K-quants, Q5_x, F16, ...) are dequantized to `dtype`
            one by one and their layers stay unquantized. mlx-lm only.
    "q4"/"q8"  dequantize, then re-quantize with mlx-lm (affine, group size 64). mlx-lm only.

The mapping follows llama.cpp's convert_hf_to_gguf.py backwards; the facts it relies on are in
docs/platform.md ("Conversion facts").
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import ConfigError, ModelFileError, WouldOverwrite
from ..runtime import diskspace
from .gguf_tokenizer import build_tokenizer, tokenizer_files
from .files import check_gguf, check_template

#: Bumped whenever the output of a conversion changes, so caches keyed on it are rebuilt.
CONVERTER_VERSION = 1
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANTIZE_MODES = ("keep", "q4", "q8")
KEEP_GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0
REQUANT_GROUP_SIZE = 64

_HF_CLASSES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Convert `gguf_path` into the model folder `out_dir` and return its path.

    `dtype` (float32, float16, bfloat16) is the type of every floating-point tensor written;
    `quantize` is None, "keep", "q4" or "q8" (see the module docstring); `chat_template`, when
    given, replaces the one in the GGUF metadata. The folder is built in a temporary sibling
    and renamed into place, so `out_dir` is either absent or complete. Raises WouldOverwrite
    if `out_dir` exists and is not empty, ModelFileError for an unsupported architecture, tensor
    or tokenizer, ConfigError for an unsupported option.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize {quantize!r} is not supported; choose None or one of {QUANTIZE_MODES}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise WouldOverwrite(f"{out_dir} already exists and is not empty")
    check_gguf(gguf_path)  # bounds, counts, offsets, sizes: before gguf-py maps anything
    if chat_template is not None:
        check_template(chat_template, "the chat template given")
    reader = gguf.GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    try:
        config = build_config(meta, tensors)  # validates the architecture before any work
        tokenizer = build_tokenizer(meta)
    except ModelFileError as e:  # ours: what is unsupported
        raise ModelFileError(f"{gguf_path}: {e}") from None
    except Exception as e:  # metadata of the wrong type or shape: name the file, not a traceback
        raise ModelFileError(f"{gguf_path}: cannot rebuild the model from its metadata ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    config["torch_dtype"] = dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    # About what the folder takes: every tensor in `dtype` (less when kept quantized) + tokenizer.
    need = sum(int(t.n_elements) for t in reader.tensors) * DTYPES[dtype].size + (4 << 20)
    hint = f"nothing was written to {out_dir}; free space and convert again"
    try:
        with diskspace.writing(tmp, need, hint):
            _write_folder(tmp, gguf_path, meta, tensors, config, tokenizer, dtype, quantize, chat_template)
        os.chmod(tmp, 0o755)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_folder(tmp: Path, gguf_path: Path, meta: dict[str, Any], tensors: dict[str, Any], config: dict[str, Any],
                  tokenizer: Any, dtype: str, quantize: str | None, chat_template: str | None) -> None:
    """Every file of the model folder, into `tmp`."""
    tokenizer.save(str(tmp / "tokenizer.json"))
    for name, content in tokenizer_files(meta, chat_template).items():
        _write_json(tmp / name, content)
    weights, layer_bits = convert_tensors(meta, tensors, dtype=dtype, keep=quantize == "keep")
    if layer_bits:
        config["quantization"] = config["quantization_config"] = _keep_quantization(layer_bits)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    del weights
    _write_json(tmp / "config.json", config)
    if quantize in ("q4", "q8"):
        _requantize(tmp, config, bits=int(quantize[1:]))
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    _write_json(tmp / "generation_config.json", {k: config[k] for k in ids if config[k] is not None})
    _write_json(tmp / "poft_conversion.json", _provenance(gguf_path, meta, dtype, quantize, chat_template))


def build_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face config.json of the model the GGUF describes."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"GGUF metadata lacks {arch}.{key}")
        return value

    heads, hidden, layers = get("attention.head_count"), get("embedding_length"), get("block_count")
    kv_heads = get("attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise ModelFileError("per-layer head counts are not supported")
    head_dim = get("attention.key_length", hidden // heads)
    architecture, model_type = _HF_CLASSES[arch]
    bos, eos, pad = (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    eot = meta.get("tokenizer.ggml.eot_token_id")
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": bos,
        "eos_token_id": [eos, eot] if eot is not None and eot != eos else eos,
        "pad_token_id": pad,
    }
    if (scaling := _rope_scaling(meta, arch)) is not None:
        config["rope_scaling"] = scaling
    if arch in ("llama", "qwen2"):
        config["hidden_act"] = "silu"
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "llama":
        config["mlp_bias"] = False
    elif arch == "qwen2":
        config["use_sliding_window"] = False
    elif arch == "gemma3":
        config.update(_gemma3_config(meta, layers, hidden, heads, head_dim))
    return config


def _gemma3_config(meta: dict[str, Any], layers: int, hidden: int, heads: int, head_dim: int) -> dict[str, Any]:
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if not isinstance(pattern, int):
        raise ModelFileError(f"gemma3.attention.sliding_window_pattern {pattern!r}: only a period is supported")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B (62 layers), else 1/sqrt(head_dim).
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "sliding_window": meta.get("gemma3.attention.sliding_window", 512),
        "sliding_window_pattern": pattern,
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
        ],
        "rope_local_base_freq": _f32(meta.get("gemma3.rope.freq_base_swa", 10000.0)),
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
    }


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ModelFileError(f"{arch}.rope.scaling.type {kind!r} is not supported (only linear)")
    return {"rope_type": "linear", "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}


def hf_tensor_names(arch: str, gguf_names: list[str]) -> dict[str, str]:
    """Map GGUF tensor names to Hugging Face names; unknown names raise one ModelFileError."""
    table = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES[arch]}
    names, unknown = {}, []
    for name in gguf_names:
        base, _, suffix = name.rpartition(".")
        parts = base.split(".")
        if base in _TOP_NAMES:
            names[name] = f"{_TOP_NAMES[base]}.{suffix}"
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in table:
            names[name] = f"model.layers.{parts[1]}.{table[parts[2]]}.{suffix}"
        else:
            unknown.append(name)
    if unknown:
        raise ModelFileError(f"GGUF tensors with no {arch} counterpart: {', '.join(sorted(unknown))}")
    return names


def convert_tensors(
    meta: dict[str, Any], tensors: dict[str, Any], *, dtype: str, keep: bool
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """The model's tensors under Hugging Face names, and {module path: bits} of those kept quantized.

    Floating-point tensors are `dtype`; kept ones are MLX affine triples whose scales and biases
    are float16 (float32 when `dtype` is float32): both hold the GGUF's float16 values exactly.
    """
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    names = hf_tensor_names(arch, list(tensors))
    weights: dict[str, mx.array] = {}
    layer_bits: dict[str, int] = {}
    for gguf_name, tensor in tensors.items():
        name = names[gguf_name]
        # llama.cpp permutes Q and K rows for its RoPE layout, for llama only.
        n_rot = {"attn_q": heads, "attn_k": kv_heads}.get(gguf_name.split(".")[-2]) if arch == "llama" else None
        triple = pack_affine(tensor) if keep and tensor.data.ndim == 2 else None
        if triple is not None:
            module = name.removesuffix(".weight")
            for part, array in zip(("weight", "scales", "biases"), triple):
                array = mx.array(unpermute_rows(array, n_rot) if n_rot else array)
                # float16 scales hold the GGUF's exactly; float32 ones too, and keep a float32 model
                # float32 (MLX dequantizes embeddings in the scales' type).
                if part != "weight" and dtype == "float32":
                    array = array.astype(mx.float32)
                weights[f"{module}.{part}"] = array
            layer_bits[module] = 8 if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0 else 4
            continue
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if n_rot:
            array = unpermute_rows(array, n_rot)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            array = array - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        weights[name] = mx.array(np.ascontiguousarray(array, dtype=np.float32)).astype(DTYPES[dtype])
        mx.eval(weights[name])  # keep one float32 copy alive at a time
    return weights, layer_bits


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (axis 0) for `n_head` heads.

    llama.cpp interleaves the two rotary halves of each head: row (h, i, j) of the HF layout
    (head, half, index) moves to (h, j, i). Works on weights, biases, packed weights and scales.
    """
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def pack_affine(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A Q4_0, Q4_1 or Q8_0 matrix as an MLX affine triple with the same values, else None.

    Returns (weight uint32 [rows, cols*bits/32], scales float16 [rows, cols/32], biases float16)
    with value = scale * q + bias, q unsigned: Q4_0 is d*(q-8) (bias -8d), Q4_1 is d*q + m,
    Q8_0 is d*q for signed q (q+128 unsigned, bias -128d). None also when a bias is not exactly
    representable in float16 (it never is only for absurd scales), so the caller dequantizes.
    """
    qtype = gguf.GGMLQuantizationType
    header = {qtype.Q4_0: 2, qtype.Q4_1: 4, qtype.Q8_0: 2}.get(tensor.tensor_type)
    if header is None:
        return None
    data = np.asarray(tensor.data)
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, gguf.GGML_QUANT_SIZES[tensor.tensor_type][1])
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    qs = blocks[..., header:]
    if tensor.tensor_type == qtype.Q8_0:
        q = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = d.astype(np.float32) * -128
    else:
        # Byte j of a Q4 block holds element j in its low nibble and element j + 16 in its high one.
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        if tensor.tensor_type == qtype.Q4_1:
            bias = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        else:
            bias = d.astype(np.float32) * -8
        q = q.reshape(rows, -1)
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # MLX packs element i at bits 4i of a little-endian word
    biases = bias.astype(np.float16)
    if not np.array_equal(biases.astype(np.float32), bias):
        return None
    packed = np.ascontiguousarray(q.reshape(rows, -1)).view("<u4")
    return packed, d.copy(), biases


def _keep_quantization(layer_bits: dict[str, int]) -> dict[str, Any]:
    """mlx-lm's quantization block: the commonest bits, and an entry per layer that differs."""
    default = Counter(layer_bits.values()).most_common(1)[0][0]
    params = {"group_size": KEEP_GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, bits in sorted(layer_bits.items()):
        if bits != default:
            params[module] = {"group_size": KEEP_GROUP_SIZE, "bits": bits, "mode": "affine"}
    return params


def _requantize(folder: Path, config: dict[str, Any], *, bits: int) -> None:
    """Re-quantize the float model in `folder` with mlx-lm and rewrite its weights and config."""
    from mlx_lm.utils import load_model, quantize_model  # lazy: mlx-lm's import is slow; q4/q8 only

    model, _ = load_model(folder, lazy=True)
    model, config = quantize_model(model, config, group_size=REQUANT_GROUP_SIZE, bits=bits)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    _write_json(folder / "config.json", config)


def _provenance(path: Path, meta: dict[str, Any], dtype: str, quantize: str | None, template: str | None) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return {
        "converter": "poft_mlx.gguf_convert",
        "converter_version": CONVERTER_VERSION,
        "source": path.name,
        "source_sha256": digest.hexdigest(),
        "dtype": dtype,
        "quantize": quantize,
        "chat_template_overridden": template is not None,
        "general": {k: v for k, v in meta.items() if k.startswith("general.") and isinstance(v, (str, int, float))},
    }


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an empty `out_dir` is replaced, a full one wins."""
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise WouldOverwrite(f"{out_dir} appeared while converting") from e
        raise


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))
