"""fit_length for many samples at once: the same answers, record for record, at a fraction of the cost.

Per record, render.fit_length renders the conversation, tokenizes it alone through transformers
and walks its tokens in Python. Here the renderings of a chunk of records are tokenized by one
encode_batch call of the Rust tokenizer (its own threads, without the GIL, while this thread
renders the next chunk), the span is marked with numpy (Renderer.span_mask), and an overlong
record reuses its tokens' offsets and turns where fit_length would compute them again. Only what
fit_length does for a record that does not fit (cut, re-render, re-tokenize) stays per record.

The results, and the error a bad record raises, are fit_length's: a record's error is raised
when its turn comes, after every earlier record was fitted, as fit_length in a loop raises it
(tests/test_batched.py checks every record of real data sets, token for token, against the
per-record code as it was before this module).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .records import Sample
from .render import Encoded, Renderer, fit_overlong

CHUNK = 256  # records tokenized per encode_batch call: big enough to keep its threads busy


def fit_many(samples, renderer: Renderer, max_len: int, policy: str, *, earlier_replies: bool = False,
             chunk: int = CHUNK) -> Iterator[tuple[Sample | None, Encoded | None, str]]:
    """fit_length(s, renderer, max_len, policy, earlier_replies=...) for each of `samples`, in order."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            rendered = [_render(renderer, s) for s in part]
            job = pool.submit(_tokenize, renderer, part, rendered)
            if pending is not None:
                yield from _finish(renderer, *pending[:2], pending[2].result(), max_len, policy, earlier_replies)
            pending = (part, rendered, job)
        if pending is not None:
            yield from _finish(renderer, *pending[:2], pending[2].result(), max_len, policy, earlier_replies)


def _render(renderer: Renderer, sample: Sample):
    """(full text, turns) of a conversation, None for a text record, or the exception it raised."""
    if sample.text is not None:
        return None
    try:
        return renderer.render(sample)
    except Exception as e:  # raised in its record's turn (_finish), as fit_length would
        return e


def _tokenize(renderer: Renderer, part: list, rendered: list) -> list:
    """Renderer.tokenize per record (None where rendering failed)."""
    texts = [s.text for s in part if s.text is not None]
    convs = [r[0] for r in rendered if isinstance(r, tuple)]
    text_encs = iter(renderer.tokenize(texts, add_special_tokens=True) if texts else [])
    conv_encs = iter(renderer.tokenize(convs, add_special_tokens=False) if convs else [])
    return [next(text_encs) if s.text is not None else next(conv_encs) if isinstance(r, tuple) else None
            for s, r in zip(part, rendered)]


def _finish(renderer, part, rendered, tokens, max_len, policy, earlier_replies):
    for sample, r, tok in zip(part, rendered, tokens):
        if isinstance(r, Exception):
            raise r
        if sample.text is not None:
            enc = renderer._encode_text(sample, tok.ids.tolist())
            turns = None
        else:
            turns = r[1]
            enc = Encoded(tok.ids, renderer.span_mask(tok, turns, sample.meta.get("truncated", False)))
        if len(enc.tokens) <= max_len:
            yield sample, enc, "ok"
        else:
            yield fit_overlong(sample, renderer, max_len, policy, earlier_replies=earlier_replies,
                               tokens=tok, turns=turns)
