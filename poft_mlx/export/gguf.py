"""Write a fused model as one GGUF file for llama.cpp, Ollama and LM Studio (export-gguf).

`export_gguf(SOURCE, OUT)`: SOURCE is a run folder (its adapters are fused first, with
export.fuse.fuse_run and its check, into a temporary folder beside OUT) or a model folder in
Hugging Face layout (a fused folder, a converted GGUF, a Hub snapshot). The weights are read
the way mlx-lm reads them (mlx_lm.utils.load_model: its sanitize, its defaults for missing
hyper-parameters), so the file computes what the MLX model computes.

Facts taken from llama.cpp (convert_hf_to_gguf.py, src/models/*.cpp), each inverted by
models/gguf.py when it reads a GGUF:
- names: gguf-py's tensor maps (gguf.get_tensor_name_map) turn HF names into blk.N.attn_q...
- llama (and mistral) rotate interleaved pairs, HF rotates halves: Q and K rows are permuted
  per head (permute_rows; models.gguf.unpermute_rows undoes it). qwen2, qwen3, gemma3: not.
- gemma3 stores RMSNorm weights as 1 + w; its query scale is not stored (llama.cpp uses
  1/sqrt(head_dim), 1/sqrt(hidden/heads) for the 62-layer 27B), so another scalar is refused.
- Llama 3 rope scaling is a rope_freqs tensor of per-frequency divisors.
- One token per embedding row (gguf_vocab pads the vocabulary).

Outtypes: f32; f16 / bf16 (matrices, vectors stay f32 as in convert_hf_to_gguf); q8_0; q4_0
(matrices Q4_0 except the output projection, the embedding when tied, kept Q8_0 as
llama-quantize keeps it high; gguf-py writes no K-quants). A matrix whose rows are not a
multiple of 32 falls back to f16 (the Q blocks are 32 wide).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np

from ..runtime import diskspace
from ..errors import ExportError, WouldOverwrite
from .gguf_vocab import add_vocab, read_json_object, read_vocab

QT = gguf.GGMLQuantizationType
OUTTYPES = {  # outtype -> (matrix type, general.file_type)
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# HF model_type -> llama.cpp architecture. Each is exported and read back by llama.cpp in
# tests/test_gguf_export.py.
ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
}
_PERMUTED = {".self_attn.q_proj.": "heads", ".self_attn.k_proj.": "kv_heads"}


@dataclass
class GGUFReport:
    """What export_gguf wrote; tensor_types counts tensors per GGML type."""

    path: Path
    architecture: str
    outtype: str
    tensors: int
    tensor_types: dict[str, int]
    n_vocab: int
    chat_template: str | None
    nbytes: int
    fused_from: Path | None = None


def export_gguf(source: str | os.PathLike[str], out: str | os.PathLike[str], *, outtype: str = "f16",
                base: str | os.PathLike[str] | None = None, dequantize: bool = False, force: bool = False,
                check: bool = True) -> GGUFReport:
    """Write run or model folder `source` as the GGUF file `out` (see the module docstring).

    `base` overrides a run's base model folder; `dequantize` accepts an MLX-quantized folder
    (its weights are dequantized, then written as `outtype`); `check` is fuse_run's check.
    """
    from .fuse import fuse_run

    source, out = Path(source), Path(out)
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    if out.exists() and not force:
        raise WouldOverwrite(f"{out} already exists: choose another name or remove it (or --force)")
    if not source.is_dir():
        raise ExportError(f"{source} is not a folder: give a run folder or a model folder (with config.json)")
    if (source / "config.json").is_file():
        return write_gguf(source, out, outtype=outtype, dequantize=dequantize)
    if not (source / "adapters").is_dir():
        raise ExportError(f"{source} is neither a model folder (no config.json) nor a run folder (no adapters/)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".poft-gguf-fuse-", dir=out.parent) as tmp:
        fused = Path(tmp) / "fused"
        fuse_run(source, fused, base=base, check=check)  # dequantizes a quantized base
        report = write_gguf(fused, out, outtype=outtype, name=source.resolve().name)
    report.fused_from = source
    return report


def write_gguf(folder: str | os.PathLike[str], out: str | os.PathLike[str], *, outtype: str = "f16",
               dequantize: bool = False, name: str | None = None) -> GGUFReport:
    """Write model folder `folder` as GGUF file `out`, built beside it and renamed into place.

    `name` is general.name (default: the folder's name).
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    from ..models.files import check_folder

    folder, out = Path(folder), Path(out)
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{folder / 'config.json'}: model_type {model_type!r} is not supported for GGUF export; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    if ("quantization" in config or "quantization_config" in config) and not dequantize:
        raise ExportError(
            f"{folder / 'config.json'} has a 'quantization' block: the folder holds MLX-quantized weights. "
            "Export a float folder (poft-mlx fuse dequantizes by default) or pass --dequantize to "
            "dequantize these weights first (their rounding stays in the GGUF)")
    try:
        check_folder(folder)
        model, _ = load_model(folder, lazy=True)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load model folder {folder}: {e}") from None
    if dequantize:
        model = dequantize_model(model)
    arch = ARCHITECTURES[model_type]
    hp = hyperparameters(model.args, config, folder / "config.json")
    weights = dict(tree_flatten(model.parameters()))
    names = gguf_names(arch, hp["layers"], list(weights), folder)
    vocab = read_vocab(folder, int(weights["model.embed_tokens.weight"].shape[0]))

    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    plan = _plan(weights, names, outtype, hp)
    need = sum(entry[-1] for entry in plan) + (16 << 20)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    hint = f"nothing was written to {out}; free space and export again"
    diskspace.check_space(out.parent, need, hint)
    try:
        with diskspace.writing(tmp, need, hint):
            writer = gguf.GGUFWriter(str(tmp), arch_name)
            _add_metadata(writer, arch, hp, name or folder.resolve().name, OUTTYPES[outtype][1])
            add_vocab(writer, vocab)
            for _, gguf_name, shape, qtype, nbytes in plan:
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for hf, gguf_name, _, qtype, _ in plan:
                writer.write_tensor_data(_tensor_data(hf, gguf_name, weights, qtype, arch, hp))
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    types = Counter(qtype.name for _, _, _, qtype, _ in plan)
    return GGUFReport(out, arch_name, outtype, len(plan), dict(types), len(vocab.tokens), vocab.chat_template,
                      out.stat().st_size)


def hyperparameters(args: Any, config: dict[str, Any], where: Path) -> dict[str, Any]:
    """What llama.cpp reads, from mlx-lm's resolved ModelArgs; refuses what it cannot express."""
    model_type = config["model_type"]
    heads = args.num_attention_heads
    hp = {
        "model_type": model_type,
        "layers": args.num_hidden_layers,
        "hidden": args.hidden_size,
        "ffn": args.intermediate_size,
        "heads": heads,
        "kv_heads": getattr(args, "num_key_value_heads", None) or heads,
        "head_dim": getattr(args, "head_dim", None) or args.hidden_size // heads,
        "eps": float(args.rms_norm_eps),
        "rope_theta": float(args.rope_theta),
        "context": getattr(args, "max_position_embeddings", None) or config.get("max_position_embeddings") or 4096,
        "rope_scaling": getattr(args, "rope_scaling", None) or None,
    }
    traditional = getattr(args, "rope_traditional", False)
    arch = ARCHITECTURES[model_type]
    if arch == gguf.MODEL_ARCH.LLAMA:
        hp["permute"] = not traditional  # traditional = interleaved = llama.cpp's own layout
        if getattr(args, "mlp_bias", False):
            raise ExportError(f"{where}: mlp_bias true is not supported for GGUF export")
        if any(t != "full_attention" for t in getattr(args, "layer_types", None) or []):
            raise ExportError(f"{where}: layer_types with sliding attention is not supported for llama GGUF export")
    elif traditional:
        raise ExportError(f"{where}: rope_traditional true: llama.cpp's {model_type} uses half-split (NEOX) RoPE")
    scaling = hp["rope_scaling"]
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    allowed = {"default", "linear"} | ({"llama3"} if arch == gguf.MODEL_ARCH.LLAMA else set())
    if arch == gguf.MODEL_ARCH.GEMMA3:
        allowed = {"default"}
    if kind not in allowed:
        raise ExportError(f"{where}: rope_scaling type {kind!r} is not supported for {model_type} GGUF export; "
                          f"supported: {', '.join(sorted(allowed))}")
    hp["rope_kind"] = kind
    if arch == gguf.MODEL_ARCH.GEMMA3:
        expected = hp["hidden"] // heads if hp["layers"] == 62 else hp["head_dim"]
        if float(args.query_pre_attn_scalar) != float(expected):
            raise ExportError(f"{where}: query_pre_attn_scalar {args.query_pre_attn_scalar} is not what llama.cpp "
                              f"uses for this gemma3 ({expected})")
        if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
            raise ExportError(f"{where}: logit softcapping is set, but mlx-lm's gemma3_text ignores it; "
                              "the GGUF would compute something else")
        hp.update(sliding_window=args.sliding_window, swa_pattern=args.sliding_window_pattern,
                  rope_local=float(args.rope_local_base_freq))
    return hp


def gguf_names(arch: gguf.MODEL_ARCH, layers: int, hf_names: list[str], folder: Path) -> dict[str, str]:
    """HF tensor name -> GGUF name, by gguf-py's map; any name without one is an error."""
    table = gguf.get_tensor_name_map(arch, layers)
    names, unknown = {}, []
    for name in hf_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        (unknown.append(name) if mapped is None else names.__setitem__(name, mapped))
    if unknown:
        raise ExportError(f"{folder}: tensors with no {gguf.MODEL_ARCH_NAMES[arch]} GGUF name: {', '.join(unknown)}")
    return names


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for `n_head` heads (axis 0): row (h, half, i) -> (h, i, half).

    The inverse of models.gguf.unpermute_rows; works on weights and biases.
    """
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def llama3_rope_factors(hp: dict[str, Any]) -> np.ndarray:
    """rope_freqs for Llama 3 scaling: per frequency, the divisor of its angle (1 .. factor)."""
    s = hp["rope_scaling"]
    dim = hp["head_dim"]
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi * hp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid)).astype(np.float32)


def _plan(weights: dict[str, mx.array], names: dict[str, str], outtype: str,
          hp: dict[str, Any]) -> list[tuple[str | None, str, tuple[int, ...], QT, int]]:
    """(HF name, GGUF name, shape, type, bytes) per tensor, in the order they are written."""
    matrix = OUTTYPES[outtype][0]
    output = "output.weight" if "lm_head.weight" in weights else "token_embd.weight"
    plan = []
    for hf, name in names.items():
        shape = tuple(int(d) for d in weights[hf].shape)
        qtype = matrix
        if len(shape) == 1 or name.endswith("_norm.weight"):
            qtype = QT.F32
        elif outtype == "q4_0" and name == output:
            qtype = QT.Q8_0
        if qtype in (QT.Q8_0, QT.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = QT.F16
        plan.append((hf, name, shape, qtype, _nbytes(shape, qtype)))
    if hp["rope_kind"] == "llama3":
        plan.append((None, "rope_freqs.weight", (hp["head_dim"] // 2,), QT.F32, 4 * (hp["head_dim"] // 2)))
    return plan


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


def _tensor_data(hf: str | None, name: str, weights: dict[str, mx.array], qtype: QT, arch: gguf.MODEL_ARCH,
                 hp: dict[str, Any]) -> np.ndarray:
    if hf is None:
        return llama3_rope_factors(hp)
    x = np.array(weights[hf].astype(mx.float32))
    if arch == gguf.MODEL_ARCH.LLAMA and hp["permute"]:
        for part, heads in _PERMUTED.items():
            if part in hf:
                x = permute_rows(x, hp[heads])
    if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
        x = x + np.float32(1.0)  # Gemma3RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
    return x if qtype == QT.F32 else gguf.quants.quantize(x, qtype)


def _add_metadata(writer: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, hp: dict[str, Any], name: str,
                  file_type: int) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(hp["context"]))
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(hp["head_dim"])
    if hp["rope_kind"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_scaling"]["factor"]))
    if arch == gguf.MODEL_ARCH.GEMMA3:
        writer.add_sliding_window(int(hp["sliding_window"]))
        writer.add_sliding_window_pattern(int(hp["swa_pattern"]))  # every Nth layer is global, as mlx-lm
        writer.add_rope_freq_base_swa(hp["rope_local"])


def _read_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "config.json", "not a model folder")
