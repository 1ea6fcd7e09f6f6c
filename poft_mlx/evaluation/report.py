"""What the aligned models think of a data set, and what PoFT made of it.

On a scored data set (`poft-mlx score` first; nothing is scored here):
- the distribution of each aligned model's score r_j and of r_ref (the paper's Fig. 2):
  summary numbers and a histogram;
- the samples least likely under the references (the ones PoFT weighs least at the start);
- where samples marked noisy (scripts/inject_noise.py's "noise" field) land: mean r_ref of
  each kind against clean samples, their share of the bottom quantiles, and the AUROC of
  r_ref as a clean-vs-noisy detector (0.5 = no signal);
- with a run, the per-sample PoFT weights tau = sigmoid(-(beta (r_theta - r_ref) + gamma))
  under its adapters, clean vs noisy;
- `keep_top`: the data set filtered by preference score (the paper keeps the top 40 %).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlx_lm.utils import load_tokenizer

from ..config import Config
from ..data import sources
from ..data.prepare import prepare, target_renderer
from ..data.records import to_record, write_jsonl
from ..errors import ConfigError, InputMissing, MissingExtra, MissingScores
from ..models.modeling import resolve
from ..rundir import ADAPTER_FILE, RunDir
from ..scoring.references import open_aligned, reference_scores

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BOTTOM = (0.1, 0.2, 0.3)
CLEAN = "clean"


@dataclass
class Scored:
    path: object  # the data source (data/sources.py)
    samples: list
    encodings: list  # with the target's template, for r_theta
    r_ref: np.ndarray  # [N]
    per_model: dict  # aligned model -> r_j [N]
    dropped: list  # sources of records dropped by data.overlength = drop

    @property
    def noise(self) -> list[str]:
        return [str(s.meta.get("noise") or CLEAN) for s in self.samples]


def load_scored(cfg: Config, data) -> Scored:
    """Fit the records as training does and read their cached aligned scores (no scoring)."""
    if not cfg.model:
        raise ConfigError("no target model: set `model` (the report fits records with its template, as training does)")
    if not cfg.aligned:
        raise ConfigError("no aligned models (config key `aligned`): there are no scores to report")
    prep = prepare(data, target_renderer(load_tokenizer(resolve(cfg.model)), cfg), cfg)
    handles = [open_aligned(cfg, a) for a in cfg.aligned]
    try:
        r_ref, per_model = reference_scores(handles, prep.samples)
    except MissingScores as e:
        raise MissingScores(str(e).replace("training needs", "the report needs", 1)) from None
    return Scored(data, prep.samples, prep.encodings, r_ref, per_model, prep.report["dropped_records"])


def summarize(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    out = {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min())}
    out.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))})
    out["max"] = float(x.max())
    return out


def auroc(low_is_positive: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive < score of a random negative), ties count half."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    # Mann-Whitney: with average ranks for ties, U = #(pos > neg) + #ties / 2.
    _, inverse, counts = np.unique(low_is_positive, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(1.0 - u / (n_pos * n_neg))


def noise_breakdown(values: np.ndarray, labels: list[str], *, lower_is_noisier: bool = True) -> dict | None:
    """Per noise kind: count and mean; share of the bottom quantiles that is noisy (and the
    share of noisy samples caught there); AUROC. None when no sample is marked."""
    labels = np.asarray(labels)
    noisy = labels != CLEAN
    if not noisy.any():
        return None
    out = {"kinds": {k: {"n": int((labels == k).sum()), "mean": float(values[labels == k].mean())}
                     for k in sorted(set(labels))}}
    out["kinds"]["noisy"] = {"n": int(noisy.sum()), "mean": float(values[noisy].mean())}
    order = np.argsort(values if lower_is_noisier else -values, kind="stable")
    out["noisy_rate"] = float(noisy.mean())
    out["bottom"] = {}
    for q in BOTTOM:
        k = max(1, int(np.ceil(q * len(values))))
        hit = noisy[order[:k]]
        out["bottom"][f"{round(q * 100)}%"] = {"n": k, "noisy_share": float(hit.mean()),
                                               "noisy_caught": float(hit.sum() / noisy.sum())}
    out["auroc"] = auroc(values if lower_is_noisier else -values, noisy)
    return out


def _preview(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def least_likely(scored: Scored, n: int) -> list[dict]:
    rows = []
    for i in np.argsort(scored.r_ref, kind="stable")[:n]:
        s = scored.samples[i]
        prompt = next((m["content"] for m in reversed(s.messages) if m["role"] == "user"), "")
        rows.append({"source": s.source, "r_ref": float(scored.r_ref[i]),
                     "scores": {k: float(v[i]) for k, v in scored.per_model.items()},
                     "noise": s.meta.get("noise"), "prompt": _preview(prompt),
                     "response": _preview(s.text if s.text is not None else s.messages[-1]["content"])})
    return rows


def run_weights(cfg: Config, scored: Scored, run_dir: str | Path, *, batch_size: int = 8) -> dict:
    """r_theta under the run's adapters and tau = sigmoid(-(beta (r_theta - r_ref) + gamma)) [N]."""
    from ..models.adapters import load_policy
    from ..models.modeling import sequence_logprobs
    from ..training.batches import EncodedData

    adapters = RunDir(run_dir).adapters
    if not (adapters / ADAPTER_FILE).is_file():
        raise InputMissing(f"{run_dir}: no adapters/{ADAPTER_FILE} (is it a finished run folder?)")
    loaded = load_policy(cfg, str(adapters))
    ds = EncodedData(scored.samples, scored.encodings, scored.r_ref.astype(np.float32))
    r_theta = np.full(len(ds), np.nan)
    for batch, lp, n in sequence_logprobs(loaded.model, (ds.batch(g) for g in ds.batches(batch_size))):
        r_theta[batch.index] = np.array(lp, np.float64) / np.maximum(np.array(n, np.float64), 1.0)
    z = cfg.beta * (r_theta - scored.r_ref) + cfg.gamma
    return {"r_theta": r_theta, "tau": 1.0 / (1.0 + np.exp(z))}


def keep_top(scored: Scored, fraction: float, out: str | Path, cfg: Config | None = None) -> dict:
    """Write the records of the top `fraction` of samples by r_ref in data order: a JSONL file's
    lines verbatim; any other source's records as JSONL (records.to_record, read with cfg.data)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--keep-top must be in (0, 1], got {fraction}")
    n = len(scored.samples)
    k = max(1, round(fraction * n))
    top = np.argsort(-scored.r_ref, kind="stable")[:k]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = sources.single_jsonl(scored.path)
    if jsonl is not None:
        keep = {int(scored.samples[i].source.rsplit(":", 1)[1]) for i in top}
        lines = jsonl.read_text(encoding="utf-8").splitlines()
        with open(out, "w", encoding="utf-8") as fh:
            fh.writelines(ln + "\n" for no, ln in enumerate(lines, 1) if no in keep)
    else:  # the records as read (not as fitted to max_seq_length), each once
        keep = {scored.samples[i].source for i in top}
        data = cfg.data if cfg else None
        read = sources.load_records(scored.path, data, seed=cfg.train.seed if cfg else 0).records
        originals = {s.source: s for s in reversed(read)}
        write_jsonl((to_record(originals[src]) for src in dict.fromkeys(s.source for s in read) if src in keep), out)
    return {"out": str(out), "kept": k, "of": n, "fraction": fraction,
            "min_r_ref_kept": float(scored.r_ref[top].min()), "dropped_overlength": len(scored.dropped)}


# ---------------------------------------------------------------------------- plots


def _plt():
    try:  # lazy: an optional extra
        import matplotlib
    except ImportError:
        raise MissingExtra("the report's plots need matplotlib: pip install 'poft-mlx[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(scored: Scored, path: Path, title: str) -> Path:
    """Left: each aligned model's r_j and r_ref; right (when marked): r_ref clean vs noisy."""
    plt = _plt()
    labels = scored.noise
    kinds = sorted(set(labels) - {CLEAN})
    fig, axes = plt.subplots(1, 2 if kinds else 1, figsize=(11 if kinds else 6.5, 4), squeeze=False)
    allv = np.concatenate([scored.r_ref, *scored.per_model.values()])
    bins = np.linspace(allv.min(), allv.max(), 41)
    ax = axes[0, 0]
    for name, r in scored.per_model.items():
        ax.hist(r, bins=bins, histtype="step", linewidth=1.2, label=f"{Path(name).name} (mean {r.mean():.2f})")
    ax.hist(scored.r_ref, bins=bins, alpha=0.35, color="k", label=f"r_ref (mean {scored.r_ref.mean():.2f})")
    ax.set(xlabel="token-mean log-likelihood of the response", ylabel="samples", title=title)
    ax.legend(fontsize=8)
    if kinds:
        ax = axes[0, 1]
        lab = np.asarray(labels)
        for k in [CLEAN, *kinds]:
            ax.hist(scored.r_ref[lab == k], bins=bins, alpha=0.5, label=f"{k} ({(lab == k).sum()})")
        ax.set(xlabel="r_ref", ylabel="samples", title="r_ref: clean vs injected noise")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights(scored: Scored, weights: dict, path: Path, title: str) -> Path:
    """Left: tau per sample (clean vs noisy); right: r_theta against r_ref."""
    plt = _plt()
    lab = np.asarray(scored.noise)
    groups = [CLEAN, *sorted(set(lab) - {CLEAN})]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, 1, 41)
    for k in groups:
        axes[0].hist(weights["tau"][lab == k], bins=bins, alpha=0.5, label=f"{k} ({(lab == k).sum()})")
        axes[1].scatter(scored.r_ref[lab == k], weights["r_theta"][lab == k], s=8, alpha=0.6, label=k)
    axes[0].set(xlabel="tau = sigmoid(beta (r_ref - r_theta))", ylabel="samples", title=title)
    axes[0].legend(fontsize=8)
    both = np.concatenate([scored.r_ref, weights["r_theta"]])
    lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
    axes[1].plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
    axes[1].set(xlabel="r_ref", ylabel="r_theta (run)", title="above the diagonal: target beats the references")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the command


def run_report(cfg: Config, data: str | None = None, out_dir: str | Path = "poft-report", *, least: int = 10,
               run_dir: str | Path | None = None, keep: float | None = None, keep_out: str | Path | None = None) -> dict:
    """Everything above for `data` (default data.train); writes PNGs and report.json to out_dir."""
    data = data or cfg.data.train
    if not data:
        raise ConfigError("no data set: give --data FILE or set data.train")
    if keep is not None and not keep_out:
        raise ConfigError("--keep-top needs --out FILE for the filtered data set")
    scored = load_scored(cfg, data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"data": sources.describe(data), "samples": len(scored.samples), "dropped_overlength": scored.dropped,
              "scores": {"r_ref": summarize(scored.r_ref), **{k: summarize(v) for k, v in scored.per_model.items()}},
              "least_likely": least_likely(scored, least),
              "noise": noise_breakdown(scored.r_ref, scored.noise)}
    title = Path(data).name if isinstance(data, str) and not data.startswith("hf:") else sources.describe(data)
    files = {"scores_png": str(plot_scores(scored, out_dir / "scores.png", title))}
    if run_dir is not None:
        w = run_weights(cfg, scored, run_dir, batch_size=cfg.score.batch_size)
        result["run"] = {"run_dir": str(run_dir), "beta": cfg.beta, "gamma": cfg.gamma,
                         "tau": summarize(w["tau"]), "r_theta": summarize(w["r_theta"]),
                         "win_rate": float((w["r_theta"] > scored.r_ref).mean()),
                         "tau_noise": noise_breakdown(w["tau"], scored.noise)}
        files["tau_png"] = str(plot_weights(scored, w, out_dir / "tau.png", f"PoFT weights, {Path(run_dir).name}"))
        np.savez(out_dir / "weights.npz", r_ref=scored.r_ref, r_theta=w["r_theta"], tau=w["tau"],
                 source=np.array([s.source for s in scored.samples]))
    if keep is not None:
        result["keep_top"] = keep_top(scored, keep, keep_out, cfg)
    result["files"] = {**files, "json": str(out_dir / "report.json")}
    (out_dir / "report.json").write_text(json.dumps(result, indent=1))
    return result


def format_report(r: dict) -> str:
    lines = [f"{r['data']}: {r['samples']} scored samples"
             + (f" ({len(r['dropped_overlength'])} records dropped as overlength)" if r["dropped_overlength"] else "")]
    cols = ["mean", "std", "min", "q05", "q25", "q50", "q75", "q95", "max"]
    width = max(len(Path(k).name) for k in r["scores"]) + 2
    lines.append("score".ljust(width) + "".join(c.rjust(9) for c in cols))
    for name, s in r["scores"].items():
        lines.append(Path(name).name.ljust(width) + "".join(f"{s[c]:9.3f}" for c in cols))
    lines.append(f"\n{len(r['least_likely'])} least likely samples under the references:")
    for row in r["least_likely"]:
        mark = f" [{row['noise']}]" if row["noise"] else ""
        lines.append(f"  {row['r_ref']:8.3f}  {row['source']}{mark}\n            Q: {row['prompt']}\n"
                     f"            A: {row['response']}")
    for title, nb in (("r_ref", r["noise"]), ("tau", (r.get("run") or {}).get("tau_noise"))):
        if nb:
            lines.append(f"\nnoise marks, by {title}: " + ", ".join(
                f"{k} n={v['n']} mean {v['mean']:.3f}" for k, v in nb["kinds"].items()))
            lines.append(f"  noisy rate {nb['noisy_rate']:.2f}; AUROC (lower {title} = noisy) {nb['auroc']:.3f}; "
                         + "; ".join(f"bottom {q}: {b['noisy_share']:.2f} noisy, {b['noisy_caught']:.2f} of noisy"
                                     for q, b in nb["bottom"].items()))
    if "run" in r:
        t = r["run"]
        lines.append(f"\nrun {t['run_dir']}: tau mean {t['tau']['mean']:.3f} (q05 {t['tau']['q05']:.3f}, "
                     f"q95 {t['tau']['q95']:.3f}); r_theta mean {t['r_theta']['mean']:.3f}; "
                     f"target beats r_ref on {t['win_rate']:.0%}")
    if "keep_top" in r:
        k = r["keep_top"]
        lines.append(f"\nkept the top {k['fraction']:.0%} by r_ref: {k['kept']} of {k['of']} records "
                     f"(r_ref >= {k['min_r_ref_kept']:.3f}) -> {k['out']}")
    lines.append("\nwrote " + ", ".join(r["files"].values()))
    return "\n".join(lines)
