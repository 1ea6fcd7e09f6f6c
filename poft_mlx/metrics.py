"""A run's metrics.jsonl, read back: the one reader behind the model card and `poft-mlx plot`.

The trainer (trainer._train) appends one JSON record per line: {"split": "train", "step": N,
"loss", "ce", "ppl", "tau_mean", "win_rate", "lr", ...} every train.steps_per_report steps and
{"split": "val", "step": N, ...} at every evaluation. An objective that lacks a quantity logs it
as NaN or +-Infinity (SFT without aligned models: tau, win rate) or null (a non-finite gradient
norm), and a run killed mid-write leaves a truncated last line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run: str | Path) -> list[dict[str, str | float]]:
    """The records of RUN/metrics.jsonl (or of the file `run`), in the order written.

    Each keeps its "split" and its finite numbers ("step" among them); NaN, infinities, nulls,
    booleans and text are left out, and so are unreadable lines and records without a split. A
    record whose tau is NaN also loses its win rate: logged against NaN aligned scores (SFT
    without aligned models), it is a meaningless 0. A missing file gives [].
    """
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
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
