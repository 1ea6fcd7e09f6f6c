"""fit_many and Renderer.render, records/s, on the scale section's ShareGPT records, the three PyPI tokenizers:
side by side in one process, alternating, two rounds, Renderer as it is (a chat of several replies located from
one render once its shape is checked) against the same Renderer with `_locate_once` switched off (one probe per
reply: the code before 8df8a81). Each pass gets a fresh Renderer, so each pays its shape checks.

    python scripts/probes/fit_many_ab.py [N]      # N records, default 5000
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for benchmark.scale_records

import poft_mlx  # noqa: F401
from benchmark import scale_records
from mlx_lm.utils import load_tokenizer
from poft_mlx.data.batched import fit_many
from poft_mlx.data.records import Sample
from poft_mlx.data.render import Renderer
from poft_mlx.models.modeling import resolve

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
samples = [Sample(r["messages"], f"x:{k}") for k, r in enumerate(scale_records(n, 6000))]
for alias, template in (("smollm2-135m-instruct", None), ("qwen2.5-coder-0.5b-instruct", None), ("gemma-3-270m", "gemma")):
    tok = load_tokenizer(resolve(f"pypi:{alias}"))
    rates = {}
    for rnd in range(2):
        for mode in ("per reply", "one render"):
            for what in ("render", "fit_many"):
                r = Renderer(tok, chat_template=template)
                if mode == "per reply":
                    r._locate_once = lambda *a: None
                t0 = time.perf_counter()
                if what == "render":
                    for s in samples:
                        r.render(s)
                else:
                    for _ in fit_many(samples, r, 2048, "truncate", earlier_replies=True):
                        pass
                rate = n / (time.perf_counter() - t0)
                rates.setdefault((mode, what), []).append(rate)
                print(f"{alias} round {rnd} {mode:10s} {what:8s}: {rate:8.0f} records/s", flush=True)
    for what in ("render", "fit_many"):
        a, b = rates[("per reply", what)], rates[("one render", what)]
        print(f"{alias} {what}: one render / per reply = {sum(b) / sum(a):.2f}x "
              f"({' '.join(f'{x:.0f}' for x in b)} vs {' '.join(f'{x:.0f}' for x in a)})", flush=True)
