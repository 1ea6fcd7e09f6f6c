"""The run folder: its layout, owned here and nowhere else, and the one reader of metrics.jsonl.

    RUN/config.yaml              the resolved configuration (what `--resume` and every command reads)
    RUN/data_fingerprint.txt     sha256 of the training data (data/sources.fingerprint: a JSONL file's own)
    RUN/data_report.json         what fitting the data to max_seq_length did to it
    RUN/adapters/                latest adapters, mlx-lm layout (mlx_lm.generate --adapter-path)
    RUN/best/                    best adapters by validation loss
    RUN/checkpoints/step-N/      adapters + optimizer + trainer state (for --resume)
    RUN/checkpoints/latest       the name of the newest complete checkpoint
    RUN/metrics.jsonl            every logged metric, one JSON object per line
    RUN/report/                  `poft-mlx report --run RUN`'s default output folder
    RUN/curves.png               `poft-mlx plot RUN`'s default image
    RUN/trackers/                train.report_to's local files (tensorboard/, wandb/, wandb-run-id)
    RUN/.poft-lock               held while a process works on the run (runtime/runlock.py)

metrics.jsonl: the training loop appends {"split": "train", "step": N, "loss", "ce", ...}
every train.steps_per_report steps and {"split": "val", "step": N, ...} at every evaluation.
An objective that lacks a quantity logs it as NaN or +-Infinity (SFT without aligned models:
tau, win rate) or null (a non-finite gradient norm); a run killed mid-write leaves a
truncated last line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_FILE = "state.json"  # a checkpoint's trainer state, written last: its presence marks it complete
LOCK_FILE = ".poft-lock"  # hidden: `push` of a run folder leaves it out


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder; nothing is created by building one."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    config = property(lambda self: self.root / "config.yaml")
    fingerprint = property(lambda self: self.root / "data_fingerprint.txt")
    data_report = property(lambda self: self.root / "data_report.json")
    adapters = property(lambda self: self.root / "adapters")
    best = property(lambda self: self.root / "best")
    checkpoints = property(lambda self: self.root / "checkpoints")
    latest_pointer = property(lambda self: self.root / "checkpoints" / "latest")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    lock = property(lambda self: self.root / LOCK_FILE)
    report = property(lambda self: self.root / "report")
    curves = property(lambda self: self.root / "curves.png")
    trackers = property(lambda self: self.root / "trackers")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def is_run(self) -> bool:
        """A (finished or running) training run: a config and adapters."""
        return self.config.is_file() and (self.adapters / ADAPTER_CONFIG).is_file()

    def read_config(self) -> dict[str, Any]:
        """The run's resolved config as a mapping, or {} when absent or unreadable."""
        try:
            data = yaml.safe_load(self.config.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def adapter_config(self) -> dict[str, Any]:
        """adapters/adapter_config.json, or {} when absent or unreadable."""
        try:
            data = json.loads((self.adapters / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def read_metrics(self) -> list[dict[str, str | float]]:
        return read_metrics(self.metrics)

    def last_metrics(self) -> dict[str, dict[str, float]]:
        return last_by_split(self.read_metrics())


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def read_metrics(run: str | Path) -> list[dict[str, str | float]]:
    """The records of RUN/metrics.jsonl (or of the file `run`), in the order written.

    Each keeps its "split" and its finite numbers ("step" among them); NaN, infinities, nulls,
    booleans and text are left out, and so are unreadable lines and records without a split. A
    record whose tau is NaN also loses its win rate: logged against NaN aligned scores (SFT
    without aligned models), it is a meaningless 0. A missing file gives [].
    """
    path = Path(run)
    path = RunDir(path).metrics if path.is_dir() else path
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("split"), str):
            continue
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if "tau_mean" in record and "tau_mean" not in numbers:  # no aligned scores: a win rate against NaN
            numbers.pop("win_rate", None)
        records.append({"split": record["split"], **numbers})
    return records


def last_by_split(records: list[dict[str, str | float]]) -> dict[str, dict[str, float]]:
    """The last record of each split, without its "split" key."""
    return {r["split"]: {k: v for k, v in r.items() if k != "split"} for r in records}
