"""Tables and target checks for scripts/benchmark.py's results (docs/benchmarks.md)."""

from __future__ import annotations


def table(rows, cols) -> str:
    head = [c[0] for c in cols]
    body = [[c[1](r) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def targets(res) -> list[tuple[str, float, float, bool]]:
    out = []
    tr = {c["name"]: c for c in res.get("train", {}).get("contenders", [])}
    poft, base = tr.get("poft-mlx PoFT (cached r_ref)"), tr.get("mlx-lm lora SFT")
    if poft and base:
        out.append(("PoFT (cached) / mlx-lm lora SFT throughput", poft["tok_s"] / base["tok_s"], 1.0, True))
        out.append(("PoFT (cached) / mlx-lm lora SFT peak memory", poft["peak_gb"] / base["peak_gb"], 1.05, False))
    long = {c["name"]: c for c in res.get("long", {}).get("contenders", [])}
    if "poft-mlx PoFT (cached r_ref)" in long:
        out.append((f"PoFT training MFU at length {res['max_len']}", long["poft-mlx PoFT (cached r_ref)"]["mfu"],
                    0.50, True))
    sc = {c["name"]: c for c in res.get("score", {}).get("contenders", [])}
    if len(sc) == 2:
        a, b = sc["poft-mlx score_samples"], sc["plain forward (full logits)"]
        out.append(("scoring / plain forward throughput", a["tok_s"] / b["tok_s"], 0.90, True))
        out.append(("scoring padding share", a["padding"], 0.10, False))
    if "vocab" in res:
        rows = [r for r in res["vocab"]["rows"] if r["name"] == "poft-mlx"]
        if len(rows) >= 2:
            growth = (rows[-1]["peak_over_weights_gb"] - rows[0]["peak_over_weights_gb"]) / \
                (rows[-1]["full_logits_gb"] - rows[0]["full_logits_gb"])
            out.append((f"{res['vocab']['vocab']} vocab: peak growth / full-logits growth", growth, 0.10, False))
    if "quant" in res:
        q = {r["name"]: r for r in res["quant"]["rows"]}
        if "dequantize + matmul" in q:
            out.append(("4-bit training step / float32 speed", q["dequantize + matmul"]["train_tok_s"]
                        / q["float32"]["train_tok_s"], 0.80, True))
            out.append(("4-bit weights / float32 weights", q["dequantize + matmul"]["weights_gb"]
                        / q["float32"]["weights_gb"], 0.25, False))
    gen = {c["name"]: c for c in res.get("generate", {}).get("contenders", [])}
    if "poft-mlx generate" in gen:
        base = max((c for n, c in gen.items() if n.startswith("mlx-lm")), key=lambda c: c["tok_s"])
        out.append(("generation / mlx-lm batch_generate (its best) tok/s", gen["poft-mlx generate"]["tok_s"]
                    / base["tok_s"], 1.0, True))
    return out


def render(res) -> str:
    m = res["machine"]
    lines = [f"model {res['model']} | data {res['data']} | batch {res['batch_size']}, max length {res['max_len']}, "
             f"LoRA {res['lora_layers']} layers rank {res['rank']} | "
             f"{res['warmup']} warm-up + {res['steps']} timed steps "
             f"x {res['rounds']} rounds",
             f"machine {m['machine']}, {m['cores']} cores, mlx {m['mlx']} ({m['device']}), BLAS {m['blas']}; "
             f"1-min load average {m['load_before']:.1f} at start, {m['load_mean']:.1f} mean, "
             f"{m['load_after']:.1f} at end",
             f"float32 2048^2 matmul rate: {m['peak_gflops_min']:.0f}-{m['peak_gflops']:.0f} GFLOP/s over "
             f"{m['peak_samples']} samples; MFU = model FLOP/s over the rate sampled just before and after each run "
             "(FLOP convention: docs/benchmarks.md)", ""]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    for key, what in (("train", "training"), ("long", "training at full length (records joined into chats)")):
        if not res.get(key):
            continue
        t = res[key]
        rows = t["contenders"]
        base = next((c["tok_s"] for c in rows if c["name"] == "mlx-lm lora SFT"), None)
        lines.append(f"{what} ({t['samples']} samples, mean length {t['mean_length']:.0f}, "
                     f"{pct(t['supervised_share'])} of positions supervised)")
        lines.append(table(rows, [("contender", lambda r: r["name"]), ("tok/s", lambda r: f"{r['tok_s']:.1f}"),
                                  ("vs mlx-lm", lambda r: f"{r['tok_s'] / base:.2f}x" if base else "-"),
                                  ("peak GB", lambda r: f"{r['peak_gb']:.2f}"),
                                  ("GFLOP/s", lambda r: f"{r['gflop_s']:.1f}"), ("MFU", lambda r: pct(r["mfu"]))]))
        same = [c["same_batches"] for c in rows if "same_batches" in c]
        if same:
            lines.append(f"mlx-lm was fed the same batches in the same order: {all(same)}")
        lines.append("")
    if res.get("score"):
        s = res["score"]
        rows = s["contenders"]
        lines.append(f"scoring ({s['batches_timed']} length-quantile batches of {s['batch_size']} from {s['samples']} "
                     "samples; padding over the whole file)")
        lines.append(table(rows, [("contender", lambda r: r["name"]), ("tok/s", lambda r: f"{r['tok_s']:.1f}"),
                                  ("vs plain", lambda r: f"{r['tok_s'] / rows[1]['tok_s']:.2f}x"),
                                  ("padding", lambda r: pct(r["padding"])), ("peak GB", lambda r: f"{r['peak_gb']:.2f}"),
                                  ("GFLOP/s", lambda r: f"{r['gflop_s']:.1f}"), ("MFU", lambda r: pct(r["mfu"]))]))
        lines.append("")
    if res.get("vocab"):
        v = res["vocab"]
        lines.append(f"vocabulary {v['vocab']} (synthetic 2-block model), "
                     f"one LoRA training step at length {v['length']}")
        lines.append(table(v["rows"], [("path", lambda r: r["name"]), ("batch", lambda r: str(r["batch"])),
                                       ("peak over weights GB", lambda r: f"{r['peak_over_weights_gb']:.2f}"),
                                       ("full logits would be GB", lambda r: f"{r['full_logits_gb']:.2f}")]))
        lines.append("")
    if res.get("quant"):
        q = res["quant"]
        lines.append(f"4-bit (group 64) copy of the model, batch of {q['batch']} ({q['tokens']} tokens)")
        lines.append(table(q["rows"], [("matmul", lambda r: r["name"]), ("weights GB", lambda r: f"{r['weights_gb']:.3f}"),
                                       ("score tok/s", lambda r: f"{r['score_tok_s']:.1f}"),
                                       ("score peak GB", lambda r: f"{r['score_peak_gb']:.2f}"),
                                       ("train tok/s", lambda r: f"{r['train_tok_s']:.1f}"),
                                       ("train peak GB", lambda r: f"{r['train_peak_gb']:.2f}")]))
        lines.append("")
    if res.get("compile"):
        c = res["compile"]
        lines.append(f"compiled step (train.compile) vs eager, PoFT LoRA, batch {c['batch_size']}; "
                     "the ratio in one run is the figure, not the rates")
        lines.append(table(c["rows"], [("setting", lambda r: r["setting"]), ("timed steps", lambda r: str(r["steps"])),
                                       ("eager tok/s", lambda r: f"{r['eager_tok_s']:.1f}"),
                                       ("compiled tok/s", lambda r: f"{r['compiled_tok_s']:.1f}"),
                                       ("compiled / eager", lambda r: f"{r['speedup']:.2f}x"),
                                       ("shapes eager / compiled", lambda r: f"{r['eager_shapes']} / {r['compiled_shapes']}"),
                                       ("peak GB eager / compiled",
                                        lambda r: f"{r['eager_peak_gb']:.2f} / {r['compiled_peak_gb']:.2f}")]))
        lines.append("")
    if res.get("generate"):
        g = res["generate"]
        ref = next(c["tok_s"] for c in g["contenders"] if c["name"] == "mlx-lm batch_generate (float32)")
        lines.append(f"greedy generation: {g['prompts']} prompts (mean {g['mean_prompt_tokens']:.0f} tokens), "
                     f"batch {g['batch_size']}, at most {g['max_tokens']} new tokens")
        lines.append(table(g["contenders"], [("contender", lambda r: r["name"]),
                                             ("tok/s", lambda r: f"{r['tok_s']:.1f}"),
                                             ("vs mlx-lm float32", lambda r: f"{r['tok_s'] / ref:.2f}x"),
                                             ("tokens", lambda r: str(r["tokens"])),
                                             ("peak GB", lambda r: f"{r['peak_gb']:.2f}"),
                                             ("same tokens", lambda r: str(r["same_tokens_as_mlx_lm_float32"]))]))
        lines.append("")
    tg = res.get("targets", [])
    if tg:
        lines.append("targets")
        lines.append(table([{"n": n, "v": v, "t": t, "hi": hi} for n, v, t, hi in tg],
                           [("target", lambda r: r["n"]), ("measured", lambda r: f"{r['v']:.3f}"),
                            ("goal", lambda r: (">= " if r["hi"] else "<= ") + f"{r['t']:.2f}"),
                            ("met", lambda r: "yes" if (r["v"] >= r["t"] if r["hi"] else r["v"] <= r["t"]) else "NO")]))
    return "\n".join(lines)
