"""`poft-mlx quickstart`: PoFT vs SFT on GSM8K, offline, in a few minutes on a CPU.

Runs the steps of configs/quickstart.yaml: make the data, score it with the aligned
model, train the same target with PoFT and with SFT, and compare them on held-out data.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import Config, load_config

QUICKSTART_CONFIG = Path(__file__).parent / "quickstart.yaml"
SIZES = {"train": 32, "valid": 8, "test": 16}


def _fresh(out: Path) -> Path:
    """`out`, or `out-2`, `out-3`... so an earlier quickstart is never overwritten."""
    cand, n = out, 1
    while cand.exists():
        n += 1
        cand = out.with_name(f"{out.name}-{n}")
    return cand


def run_quickstart(out: str | Path = "runs/quickstart", overrides: list[str] = (), sizes: dict | None = None) -> dict:
    from .datasets import split_gsm8k
    from .pipeline import run_eval, run_score, run_train

    t0 = time.perf_counter()
    out = _fresh(Path(out))
    say = lambda m: print(f"[quickstart {time.perf_counter() - t0:5.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    sizes = dict(sizes or SIZES)
    say(f"1/5 data: GSM8K {sizes} -> {out / 'data'}")
    paths = split_gsm8k(out / "data", sizes)
    cfg: Config = load_config([QUICKSTART_CONFIG], [f"data.train={paths['train']}", f"data.valid={paths['valid']}",
                                                     *overrides])
    say(f"2/5 score the data with {', '.join(a.model for a in cfg.aligned)} (converted from GGUF on first use)")
    run_score(cfg)
    runs = {}
    for step, objective in ((3, "poft"), (4, "sft")):
        say(f"{step}/5 train {cfg.model} with {objective.upper()}")
        runs[objective] = run_train(replace(cfg, objective=objective, run_dir=str(out / objective)))
    say(f"5/5 evaluate base, PoFT and SFT on {sizes['test']} held-out samples")
    rows = {"base": run_eval(cfg, str(paths["test"]), None)}
    for name, run in runs.items():
        rows[name] = run_eval(cfg, str(paths["test"]), str(run / "adapters"))
    say("done")
    return {"out": out, "rows": rows, "runs": runs, "seconds": time.perf_counter() - t0}
