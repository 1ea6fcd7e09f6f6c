"""A run's LoRA adapter as a llama.cpp adapter GGUF (export-gguf --lora), for the base's GGUF.

The file is what llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:
general.type = adapter, adapter.type = lora, adapter.lora.alpha, and per adapted matrix
`<gguf name>.lora_a` (numpy shape [rank, in]) and `.lora_b` ([out, rank]). llama.cpp adds
scale * B @ (A @ x) with scale = alpha / rank (rank read from lora_b), so alpha = mlx-lm's
`scale` * rank (mlx-lm: y = base(x) + scale * (x @ lora_a) @ lora_b, lora_a [in, rank],
lora_b [rank, out]). For llama, whose GGUF permutes the rows of Q and K, lora_b's rows (the
output side of the delta) are permuted the same way, since P (B A) = (P B) A.

The adapter applies to any GGUF of the same base with the same tensor names: the file the
target was converted from (`model: some.gguf` or a `pypi:` alias; quantized or not), or the
base exported with `export-gguf BASE_FOLDER base.gguf`. DoRA and full fine-tuning have no
llama.cpp adapter form; export those fused (export-gguf RUN OUT.gguf).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from ..errors import ExportError, WouldOverwrite
from .gguf import ARCHITECTURES, gguf_names, permute_rows
from .gguf_vocab import read_json_object

LORA_OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16}


@dataclass
class LoraReport:
    path: Path
    architecture: str
    alpha: float
    rank: int
    matrices: int  # adapted matrices (two tensors each)
    base: Path


def export_lora_gguf(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, outtype: str = "f32",
                     base: str | os.PathLike[str] | None = None, force: bool = False) -> LoraReport:
    """Write the LoRA adapter of run folder `run_dir` as adapter GGUF `out` (see the module docstring)."""
    out = Path(out)
    if outtype not in LORA_OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not supported for a LoRA GGUF; choose one of "
                          f"{', '.join(LORA_OUTTYPES)}")
    if out.exists() and not force:
        raise WouldOverwrite(f"{out} already exists: choose another name or remove it (or --force)")
    run, adapter_dir = Path(run_dir), Path(run_dir) / "adapters"
    where = adapter_dir / "adapter_config.json"
    adapter_config = read_json_object(where, "the run's adapter config (is this a run folder?)")
    kind = adapter_config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ExportError(f"{where}: fine_tune_type {kind!r} has no llama.cpp adapter form; "
                          f"export the fused model instead: poft-mlx export-gguf {run} OUT.gguf")
    init = (adapter_config.get("poft_mlx") or {}).get("init_adapters")
    if init:
        raise ExportError(f"{where}: the run was trained on top of init_adapters {init}, so its LoRA applies "
                          "to that fused model, not to the base GGUF; export the fused model instead")
    lora = adapter_config.get("lora_parameters") or {}
    if not {"rank", "scale"} <= set(lora):
        raise ExportError(f"{where}: lora_parameters needs 'rank' and 'scale', has {sorted(lora)}")
    base_dir = _find_base(base or adapter_config.get("model"))
    if base_dir is None:
        raise ExportError(f"{where}: base model {adapter_config.get('model')!r} ('model') is not on this "
                          "machine; pass the base model folder (--base): its config.json gives the architecture")
    config = read_json_object(base_dir / "config.json", "the base model folder's config")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{base_dir / 'config.json'}: model_type {model_type!r} is not supported for GGUF "
                          f"export; supported: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        raise ExportError(f"{base_dir / 'config.json'}: num_hidden_layers is missing or not an integer")
    pairs = _pairs(adapter_dir / "adapters.safetensors")
    names = gguf_names(arch, int(layers), [f"{m}.weight" for m in pairs], adapter_dir)
    ranks = {a.shape[1] for a, _ in pairs.values()}
    if len(ranks) != 1 or ranks != {lora["rank"]}:
        raise ExportError(f"{adapter_dir / 'adapters.safetensors'}: lora_a ranks {sorted(ranks)} do not match "
                          f"lora_parameters.rank {lora['rank']} in {where}")
    alpha = float(lora["scale"]) * int(lora["rank"])
    heads = config["num_attention_heads"]
    permute = {"q_proj": heads, "k_proj": config.get("num_key_value_heads") or heads}
    permuted = arch == gguf.MODEL_ARCH.LLAMA and not config.get("rope_traditional", False)

    qtype = LORA_OUTTYPES[outtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{run.name} (LoRA)")
        for module, (a, b) in pairs.items():
            name = names[f"{module}.weight"]
            lora_a = np.ascontiguousarray(a.T)  # [rank, in]
            lora_b = np.ascontiguousarray(b.T)  # [out, rank]
            kind = module.rpartition(".")[2]
            if permuted and kind in permute:
                lora_b = permute_rows(lora_b, permute[kind])
            for suffix, x in (("lora_a", lora_a), ("lora_b", lora_b)):
                data = x if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(x, qtype)
                writer.add_tensor(f"{name}.{suffix}", data,
                                  raw_shape=x.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return LoraReport(out, gguf.MODEL_ARCH_NAMES[arch], alpha, int(lora["rank"]), len(pairs), base_dir)


def _pairs(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (lora_a [in, rank], lora_b [rank, out])} in float32; anything else is an error."""
    if not path.is_file():
        raise ExportError(f"{path} is missing: the run has no trained adapter weights")
    tensors = mx.load(str(path))
    modules: dict[str, dict[str, np.ndarray]] = {}
    other = []
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            modules.setdefault(module, {})[leaf] = np.array(value.astype(mx.float32))
        else:
            other.append(key)
    if other:
        raise ExportError(f"{path}: tensors that are not LoRA pairs (lora_a / lora_b): {', '.join(sorted(other))}")
    half = sorted(m for m, p in modules.items() if len(p) != 2)
    if half:
        raise ExportError(f"{path}: modules with only one of lora_a / lora_b: {', '.join(half)}")
    if not modules:
        raise ExportError(f"{path}: no LoRA tensors")
    return {m: (p["lora_a"], p["lora_b"]) for m, p in sorted(modules.items(), key=lambda kv: _layer_order(kv[0]))}


def _layer_order(module: str) -> tuple:
    parts = module.split(".")
    return tuple(int(p) if p.isdigit() else 0 for p in parts), module


def _find_base(ref: str | os.PathLike[str] | None) -> Path | None:
    """A local folder, or a Hub id already in the local cache (never downloads)."""
    if ref is None:
        return None
    if Path(ref).is_dir():
        return Path(ref)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(ref), local_files_only=True))
    except Exception:  # not a Hub id, or not cached
        return None
