"""Render conversations with a model's own chat template and mark the supervised span.

The span is every assistant turn (or only the last), each turn's content plus the
end-of-turn token that closes it (so the model learns to stop). It is found in
characters by rendering the conversation with a placeholder in the reply's place (never
by searching the reply's text), then mapped to tokens through the tokenizer's offsets, so
it is the same text span for every model and template. Exactly, a reply is where the
conversation up to it, rendered with a placeholder, puts the placeholder, and its turn ends
where the rendering of the conversation through it ends (`_turns_by_prefixes`: two renders
per reply, quadratic in a chat's length). The fast paths (`Renderer._locate`) find the same
from one render per reply, or from one render of the whole chat with every reply a
placeholder (linear), each checked against the full rendering as described there.

Tool calling: a record's `tools` go to the template (apply_chat_template(tools=...)), and an
assistant turn with `tool_calls` is supervised whole, as the template writes it: everything
between where a plain reply would start and where it would end (the placeholder's
surroundings), i.e. its content and its calls, plus the end-of-turn token. A template that
drops the calls or ignores the tools is an error, not a silently wrong span.

Text records (continued pre-training) use no template: the text's tokens (with the BOS the
tokenizer adds, and EOS appended, as mlx-lm's text format does) are all supervised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
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
# The one render of a whole chat (Renderer._locate_once) gives reply n the placeholder MARK.format(n).
MARK = "\ue000poft-mlx reply {}\ue001"
_MARKS = re.compile(MARK.format(r"\d+"))


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


class Tokens:
    """One text's token ids and their char offsets, as tokenizer(text, return_offsets_mapping=True)
    gives them. From a Rust `tokenizers.Encoding` the offsets are read one token at a time, as
    asked (`span`): its `offsets` getter builds a Python tuple per token, a third of tokenizing's
    cost, where marking a span needs a few boundaries, found by bisection (`first`)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray | None = None, encoding=None):
        self.ids = ids  # int32 [L]
        self._offsets, self._encoding = offsets, encoding

    def __len__(self) -> int:
        return len(self.ids)

    def span(self, i: int) -> tuple[int, int]:
        """(start, end) chars of token i."""
        if self._offsets is not None:
            return int(self._offsets[i, 0]), int(self._offsets[i, 1])
        got = self._encoding.token_to_chars(i)  # None for a token the tokenizer added (its BOS): offsets say (0, 0)
        return got if got is not None else (0, 0)

    def first(self, side: int, char: int, lo: int = 0) -> int:
        """The first token index >= lo whose start (side 0) is >= char, or whose end (side 1) is >
        char; len(self) if none. A text's offsets never decrease (a tokenizer adds no special
        tokens of its own to a rendered conversation; tests/test_batched.py checks real data
        against a linear scan), so the answer is the one index where the test turns true: read
        from the Rust encoding's char_to_token where it can be, else found by bisection."""
        hi = len(self.ids)
        if self._encoding is not None:
            # The Rust encoding names the token holding `char` in one call (a scan in Rust); the
            # answer is that token or the next, accepted where its neighbour shows it is the first.
            t = self._encoding.char_to_token(char)
            if t is not None:
                if side == 0 and self.span(t)[0] < char:
                    t += 1
                if t >= lo and (t == lo or not self._hit(side, char, t - 1)) and (t == hi or self._hit(side, char, t)):
                    return t
        return self._bisect(side, char, lo)

    def _bisect(self, side: int, char: int, lo: int = 0) -> int:
        """first() by bisection over span(), for any Tokens."""
        hi = len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._hit(side, char, mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _hit(self, side: int, char: int, i: int) -> bool:
        edge = self.span(i)[side]
        return edge >= char if side == 0 else edge > char


@dataclass
class Turn:
    """Where one supervised assistant turn's content sits in the rendered text."""

    index: int  # message index
    content_start: int  # char offset of the (stripped) content in the full text
    content_end: int
    turn_end: int  # end of the rendering of this message
    calls: bool = False  # a turn with tool_calls: its span is the template's rendering of the calls


def _reply_at(full: str, pos: int, content: str, after: str) -> str | None:
    """The reply as the template wrote it at `pos` of `full` with `after` next: as given, else stripped."""
    for rendered in (content, content.strip()):
        if full.startswith(rendered, pos) and full.startswith(after, pos + len(rendered)):
            return rendered
    return None


def _turn(i: int, pos: int, rendered: str, tail: str) -> Turn:
    """Message i's turn, its reply written as `rendered` at `pos` and closed by `tail`."""
    start = pos + len(rendered) - len(rendered.lstrip())
    return Turn(i, start, start + len(rendered.strip()), pos + len(rendered) + len(tail))


class Renderer:
    """Encodes samples for one tokenizer + template; see the module docstring."""

    def __init__(self, tokenizer, *, chat_template: str | None = None, span: str = "all",
                 template_kwargs: dict | None = None, label: str = "model", require_template: bool = True):
        """require_template=False: a tokenizer without a chat template is an error only when a
        conversation is rendered (text records need none)."""
        self.tok = getattr(tokenizer, "_tokenizer", tokenizer)  # unwrap mlx-lm's wrapper
        self.template = resolve_template(chat_template) or getattr(self.tok, "chat_template", None)
        self.label = label
        if not self.template and require_template:
            raise TemplateError(self._no_template())
        self.span = span
        self.kwargs = dict(template_kwargs or {})
        self.special_ids = set(getattr(self.tok, "all_special_ids", []) or [])
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        self.special_ids |= {i for i, t in added.items() if getattr(t, "special", False)}
        # span_mask's "is this token special": a lookup table over the ids (Gemma's tokenizer has
        # ~6,000 special tokens, where np.isin sorting them per record cost more than tokenizing)
        self._special_lut = np.zeros(max(self.special_ids, default=-1) + 1, dtype=bool)
        self._special_lut[list(self.special_ids)] = True
        self._direct = self._direct_template()
        # conversation shapes (_locate) located by one render and by one probe per reply: same turns?
        self._shapes: dict[tuple, bool] = {}

    def _no_template(self) -> str:
        return (f"{self.label}: the tokenizer has no chat template; set one with chat_template "
                f"(a builtin: {', '.join(BUILTIN_TEMPLATES)}, a .jinja file, or Jinja text)")

    def apply(self, messages: list[dict], generation_prompt: bool, tools: list | None = None) -> str:
        if not self.template:
            raise TemplateError(self._no_template())
        extra = {"tools": tools} if tools else {}
        # transformers renders in jinja2's ImmutableSandboxedEnvironment: a template's attempt to
        # leave it (''.__class__...) raises SecurityError, which ends here as one clear error.
        try:
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=self.template, **extra, **self.kwargs,
            )
        except JinjaError as e:
            raise TemplateError(f"{self.label}: the chat template failed ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]})") from None

    def _direct_template(self):
        """(transformers' compiled template, the variables apply_chat_template renders it with), or None.

        apply_chat_template spends about two thirds of a render outside Jinja: it copies and
        normalises the messages and every variable (drops None-valued keys, rebuilds them as plain
        JSON types, aliases reasoning fields), none of which changes a record that read_jsonl has
        checked. `_locate` renders its probes through this directly; every probe it uses is
        checked against the full conversation as apply_chat_template rendered it, so a
        transformers version that renders the probe differently costs speed (the per-prefix path),
        not a wrong span. None (that path only) where transformers lacks the pieces."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = self.tok.get_chat_template(self.template) if isinstance(self.template, str) else None
            variables = {**self.tok.special_tokens_map, **self.kwargs}
            return (_compile_jinja_template(template), variables) if template else None
        except Exception:  # noqa: BLE001  (an older or newer transformers, another tokenizer class)
            return None

    def turns(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[Turn]]:
        """The full rendering and the supervised assistant turns in it."""
        full = self.apply(messages, False, tools)
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.span == "last":
            indices = indices[-1:]
        located = self._locate(full, messages, indices, tools)
        return full, located if located is not None else self._turns_by_prefixes(full, messages, indices, tools)

    def _locate(self, full: str, messages: list[dict], indices: list[int], tools: list | None) -> list[Turn] | None:
        """The turns from the direct renders (`_direct_template`), or None where they cannot vouch for
        them (the caller then takes _turns_by_prefixes, which also raises a template's errors).

        A conversation of several replies is located from one render with every reply a placeholder
        (`_locate_once`, linear in its length) where its shape (roles, which replies, tools or not)
        has been located that way and by one probe per reply (`_locate_each`, quadratic) to the same
        turns: the first conversation of each shape is checked so, and a shape that differs once
        takes the per-reply path from then on."""
        if self._direct is None or any(messages[i].get("tool_calls") for i in indices):
            return None
        if len(indices) < 2:
            return self._locate_each(full, messages, indices, tools)
        shape = (tuple(m["role"] for m in messages), tuple(indices), bool(tools))
        trusted = self._shapes.get(shape)
        if trusted is False:
            return self._locate_each(full, messages, indices, tools)
        once = self._locate_once(full, messages, indices, tools)
        if trusted and once is not None:
            return once
        each = self._locate_each(full, messages, indices, tools)
        if once is not None:  # (a record the one render declines says nothing of its shape)
            self._shapes[shape] = once == each
        return each

    def _probe(self, messages: list[dict], tools: list | None) -> str | None:
        """The direct rendering of `messages` as apply passes them (None where the template raises:
        the per-prefix path raises it as apply_chat_template does)."""
        template, variables = self._direct
        try:
            return template.render(messages=messages, tools=tools or None, documents=None,
                                   add_generation_prompt=False, **variables)
        except Exception:  # noqa: BLE001
            return None

    def _locate_each(self, full: str, messages: list[dict], indices: list[int], tools: list | None) -> list[Turn] | None:
        """The turns from one probe rendering per reply (the conversation before it, and a placeholder
        reply).

        _turns_by_prefixes also renders the conversation through each reply, to learn where that
        reply's rendering ends. Here that rendering is inferred, head + reply + tail (the probe's
        text before and after the placeholder, the reply as given or stripped, as a template may
        trim it), and accepted only where the full rendering starts with exactly that text: what
        the prefix-consistency check of _turns_by_prefixes requires of the real one."""
        turns = []
        for i in indices:
            probe = self._probe(messages[:i] + [{"role": "assistant", "content": PLACEHOLDER}], tools)
            if probe is None:
                return None
            k = probe.find(PLACEHOLDER)
            if k < 0 or probe.find(PLACEHOLDER, k + 1) >= 0 or not full.startswith(probe[:k]):
                return None
            tail = probe[k + len(PLACEHOLDER):]
            rendered = _reply_at(full, k, messages[i]["content"], tail)
            if rendered is None:
                return None
            turns.append(_turn(i, k, rendered, tail))
        return turns

    def _locate_once(self, full: str, messages: list[dict], indices: list[int], tools: list | None) -> list[Turn] | None:
        """The turns from one rendering of the conversation with each reply a placeholder of its own.

        Accepted only where the full rendering is exactly that text with each placeholder replaced
        by its reply (as given or stripped), the conversation ends with the last reply, and the text
        after each earlier reply starts with the text the template writes after the last one (its
        closing, `tail`): that closing is taken to be where each reply's rendering ends, i.e. a
        reply's closing does not depend on where it stands, which _locate checks once per shape."""
        if indices[-1] != len(messages) - 1:
            return None
        marks = [MARK.format(n) for n in range(len(indices))]
        probe_msgs = list(messages)
        for i, mark in zip(indices, marks):
            probe_msgs[i] = {"role": "assistant", "content": mark}
        probe = self._probe(probe_msgs, tools)
        if probe is None:
            return None
        found = list(_MARKS.finditer(probe))  # one scan: each placeholder exactly once, in order, and no other
        if [m.group() for m in found] != marks:
            return None
        cuts = [m.start() for m in found]
        segments = [probe[:cuts[0]]] + [probe[k + len(m):nxt] for k, m, nxt in zip(cuts, marks, cuts[1:] + [len(probe)])]
        tail = segments[-1]
        turns, pos = [], 0
        for n, i in enumerate(indices):
            if not full.startswith(segments[n], pos):
                return None
            pos += len(segments[n])
            after = segments[n + 1]
            if n + 1 < len(indices) and not after.startswith(tail):
                return None
            rendered = _reply_at(full, pos, messages[i]["content"], after)
            if rendered is None:
                return None
            turns.append(_turn(i, pos, rendered, tail))
            pos += len(rendered)
        return turns if pos + len(tail) == len(full) else None

    def _turns_by_prefixes(self, full: str, messages: list[dict], indices: list[int],
                           tools: list | None) -> list[Turn]:
        """Each reply located from apply_chat_template's rendering of the conversation through it and
        of a placeholder in its place; every template inconsistency is an error naming the message."""
        turns = []
        for i in indices:
            # The reply is located by rendering, not by searching its text: a short reply
            # ("is") also occurs in the template's own markup ("assistant"), and a template
            # may ignore add_generation_prompt. Rendering a placeholder reply in its place
            # gives the text before and after it exactly.
            # the last message's prefix is the whole conversation: rendered once, above
            through = full if i == len(messages) - 1 else self.apply(messages[: i + 1], False, tools)
            probe = self.apply(messages[:i] + [{"role": "assistant", "content": PLACEHOLDER}], False, tools)
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
            if messages[i].get("tool_calls"):
                turns.append(self._call_turn(messages[i], i, rendered, len(head), len(through)))
                continue
            content = messages[i]["content"].strip()
            if rendered.strip() != content:
                raise TemplateError(
                    f"{self.label}: the chat template changes the assistant content of "
                    f"message {i}; the supervised span cannot be located"
                )
            pos = len(head) + len(rendered) - len(rendered.lstrip())
            turns.append(Turn(i, pos, pos + len(content), len(through)))
        return turns

    def _call_turn(self, message: dict, i: int, rendered: str, start: int, end: int) -> Turn:
        """A turn with tool calls: `rendered` (at `start`) is the template's writing of it."""
        names = [c["function"]["name"] for c in message["tool_calls"]]
        missing = [n for n in names if n not in rendered]
        content = message["content"].strip()
        if missing or (content and content not in rendered):
            raise TemplateError(
                f"{self.label}: the chat template does not render the tool calls of message {i} "
                f"({', '.join(missing) or 'its content'} missing from the turn); use a model or "
                "chat_template that supports tool calling"
            )
        lead = len(rendered) - len(rendered.lstrip())
        return Turn(i, start + lead, start + len(rendered.rstrip()), end, calls=True)

    def encode(self, sample: Sample) -> Encoded:
        if sample.text is not None:
            return self._encode_text(sample)
        full, turns = self.render(sample)
        tokens = self.tokenize([full], add_special_tokens=False)[0]
        return Encoded(tokens.ids, self.span_mask(tokens, turns, sample.meta.get("truncated", False)))

    def render(self, sample: Sample) -> tuple[str, list[Turn]]:
        """A conversation's full rendering and its supervised turns (errors as encode raises them)."""
        if sample.tools and self.apply(sample.messages, False, sample.tools) == self.apply(sample.messages, False):
            raise TemplateError(f"{self.label}: the chat template ignores `tools` ({sample.source} has "
                                f"{len(sample.tools)}); use a model or chat_template that supports tool calling")
        return self.turns(sample.messages, sample.tools)

    def tokenize(self, texts: list[str], *, add_special_tokens: bool) -> list[Tokens]:
        """Each text's tokens, as tokenizer(text, return_offsets_mapping=True) gives them; one
        encode_batch call of the Rust tokenizer (its threads, without the GIL) where the tokenizer
        is a plain fast one, else text by text."""
        backend = self._backend()
        if backend is not None:
            encs = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            return [Tokens(np.asarray(e.ids, np.int32), encoding=e) for e in encs]
        out = []
        for text in texts:
            enc = self.tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            out.append(Tokens(np.asarray(enc["input_ids"], np.int32),
                              np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)))
        return out

    def _backend(self):
        """The `tokenizers` object that tokenizer(...) would call with these very settings, or None.

        transformers' fast tokenizer calls backend.encode_batch after switching truncation and
        padding off and setting encode_special_tokens to its split_special_tokens: calling it
        directly is the same only when those already hold (checked on every call, since a
        caller may change them)."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            return None
        if backend.truncation is not None or backend.padding is not None:
            return None
        if backend.encode_special_tokens != bool(getattr(self.tok, "split_special_tokens", False)):
            return None
        return backend

    def span_mask(self, tokens: Tokens, turns: list[Turn], truncated: bool) -> np.ndarray:
        """bool [L]: each turn's content tokens (those overlapping [content_start, content_end)) and
        the first special token after them within the turn's rendering (its end-of-turn token),
        except after the last turn of a reply cut by truncation (it did not end there)."""
        ids = tokens.ids
        n = len(ids)
        mask = np.zeros(n, dtype=bool)
        if n == 0:
            return mask
        lut = self._special_lut
        special = lut[np.minimum(ids, len(lut) - 1)] & (ids < len(lut)) if len(lut) else np.zeros(n, dtype=bool)
        for k, turn in enumerate(turns):
            t = tokens.first(1, turn.content_start)
            u = tokens.first(0, turn.content_end, t)
            mask[t:u] = True
            if truncated and k == len(turns) - 1:
                continue
            v = tokens.first(0, turn.turn_end, u)
            hit = np.flatnonzero(special[u:v])
            if len(hit):
                mask[u + int(hit[0])] = True
        mask[0] = False  # the first token has no context to predict it from
        return mask

    def _encode_text(self, sample: Sample, ids: list[int] | None = None) -> Encoded:
        """ids: the text's tokens (with the BOS the tokenizer adds, if any) when already known."""
        if ids is None:
            ids = self.tokenize([sample.text], add_special_tokens=True)[0].ids.tolist()
        eos = getattr(self.tok, "eos_token_id", None)
        # EOS closes a whole document (mlx-lm's text format); a cut one did not end there.
        if eos is not None and not sample.meta.get("truncated") and (not ids or ids[-1] != eos):
            ids.append(eos)
        mask = np.ones(len(ids), dtype=bool)
        mask[0] = False
        return Encoded(np.asarray(ids, dtype=np.int32), mask)

    def char_to_turn(self, sample: Sample, char: int, turns: list[Turn] | None = None) -> tuple[int, int] | None:
        """Map a char offset of the full rendering to (message index, content offset); None
        outside any reply and inside a turn with tool calls (a call is never cut). turns: the
        sample's (Renderer.turns), when already known."""
        if turns is None:
            _, turns = self.turns(sample.messages, sample.tools)
        for turn in turns:
            if turn.calls:
                continue
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
    return fit_overlong(sample, renderer, max_len, policy, earlier_replies=earlier_replies)


def fit_overlong(sample: Sample, renderer: Renderer, max_len: int, policy: str, *, earlier_replies: bool = False,
                 tokens: Tokens | None = None, turns: list[Turn] | None = None) -> tuple[Sample | None, Encoded | None, str]:
    """fit_length's answer for a sample whose encoding is longer than max_len. tokens (its
    Renderer.tokenize) and turns (a conversation's Renderer.turns): when already known."""
    if policy == "drop":
        return None, None, "dropped"
    if sample.text is not None:
        return _cut_text(sample, renderer, max_len, tokens)
    if tokens is None:
        full = renderer.apply(sample.messages, False, sample.tools)
        tokens = renderer.tokenize([full], add_special_tokens=False)[0]

    def cut_reply(keep: int) -> Sample | None:
        where = renderer.char_to_turn(sample, tokens.span(keep - 1)[1], turns)
        content = sample.messages[where[0]]["content"][:where[1]].rstrip() if where else ""
        if not content:  # the cut falls outside any reply (a long prompt), or at its very start
            return None
        msgs = [dict(m) for m in sample.messages[:where[0]]] + [{"role": "assistant", "content": content}]
        return replace(sample, messages=msgs, meta={**sample.meta, "truncated": True})

    fitted = _shrink_to_fit(cut_reply, renderer, max_len)
    if fitted:
        return (*fitted, "truncated")
    if earlier_replies and renderer.span == "all":
        return _whole_replies(sample, renderer, max_len)
    return None, None, "dropped"


def _cut_text(sample: Sample, renderer: Renderer, max_len: int, tokens: Tokens | None = None):
    """A text record cut at a token boundary to fit `max_len` tokens (no EOS: it did not end)."""
    if tokens is None:
        tokens = renderer.tokenize([sample.text], add_special_tokens=True)[0]

    def cut_text(keep: int) -> Sample | None:
        text = sample.text[:tokens.span(min(keep, len(tokens)) - 1)[1]]
        return replace(sample, text=text, meta={**sample.meta, "truncated": True}) if text.strip() else None

    fitted = _shrink_to_fit(cut_text, renderer, max_len)
    return (*fitted, "truncated") if fitted else (None, None, "dropped")


def _shrink_to_fit(cut, renderer: Renderer, max_len: int) -> tuple[Sample, Encoded] | None:
    """The sample cut(keep) for the first `keep` tokens (from max_len down) whose encoding fits
    max_len with a supervised token; None when cut gives up (returns None) or nothing fits.
    Re-tokenising a cut text can shift a boundary token: shrink by the excess and retry."""
    keep = max_len
    for _ in range(8):
        new = cut(keep)
        if new is None:
            return None
        enc = renderer.encode(new)
        if len(enc.tokens) <= max_len and enc.n_target > 0:
            return new, enc
        keep -= max(1, len(enc.tokens) - max_len)
        if keep < 2:
            return None
    return None


def _whole_replies(sample: Sample, renderer: Renderer, max_len: int):
    """The conversation up to its last assistant reply that fits, whole, in `max_len` tokens."""
    ends = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"][:-1]
    for i in reversed(ends):  # the last reply is the one that did not fit
        new = replace(sample, messages=[dict(m) for m in sample.messages[:i + 1]], meta=dict(sample.meta))
        enc = renderer.encode(new)
        if len(enc.tokens) <= max_len and enc.n_target > 0:
            return new, enc, "shortened"
    return None, None, "dropped"
