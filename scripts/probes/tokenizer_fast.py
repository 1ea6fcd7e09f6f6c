"""encode_batch against encode_batch_fast (no offsets), and offsets rebuilt from per-token byte lengths, per PyPI tokenizer.

1. Speed: 3,000 scale-section records rendered, tokenized 256 a call both ways, 3 rounds alternating.
2. Exactness of rebuilt offsets: on the 660 chats sharegpt_chats(limit=2000) gives, each token's byte length read
   from the vocabulary (a ByteLevel token: one char a byte; a byte-fallback token <0xNN>: 1; else its text with the
   space mark as a space; an added token: its content), summed against the text's UTF-8 length, and every span
   boundary (the first token at each turn's content start, content end and turn end, as span_mask asks) found from
   the rebuilt byte offsets against the tokenizer's own offsets.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for benchmark.scale_records

import poft_mlx  # noqa: F401
from benchmark import scale_records
from mlx_lm.utils import load_tokenizer
from poft_mlx.data.records import Sample
from poft_mlx.data.render import Renderer
from poft_mlx.data.sharegpt import sharegpt_chats
from poft_mlx.models.modeling import resolve


def byte_lengths(backend) -> np.ndarray:
    j = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, np.int64)
    added = {t["content"] for t in j["added_tokens"]}
    bytelevel = j["decoder"]["type"] == "ByteLevel"
    for t, i in vocab.items():
        if t in added:
            table[i] = len(t.encode())
        elif bytelevel:
            table[i] = len(t)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            table[i] = 1
        else:
            table[i] = len(t.replace("\u2581", " ").encode())
    return table


def first(edges, side, at):
    hit = np.flatnonzero(edges >= at if side == 0 else edges > at)
    return int(hit[0]) if len(hit) else len(edges)


scale = [Sample(r["messages"], f"x:{k}") for k, r in enumerate(scale_records(3000, 6000))]
chats = [Sample(c["messages"], f"c:{k}") for k, c in enumerate(sharegpt_chats(limit=2000))]
for alias, template in (("smollm2-135m-instruct", None), ("qwen2.5-coder-0.5b-instruct", None), ("gemma-3-270m", "gemma")):
    r = Renderer(load_tokenizer(resolve(f"pypi:{alias}")), chat_template=template)
    backend = r.tok.backend_tokenizer
    texts = [r.render(s)[0] for s in scale]
    slow, fast = [], []
    for _ in range(3):
        for out, fn in ((slow, backend.encode_batch), (fast, backend.encode_batch_fast)):
            t0 = time.perf_counter()
            for k in range(0, len(texts), 256):
                fn(texts[k:k + 256], add_special_tokens=False)
            out.append(len(texts) / (time.perf_counter() - t0))
    print(f"{alias}: encode_batch {' '.join(f'{x:.0f}' for x in slow)}, encode_batch_fast "
          f"{' '.join(f'{x:.0f}' for x in fast)} records/s: {sum(fast) / sum(slow):.2f}x", flush=True)

    table = byte_lengths(backend)
    rendered = [r.render(s) for s in chats]
    encs = backend.encode_batch([f for f, _ in rendered], add_special_tokens=False)
    sums_off = boundaries = wrong = 0
    for (text, turns), e in zip(rendered, encs):
        ids = np.asarray(e.ids)
        ends = np.cumsum(table[ids])
        starts = ends - table[ids]
        if ends[-1] != len(text.encode()):
            sums_off += 1
            continue
        offsets = np.asarray(e.offsets).reshape(-1, 2)
        for turn in turns:
            for side, char in ((1, turn.content_start), (0, turn.content_end), (0, turn.turn_end)):
                at = len(text[:char].encode())
                boundaries += 1
                wrong += first(offsets[:, side], side, char) != first(starts if side == 0 else ends, side, at)
    print(f"{alias}: {len(chats)} chats, byte totals off {sums_off}, span boundaries {boundaries}, wrong {wrong}",
          flush=True)
