"""Adapters on a loaded model: a previous stage's fused into the weights, a run's loaded on top."""

from __future__ import annotations

import json
from pathlib import Path

from mlx.utils import tree_unflatten

from ..errors import InputMissing, ModelMismatch
from ..rundir import ADAPTER_CONFIG, ADAPTER_FILE
from . import modeling


def fuse_adapters(model, folder: str | Path, target_path: Path | None = None) -> None:
    """Load a previous stage's adapters (mlx-lm layout) and fold them into `model`'s weights.

    Quantized layers that carried adapters become float layers (dequantize, add B A), so the
    fused model computes exactly what the previous stage's policy computed.
    """
    from mlx_lm.tuner.utils import load_adapters  # lazy: mlx-lm's import is slow

    folder = Path(folder)
    if not (folder / ADAPTER_FILE).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise InputMissing(f"init_adapters {folder}: expected {ADAPTER_FILE} and {ADAPTER_CONFIG} "
                           "there (a run's RUN_DIR/adapters folder)")
    trained_on = json.loads((folder / ADAPTER_CONFIG).read_text()).get("model")
    if target_path is not None and trained_on and Path(trained_on).resolve() != Path(target_path).resolve():
        raise ModelMismatch(f"init_adapters {folder} were trained on {trained_on}, but the target is "
                            f"{target_path}; set `model` to the previous stage's target")
    load_adapters(model, str(folder))
    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))


def load_policy(cfg, adapter_path: str | None = None) -> modeling.Loaded:
    """The target with `cfg.init_adapters` fused in and, optionally, a run's adapters loaded."""
    from mlx_lm.tuner.utils import load_adapters  # lazy: mlx-lm's import is slow

    loaded = modeling.load(cfg.model, dtype=cfg.system.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.init_adapters:
        fuse_adapters(loaded.model, cfg.init_adapters, loaded.path)
    if adapter_path:
        load_adapters(loaded.model, adapter_path)
    return loaded
