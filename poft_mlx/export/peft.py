"""Export a run's LoRA/DoRA adapter in PEFT's format, for transformers + peft on the float base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ..errors import ExportError
from ..rundir import ADAPTER_FILE
from .hub import PEFT_CONFIG
from .run import empty_out_dir, load_run_model, open_finished_run, write_provenance

PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for an adapter's tensors


def export_peft(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model_name: str | None = None,
    base: str | Path | None = None,
) -> dict[str, Any]:
    """Write the run's LoRA/DoRA adapter in PEFT's format; returns the adapter_config written.

    lora_A.weight = lora_a.T (r, in), lora_B.weight = lora_b.T (out, r), lora_alpha = scale * r
    (PEFT scales by lora_alpha / r); DoRA's m becomes lora_magnitude_vector with use_dora, whose
    forward (m / ||W + s B A||_row) * (W x + s B A x) is mlx-lm's. The adapter is first loaded
    onto its base (lazily: shapes only), so every tensor is checked against the base.
    """
    run = open_finished_run(run_dir, base)
    if run.fine_tune_type == "full":
        raise ExportError("a full fine-tune has no adapter to export in PEFT format: use `poft-mlx fuse` instead")
    if run.init_adapters:
        raise ExportError(f"{run.adapter_dir} was trained on top of init_adapters {run.init_adapters}: one PEFT "
                          "adapter cannot carry both stages; use `poft-mlx fuse` (it applies both)")
    model, config = load_run_model(run, with_adapter=True, lazy=True)
    layers = dict(model.named_modules())
    names = mx.load(str(run.adapter_dir / ADAPTER_FILE)).keys()
    paths = sorted({k.rpartition(".")[0] for k in names})
    linear = (LoRALinear, DoRALinear)
    wrong = [f"{p} ({type(layers.get(p)).__name__})" for p in paths if not isinstance(layers.get(p), linear)]
    if wrong:
        raise ExportError("PEFT export supports adapters on linear layers only, not on: " + ", ".join(wrong))
    tensors = {}
    for path in paths:
        prefix, layer = f"base_model.model.{path}", layers[path]
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_a.T
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_b.T
        if isinstance(layer, DoRALinear):
            tensors[f"{prefix}.lora_magnitude_vector"] = layer.m
    lora = run.adapter_config["lora_parameters"]
    r, alpha = int(lora["rank"]), float(lora["scale"]) * int(lora["rank"])
    targets, layer_ids = _peft_targets(paths)
    name = base_model_name or _portable_base(run.folder.read_config().get("model") or run.adapter_config.get("model"))
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(lora.get("dropout", 0.0)), "target_modules": targets,
        "layers_to_transform": layer_ids, "layers_pattern": "layers" if layer_ids else None,
        "bias": "none", "use_dora": run.fine_tune_type == "dora", "use_rslora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": str(name) if name else None,
    }
    notes = []
    if "quantization" in config:
        notes.append(f"trained on the MLX-quantized base {run.base}; PEFT applies it to the float base you load")
    out = empty_out_dir(out_dir)
    mx.save_safetensors(str(out / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    write_provenance(run, out, "peft adapter" + "".join(f"; {n}" for n in notes))
    return peft_config | {"notes": notes}


def _portable_base(ref) -> str | None:
    """The base as PEFT should name it: its Hub id where one is known (a Hub id, a pypi: alias of a
    Hub model), else the model folder's or GGUF file's name; never a path of this machine."""
    if not ref:
        return None
    from ..models.refs import portable_ref  # lazy: loads mlx and gguf-py

    p = portable_ref(str(ref))
    return p.get("hub_id") or p.get("ref")


def _peft_targets(paths: list[str]) -> tuple[list[str], list[int] | None]:
    """target_modules and layers_to_transform for PEFT.

    When the adapted modules are the same relative keys in every adapted `model.layers.N` (what
    mlx-lm produces), PEFT gets leaf names + layer indices; otherwise the exact module paths.
    """
    by_layer: dict[int, set[str]] = {}
    for path in paths:
        head, sep, rest = path.partition("model.layers.")
        index, _, key = rest.partition(".")
        if head or not sep or not index.isdigit():
            return paths, None
        by_layer.setdefault(int(index), set()).add(key)
    keys = set.union(*by_layer.values())
    leaves = {k.rpartition(".")[2] for k in keys}
    if any(v != keys for v in by_layer.values()) or len(leaves) != len(keys):
        return paths, None
    return sorted(leaves), sorted(by_layer)
