"""A finished run folder opened for export, and what every export writes beside its weights.

`open_finished_run` checks that a run folder holds trained adapters (mlx-lm's layout, see
rundir.py) and finds the run's base model on this machine; `load_run_model` loads that base
(checked by models/files.py first), with an earlier stage's adapters fused in and the run's own
adapters on top when asked. `empty_out_dir` refuses to write into a folder that holds anything,
and `write_provenance` adds poft_provenance.json and poft_config.yaml, the record the model card
is made from. Used by fuse.py (a fused model folder) and peft.py (a PEFT adapter folder).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
import yaml
from huggingface_hub import snapshot_download
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import dequantize_model, load_model

from ..errors import ExportError
from ..models.adapters import fuse_adapters
from ..models.files import check_folder
from ..models.refs import portable_ref
from ..rundir import ADAPTER_CONFIG, ADAPTER_FILE, RunDir
from .hub import CONFIG_COPY, PROVENANCE_FILE, collect_provenance

PARTIAL = ".poft-fuse-partial"  # a fuse being written, inside its output folder


@dataclass(frozen=True)
class Run:
    """A run folder resolved: its adapters, their config, and the local base model folder."""

    run_dir: Path
    adapter_dir: Path
    adapter_config: dict[str, Any]
    base: Path | None  # None when the base is not available on this machine

    @property
    def folder(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def fine_tune_type(self) -> str:
        return self.adapter_config.get("fine_tune_type", "lora")

    @property
    def init_adapters(self) -> str | None:
        """The earlier stage's adapters this run started from (fused into its base), if any."""
        return (self.adapter_config.get("poft_mlx") or {}).get("init_adapters")


def open_finished_run(run_dir: str | Path, base: str | Path | None = None) -> Run:
    """Validate a run folder's adapter files and find its base model (`base` overrides)."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise ExportError(f"run folder not found: {run}")
    adapters = run.adapters
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_FILE) if not (adapters / n).is_file()]
    if missing:
        raise ExportError(f"{run} has no trained adapters: missing {', '.join(f'adapters/{n}' for n in missing)}")
    try:
        config = json.loads((adapters / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{adapters / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    except OSError as e:
        raise ExportError(f"{adapters / ADAPTER_CONFIG} cannot be read ({e.strerror or e})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{adapters / ADAPTER_CONFIG}: JSON {type(config).__name__}, expected an object")
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise ExportError(f"{adapters / ADAPTER_CONFIG}: fine_tune_type {kind!r}, expected lora, dora or full")
    lora = config.get("lora_parameters") or {}
    if kind != "full" and not {"rank", "scale"} <= set(lora):
        raise ExportError(
            f"{adapters / ADAPTER_CONFIG}: lora_parameters needs 'rank' and 'scale', has {sorted(lora)}"
        )
    return Run(run.root, adapters, config, _find_base(base or config.get("model")))


def _find_base(ref: str | Path | None) -> Path | None:
    if ref is None:
        return None
    if Path(ref).is_dir():
        return Path(ref)
    try:  # a Hub id already in the local cache; never downloads
        return Path(snapshot_download(str(ref), local_files_only=True))
    except Exception:
        return None


def require_base(run: Run) -> Path:
    """The run's base model folder, or ExportError saying to pass --base."""
    if run.base is None:
        raise ExportError(
            f"base model {run.adapter_config.get('model')!r} ({ADAPTER_CONFIG} 'model') is not on this "
            "machine: pass the base model folder (--base)"
        )
    return run.base


def load_run_model(
    run: Run, with_adapter: bool, lazy: bool = False, dequantize: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The base model (dequantized when asked: as a dequantized fuse stores it), with the adapter."""
    base = require_base(run)
    try:
        check_folder(base)  # truncated, absurd or hostile files: named before mlx reads them
        model, config = load_model(base, lazy=lazy)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load base model {base}: {e}") from None
    if dequantize:
        model = dequantize_model(model)
    if run.init_adapters:  # a later stage (DPO) trained on top of an earlier run: its base
        try:
            fuse_adapters(model, run.init_adapters, None)
        except (FileNotFoundError, ValueError, KeyError, AttributeError) as e:
            raise ExportError(f"{run.adapter_dir} was trained on top of init_adapters {run.init_adapters}, "
                              f"which cannot be applied: {e}") from None
    if with_adapter:
        try:
            load_adapters(model, str(run.adapter_dir))
        except (ValueError, KeyError, AttributeError) as e:
            raise ExportError(f"the adapter in {run.adapter_dir} does not fit base model {base}:\n{e}") from None
        model.eval()
    return model, config


def empty_out_dir(out_dir: str | Path) -> Path:
    """`out_dir`, created; ExportError when it exists and holds anything (a file, a finished export)."""
    out = Path(out_dir)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # what a killed fuse left: never complete
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output folder {out} already exists and is not empty: choose another or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_provenance(run: Run, out: Path, export: str) -> None:
    """poft_provenance.json and poft_config.yaml: what the model card states, uploaded with the model,
    so neither holds a path of this machine (model references are made portable, see hub.py)."""
    provenance = collect_provenance(run.run_dir, run.base) | {"export": export}
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    config = run.folder.read_config()
    if config:
        (out / CONFIG_COPY).write_text(yaml.safe_dump(portable_config(config), sort_keys=False))


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved config with every model reference made portable (modelref.portable_ref)
    and every other local path (data files, run folder, caches, templates) cut to its last part."""

    def model(ref: Any) -> Any:
        return portable_ref(str(ref))["ref"] if isinstance(ref, str) and ref else ref

    def paths(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: paths(v) for k, v in value.items()}
        if isinstance(value, list):
            return [paths(v) for v in value]
        if isinstance(value, str) and _looks_local(value):
            return Path(value.replace("\\", "/").rstrip("/")).name
        return value

    out = paths({k: v for k, v in config.items() if k not in ("model", "aligned")})
    out = {"model": model(config.get("model")), **out} if "model" in config else out
    if isinstance(config.get("aligned"), list):
        out["aligned"] = [{**paths(a), "model": model(a.get("model"))} if isinstance(a, dict) else model(a)
                          for a in config["aligned"]]
    return {k: out[k] for k in config}  # the config's own key order


def _looks_local(text: str) -> bool:
    """An absolute, home or relative path, on any system, or one that exists here."""
    if text.startswith(("/", "~", "./", "../", "\\")) or (len(text) > 2 and text[1] == ":" and text[2] in "/\\"):
        return True
    try:
        return "\n" not in text and Path(text).expanduser().exists()
    except (OSError, ValueError):  # an inline template: too long or odd for a file name
        return False
