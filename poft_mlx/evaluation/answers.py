"""Did fine-tuning help? Generate replies to held-out prompts and compare models side by side.

For each held-out record the prompt is the conversation up to its last assistant turn and
the reference is that turn. Every model (the base target and each run) answers every
prompt; per sample we measure:

- `correct`: the extracted answer equals the reference's (GSM8K's `#### N` final number built
  in, or a user regex applied to both), where the data has checkable answers;
- `aligned_lp`: the aligned models' token-mean log-likelihood of the generated reply (their
  weighted mean, as r_ref: "would the aligned models have said this"), scored with each
  aligned model's own template and cached like training scores;
- `reply_tokens`: the reply's length in the target's tokens, and whether it stopped by itself.

Differences between two models are paired (same prompts): the paired bootstrap gives a 95 %
interval of the mean difference, so a gain can be told from noise on a few hundred samples.
The likelihood metrics of `poft-mlx eval` (CE, perplexity, tau, win rate) sit in the same
table. Outputs: eval.json (everything, per sample too), eval.md (the tables) and eval.html
(the answers side by side, for a person to read).
"""

from __future__ import annotations

import gc
import html
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..data.builtin import final_number
from ..data.records import Sample
from ..data.sources import describe, load_records
from ..errors import ConfigError, DataError
from ..models.generation import generate, open_generator
from ..scoring.references import reference_scores, score_all
from .likelihood import run_eval

N_RESAMPLES = 10_000
METRICS = ("correct", "aligned_lp", "reply_tokens", "stopped")


# ------------------------------------------------------------------ answers


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's graded answer: the number after '####', else the last number; normalised
    ("1,000" -> "1000", "$18.00" -> "18", "5.50" -> "5.5")."""
    n = final_number(text)
    if n is None:
        return None
    try:
        value = float(n)
    except ValueError:
        return n
    return str(int(value)) if value == int(value) else repr(value).rstrip("0").rstrip(".")


# GSM8K's final answer: '#### 18', '#### $1,000.50' ...
GSM8K_ANSWER = re.compile(r"####[^\S\n]*\$?-?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer_end(text: str) -> int | None:
    """Where a GSM8K-style reply has given its answer: the end of the number after its first
    '####', once the text shows the number is complete (a character that cannot continue it
    follows: not a digit, nor a ',' or '.' before a digit), or None while it has not.
    Generation stops there, as lm-evaluation-harness's gsm8k tasks stop at their next-question
    marker: the graded answer is that number, and what a small model loops on after it
    ('#### 30 balloons per pack #### 30 ...') is noise."""
    m = GSM8K_ANSWER.search(text)
    if m is None:
        return None
    rest = text[m.end():m.end() + 2]
    if not rest or (rest[0] == "." and (len(rest) < 2 or rest[1].isdigit())):
        return None  # the number may still go on
    return m.start() + len(m.group(0).rstrip(","))


def regex_answer(pattern: str) -> Callable[[str], str | None]:
    """An extractor from a regex: the last match's first group (or the whole match), stripped."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--answer-regex {pattern!r}: not a valid regular expression: {e}") from None

    def extract(text: str) -> str | None:
        found = list(rx.finditer(text))
        if not found:
            return None
        m = found[-1]
        return (m.group(1) if rx.groups else m.group(0)).strip()

    return extract


def extractor(answer: str) -> Callable[[str], str | None] | None:
    """'gsm8k', 'none', or 're:PATTERN'."""
    if answer == "none":
        return None
    if answer == "gsm8k":
        return gsm8k_answer
    if answer.startswith("re:"):
        return regex_answer(answer[3:])
    raise ConfigError(f"answer extractor {answer!r}: use gsm8k, none or re:PATTERN")


# ------------------------------------------------------------------ statistics


def bootstrap_diff(a, b, *, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of b - a over paired samples and its percentile bootstrap interval.

    Pairs where either side is NaN are left out. Returns {diff, lo, hi, n}; lo/hi NaN when
    fewer than 2 pairs remain.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    d = (b - a)[keep]
    n = len(d)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    if n < 2:
        return {"diff": float(d.mean()), "lo": float("nan"), "hi": float("nan"), "n": n}
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):  # bounded memory for large n
        k = min(1000, n_resamples - start)
        means[start:start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": n}


def bootstrap_mean(x, **kw) -> dict:
    """Mean of x with its bootstrap interval (the difference from 0)."""
    x = np.asarray(x, np.float64)
    r = bootstrap_diff(np.zeros_like(x), x, **kw)
    return {"mean": r["diff"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]}


# ------------------------------------------------------------------ the evaluation


@dataclass
class Prompt:
    messages: list[dict]  # up to and including the last user turn
    reference: str
    source: str


def prompts_of(samples: list[Sample]) -> list[Prompt]:
    out = []
    for s in samples:
        if s.text is not None:
            raise DataError(f"{s.source}: a text record has no prompt to answer; generation needs "
                            "chat or prompt/completion records")
        last = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
        out.append(Prompt([dict(m) for m in s.messages[:last]], s.messages[last]["content"], s.source))
    return out


def aligned_scores(cfg, prompts: list[Prompt], replies: list[str], log=print) -> np.ndarray:
    """The aligned models' weighted token-mean log-likelihood of each reply (NaN for empty ones)."""
    keep = [i for i, r in enumerate(replies) if r.strip()]
    out = np.full(len(replies), np.nan)
    if not keep or not cfg.aligned:
        return out
    samples = [Sample(prompts[i].messages + [{"role": "assistant", "content": replies[i]}],
                      f"{prompts[i].source} (generated)") for i in keep]
    scfg = replace(cfg, data=replace(cfg.data, span="last"))  # only the generated reply is scored
    handles = score_all(scfg, samples, log=log)
    r, _ = reference_scores(handles, samples)
    out[keep] = r
    return out


def generate_for(gen, prompts: list[Prompt], extract, *, max_tokens: int, batch_size: int,
                 temperature: float, seed: int, answer_end=None) -> dict:
    replies = generate(gen, [p.messages for p in prompts], max_tokens=max_tokens, batch_size=batch_size,
                       temperature=temperature, seed=seed, answer_end=answer_end)
    per = {"reply": [r.text for r in replies],
           "reply_tokens": [float(len(r.tokens)) for r in replies],
           "stopped": [float(r.finish == "stop") for r in replies]}
    if extract is not None:
        per["answer"] = [extract(r.text) for r in replies]
        per["correct"] = [float(a is not None and a == extract(p.reference)) for a, p in zip(per["answer"], prompts)]
    return per


def summarize(models: dict[str, dict], likelihood: dict[str, dict], seed: int = 0) -> dict:
    """Per-model means with intervals and every pairwise difference (later model minus earlier)."""
    names = list(models)
    table = {}
    for name in names:
        row = dict(likelihood.get(name, {}))
        for m in METRICS:
            if m in models[name]:
                row[m] = bootstrap_mean(models[name][m], seed=seed)
        table[name] = row
    diffs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diffs[f"{b} - {a}"] = {m: bootstrap_diff(models[a][m], models[b][m], seed=seed)
                                   for m in METRICS if m in models[a] and m in models[b]}
    return {"models": table, "differences": diffs}


def run_generation_eval(configs: dict, data, out_dir: str | Path, *, answer: str = "auto",
                        max_tokens: int = 256, batch_size: int = 8, temperature: float = 0.0, seed: int = 0,
                        limit: int | None = None, stop_at_answer: bool = True, log=print) -> dict:
    """Generate with every model in `configs` ({name: (Config, adapter_path or None)}) and compare.

    Writes eval.json, eval.md and eval.html to out_dir; returns the summary (see summarize).
    data: any data source (data/sources.py); None: the first config's data.test.
    stop_at_answer: with answer="gsm8k", a reply ends once it has given its final answer ('#### N') (gsm8k_answer_end).
    """
    first = next(iter(configs.values()))[0]
    data = data or first.data.test
    if not data:
        raise ConfigError("no held-out data: give --data or set data.test")
    records = load_records(data, first.data, seed=first.train.seed, key="data.test").records
    records = records[:limit] if limit else records
    prompts = prompts_of(records)
    if answer == "auto":
        answer = "gsm8k" if prompts and all("####" in p.reference for p in prompts) else "none"
    extract = extractor(answer)
    answer_end = gsm8k_answer_end if stop_at_answer and answer == "gsm8k" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_model, likelihood = {}, {}
    for name, (cfg, adapters) in configs.items():
        log(f"eval: {name}: generating {len(prompts)} replies (max {max_tokens} tokens)")
        gen = open_generator(name, cfg=cfg, adapter_path=adapters)
        per_model[name] = generate_for(gen, prompts, extract, max_tokens=max_tokens, batch_size=batch_size,
                                       temperature=temperature, seed=seed, answer_end=answer_end)
        per_model[name]["chat_template"] = gen.source["chat_template"]
        likelihood[name] = run_eval(cfg, data, adapters, loaded=gen.loaded)
        del gen
        gc.collect()
        mx.clear_cache()
    first_cfg = next(iter(configs.values()))[0]
    # Every model's replies in one pass: each aligned model loads once, not once per model.
    log(f"eval: aligned models score the {len(prompts)} generated replies of {', '.join(per_model)}")
    scores = aligned_scores(first_cfg, prompts * len(per_model), [r for m in per_model.values() for r in m["reply"]],
                            log=log)
    for k, name in enumerate(per_model):
        per_model[name]["aligned_lp"] = scores[k * len(prompts):(k + 1) * len(prompts)].tolist()
    summary = summarize(per_model, likelihood, seed=seed)
    summary["settings"] = {"data": describe(data), "samples": len(prompts), "answer": answer, "max_tokens": max_tokens,
                           "stop_at_answer": answer_end is not None, "temperature": temperature, "seed": seed,
                           "aligned": [a.model for a in first_cfg.aligned]}
    result = {**summary, "samples": [
        {"source": p.source, "prompt": p.messages, "reference": p.reference,
         "reference_answer": extract(p.reference) if extract else None,
         **{name: {k: v[i] for k, v in m.items() if isinstance(v, list)} for name, m in per_model.items()}}
        for i, p in enumerate(prompts)]}
    (out / "eval.json").write_text(json.dumps(jsonable(result), indent=1))
    (out / "eval.md").write_text(markdown(summary))
    (out / "eval.html").write_text(html_page(summary, result["samples"], list(per_model)))
    return result


def jsonable(x):
    """x with NaN and infinities as None (JSON has neither)."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return jsonable(x.item())
    return x


# ------------------------------------------------------------------ reports

_LABELS = {"correct": "accuracy", "aligned_lp": "aligned log-lik", "reply_tokens": "reply tokens",
           "stopped": "stopped"}
_LIKELIHOOD = (("ce", "CE"), ("ppl", "ppl"), ("tau_mean", "tau"), ("win_rate", "win rate"))


def _ci(r: dict, key: str = "mean") -> str:
    v = r.get(key, r.get("diff"))
    if v is None or not np.isfinite(v):
        return "-"
    if not np.isfinite(r["lo"]):
        return f"{v:.3f}"
    return f"{v:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def markdown(summary: dict) -> str:
    models = summary["models"]
    gen_cols = [m for m in METRICS if any(m in r for r in models.values())]
    lik_cols = [(k, t) for k, t in _LIKELIHOOD if any(isinstance(r.get(k), float) for r in models.values())]
    head = ["model"] + [_LABELS[m] for m in gen_cols] + [t for _, t in lik_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in models.items():
        cells = [_ci(r[m]) if m in r else "-" for m in gen_cols]
        cells += [f"{r[k]:.4f}" if isinstance(r.get(k), float) else "-" for k, _ in lik_cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "Per model: mean [95 % bootstrap interval] over the held-out prompts.\n\n" + "\n".join(lines)
    if summary["differences"]:
        lines = ["| difference | " + " | ".join(_LABELS[m] for m in gen_cols) + " |", "|" + "---|" * (len(gen_cols) + 1)]
        for pair, d in summary["differences"].items():
            lines.append(f"| {pair} | " + " | ".join(_ci(d[m]) if m in d else "-" for m in gen_cols) + " |")
        text += ("\n\nPaired differences (same prompts): mean [95 % paired bootstrap interval]; an interval that "
                 "excludes 0 is a difference this sample can detect.\n\n" + "\n".join(lines))
    return text + "\n"


def html_page(summary: dict, samples: list[dict], names: list[str]) -> str:
    """A self-contained page: the tables, then each prompt with the reference and every model's reply."""
    esc = html.escape
    table = _md_table_html(markdown(summary))
    cards = []
    for i, s in enumerate(samples):
        prompt = "".join(f"<div class='msg'><b>{esc(m['role'])}</b><pre>{esc(m['content'])}</pre></div>"
                         for m in s["prompt"])
        cols = [f"<div class='reply ref'><h4>reference</h4><pre>{esc(s['reference'])}</pre>"
                + (f"<p class='ans'>answer: {esc(str(s['reference_answer']))}</p>" if s.get("reference_answer") else "")
                + "</div>"]
        for name in names:
            r = s[name]
            mark = ""
            if "correct" in r:
                ok = r["correct"] == 1.0
                mark = (f"<p class='ans {'ok' if ok else 'bad'}'>{'correct' if ok else 'wrong'}: "
                        f"{esc(str(r.get('answer')))}</p>")
            lp = r.get("aligned_lp")
            meta = f"{int(r['reply_tokens'])} tokens" + ("" if r.get("stopped") else ", cut at max_tokens")
            meta += f", aligned log-lik {lp:.3f}" if isinstance(lp, float) and np.isfinite(lp) else ""
            cols.append(f"<div class='reply'><h4>{esc(name)}</h4><pre>{esc(r['reply'])}</pre>{mark}"
                        f"<p class='meta'>{esc(meta)}</p></div>")
        cards.append(f"<section><h3>{i + 1}. {esc(s['source'])}</h3>{prompt}<div class='row'>{''.join(cols)}</div>"
                     "</section>")
    st = summary.get("settings", {})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>poft-mlx eval</title><style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:110em}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}
section{{border-top:2px solid #ddd;padding:.5em 0}}.row{{display:flex;gap:.8em;align-items:stretch}}
.reply{{flex:1;min-width:0;background:#fafafa;border:1px solid #e3e3e3;border-radius:6px;padding:.4em .7em}}
.ref{{background:#eef5ff}}pre{{white-space:pre-wrap;word-wrap:break-word;font-size:.9em;margin:.3em 0}}
.msg pre{{background:#fff8e6;padding:.3em}}.ok{{color:#176b1c;font-weight:600}}.bad{{color:#a31515;font-weight:600}}
.meta{{color:#666;font-size:.85em}}h4{{margin:.2em 0}}
</style></head><body><h1>poft-mlx eval: {esc(str(st.get('data', '')))}</h1>
<p>{esc(str(st.get('samples', '')))} prompts; answers: {esc(str(st.get('answer', '')))}; decoding: temperature
{esc(str(st.get('temperature', '')))}, max {esc(str(st.get('max_tokens', '')))} tokens; aligned models:
{esc(', '.join(st.get('aligned', [])) or 'none')}</p>{table}{''.join(cards)}</body></html>
"""


def _md_table_html(md: str) -> str:
    """The Markdown tables and paragraphs of `markdown()` as HTML."""
    out, rows = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)
