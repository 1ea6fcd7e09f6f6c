"""Render conversations with a model's own chat template and mark the supervised span.

The span is every assistant turn (or only the last), each turn's content plus the
end-of-turn token that closes it (so the model learns to stop). It is found in
characters by rendering the conversation up to each reply with a placeholder in the
reply's place (never by searching the reply's text), then mapped to tokens through
the tokenizer's offsets, so it is the same text span for every model and template.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from jinja2 import TemplateError as JinjaError

from ..errors import TemplateError
from .records import Sample

BUILTIN_TEMPLATES = ("gemma", "chatml", "zephyr")


# Stands in for a reply when locating it (Renderer.turns): private-use characters, which no
# template adds, trims or escapes.
PLACEHOLDER = "\ue000poft-mlx reply\ue001"


def resolve_template(spec: str | None) -> str | None:
    """A builtin name (gemma, chatml), a path to a .jinja file, or Jinja text itself."""
    if spec is None:
        return None
    if spec in BUILTIN_TEMPLATES:
        return resources.files("poft_mlx.data").joinpath(f"templates/{spec}.jinja").read_text()
    if "{{" in spec or "{%" in spec:
        return spec
    try:
        path = Path(spec).expanduser()
        is_file = path.is_file()
    except (OSError, ValueError, RuntimeError):  # too long or odd for a file name; ~user unknown
        is_file = False
    if is_file:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise TemplateError(f"chat_template {spec!r}: cannot read the file ({why})") from None
    raise TemplateError(
        f"chat_template {spec!r}: not a builtin ({', '.join(BUILTIN_TEMPLATES)}), "
        "not an existing file, and not Jinja text"
    )


@dataclass
class Encoded:
    tokens: np.ndarray  # int32 [L]
    mask: np.ndarray  # bool [L]: True where the token is supervised (a prediction target)

    @property
    def n_target(self) -> int:
        return int(self.mask.sum())


@dataclass
class Turn:
    """Where one supervised assistant turn's content sits in the rendered text."""

    index: int  # message index
    content_start: int  # char offset of the (stripped) content in the full text
    content_end: int
    turn_end: int  # end of the rendering of this message


class Renderer:
    """Encodes samples for one tokenizer + template; see the module docstring."""

    def __init__(self, tokenizer, *, chat_template: str | None = None, span: str = "all",
                 template_kwargs: dict | None = None, label: str = "model"):
        self.tok = getattr(tokenizer, "_tokenizer", tokenizer)  # unwrap mlx-lm's wrapper
        self.template = resolve_template(chat_template) or getattr(self.tok, "chat_template", None)
        if not self.template:
            raise TemplateError(
                f"{label}: the tokenizer has no chat template; set one with chat_template "
                f"(a builtin: {', '.join(BUILTIN_TEMPLATES)}, a .jinja file, or Jinja text)"
            )
        self.span = span
        self.kwargs = dict(template_kwargs or {})
        self.label = label
        self.special_ids = set(getattr(self.tok, "all_special_ids", []) or [])
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        self.special_ids |= {i for i, t in added.items() if getattr(t, "special", False)}

    def apply(self, messages: list[dict], generation_prompt: bool) -> str:
        # transformers renders in jinja2's ImmutableSandboxedEnvironment: a template's attempt to
        # leave it (''.__class__...) raises SecurityError, which ends here as one clear error.
        try:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=self.template, **self.kwargs,
            )
        except JinjaError as e:
            raise TemplateError(f"{self.label}: the chat template failed ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]})") from None

    def turns(self, messages: list[dict]) -> tuple[str, list[Turn]]:
        """The full rendering and the supervised assistant turns in it."""
        full = self.apply(messages, False)
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.span == "last":
            indices = indices[-1:]
        turns = []
        for i in indices:
            # The reply is located by rendering, not by searching its text: a short reply
            # ("is") also occurs in the template's own markup ("assistant"), and a template
            # may ignore add_generation_prompt. Rendering a placeholder reply in its place
            # gives the text before and after it exactly.
            through = self.apply(messages[: i + 1], False)
            probe = self.apply(messages[:i] + [{"role": "assistant", "content": PLACEHOLDER}], False)
            if probe.count(PLACEHOLDER) != 1:
                raise TemplateError(
                    f"{self.label}: the chat template renders the assistant reply of message {i} "
                    f"{probe.count(PLACEHOLDER)} times; the supervised span cannot be located"
                )
            k = probe.index(PLACEHOLDER)
            head, tail = probe[:k], probe[k + len(PLACEHOLDER):]
            if not (full.startswith(through) and through.startswith(head) and through.endswith(tail)
                    and len(head) + len(tail) <= len(through)):
                raise TemplateError(
                    f"{self.label}: the chat template does not render conversations "
                    f"prefix-consistently at message {i} (the conversation up to a reply is not "
                    "the start of the conversation with it); the supervised span cannot be located"
                )
            rendered = through[len(head):len(through) - len(tail)]
            content = messages[i]["content"].strip()
            if rendered.strip() != content:
                raise TemplateError(
                    f"{self.label}: the chat template changes the assistant content of "
                    f"message {i}; the supervised span cannot be located"
                )
            pos = len(head) + len(rendered) - len(rendered.lstrip())
            turns.append(Turn(i, pos, pos + len(content), len(through)))
        return full, turns

    def encode(self, sample: Sample) -> Encoded:
        full, turns = self.turns(sample.messages)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        offsets = enc["offset_mapping"]
        mask = np.zeros(len(ids), dtype=bool)
        truncated = sample.meta.get("truncated", False)
        for k, turn in enumerate(turns):
            t = 0
            while t < len(ids) and offsets[t][1] <= turn.content_start:
                t += 1
            while t < len(ids) and offsets[t][0] < turn.content_end:
                mask[t] = True
                t += 1
            # The end-of-turn token closes the reply: supervise the first special token
            # between the content and the end of this message's rendering, unless the
            # reply was cut by truncation (it did not end there).
            if truncated and k == len(turns) - 1:
                continue
            while t < len(ids) and offsets[t][0] < turn.turn_end:
                if int(ids[t]) in self.special_ids:
                    mask[t] = True
                    break
                t += 1
        mask[0] = False  # the first token has no context to predict it from
        return Encoded(ids, mask)

    def char_to_turn(self, sample: Sample, char: int) -> tuple[int, int] | None:
        """Map a char offset of the full rendering to (message index, content offset)."""
        _, turns = self.turns(sample.messages)
        for turn in turns:
            if turn.content_start <= char <= turn.content_end:
                lead = len(sample.messages[turn.index]["content"]) - len(
                    sample.messages[turn.index]["content"].lstrip())
                return turn.index, lead + char - turn.content_start
        return None


def fit_length(sample: Sample, renderer: Renderer, max_len: int, policy: str, *,
               earlier_replies: bool = False) -> tuple[Sample | None, Encoded | None, str]:
    """Fit a sample into `max_len` tokens of `renderer`'s encoding.

    Returns (sample, encoded, status) with status 'ok', 'truncated', 'shortened' or 'dropped'.
    Truncation cuts the text of the response tail (so every model scores the same,
    shorter, text) and the cut reply is not closed by an end-of-turn token.

    earlier_replies: when the cut falls outside any reply (in a later prompt) or leaves
    nothing of the reply it falls in, keep the conversation up to the last whole reply
    that fits ('shortened') instead of dropping it. Only with span 'all', where those
    replies are supervised; not for preference pairs, whose last reply is the point.
    """
    enc = renderer.encode(sample)
    if len(enc.tokens) <= max_len:
        return sample, enc, "ok"
    if policy == "drop":
        return None, None, "dropped"
    full = renderer.apply(sample.messages, False)
    offsets = renderer.tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = max_len
    for _ in range(8):  # re-tokenising a cut text can shift a boundary token; shrink and retry
        cut = offsets[keep - 1][1]
        where = renderer.char_to_turn(sample, cut)
        content = sample.messages[where[0]]["content"][:where[1]].rstrip() if where else ""
        if not content:  # the cut falls outside any reply (a long prompt), or at its very start
            break
        i = where[0]
        msgs = [dict(m) for m in sample.messages[:i]] + [{"role": "assistant", "content": content}]
        new = Sample(msgs, sample.source, {**sample.meta, "truncated": True})
        enc = renderer.encode(new)
        if len(enc.tokens) <= max_len and enc.n_target > 0:
            return new, enc, "truncated"
        keep -= max(1, len(enc.tokens) - max_len)
        if keep < 2:
            break
    if earlier_replies and renderer.span == "all":
        return _whole_replies(sample, renderer, max_len)
    return None, None, "dropped"


def _whole_replies(sample: Sample, renderer: Renderer, max_len: int):
    """The conversation up to its last assistant reply that fits, whole, in `max_len` tokens."""
    ends = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"][:-1]
    for i in reversed(ends):  # the last reply is the one that did not fit
        new = Sample([dict(m) for m in sample.messages[:i + 1]], sample.source, dict(sample.meta))
        enc = renderer.encode(new)
        if len(enc.tokens) <= max_len and enc.n_target > 0:
            return new, enc, "shortened"
    return None, None, "dropped"
