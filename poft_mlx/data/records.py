"""Data sets: JSONL records checked at the boundary, every problem reported at once.

Accepted records (one JSON object per line):
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
- prompt/completion: ``{"prompt": str, "completion": str, "system": str (optional)}``
- preference (objective ``dpo``): ``{"prompt": str|messages, "chosen": str, "rejected": str}``

Other keys are kept as metadata (e.g. ``noise`` marks from scripts/inject_noise.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based line in the file
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


@dataclass
class Sample:
    """One supervised conversation; `messages` ends with an assistant turn."""

    messages: list[dict]
    source: str = ""  # "file:line"
    meta: dict = field(default_factory=dict)

    @property
    def uid(self) -> str:
        """Content address: the same conversation has the same id in every file."""
        blob = json.dumps([self.messages, bool(self.meta.get("truncated"))], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Pair:
    """A preference record for DPO: one prompt, a chosen and a rejected reply."""

    chosen: Sample
    rejected: Sample
    source: str = ""
    meta: dict = field(default_factory=dict)


def _invalid_unicode(s: str) -> bool:
    """A lone surrogate (JSON allows the escape "\\ud800") cannot be encoded, hashed or tokenised."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


SURROGATE = "holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode"


def _check_messages(msgs: Any, where: tuple[str, int], fld: str, out: list[Problem]) -> list[dict] | None:
    file, line = where
    if not isinstance(msgs, list) or not msgs:
        out.append(Problem(file, line, fld, "must be a non-empty list of {role, content} objects"))
        return None
    ok = True
    for i, m in enumerate(msgs):
        f = f"{fld}[{i}]"
        if not isinstance(m, dict):
            out.append(Problem(file, line, f, "must be an object with 'role' and 'content'"))
            ok = False
            continue
        role = m.get("role")
        if role not in ROLES:
            out.append(Problem(file, line, f"{f}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"))
            ok = False
        content = m.get("content")
        if not isinstance(content, str):
            out.append(Problem(file, line, f"{f}.content", "missing or not a string"))
            ok = False
        elif role == "assistant" and not content.strip():
            out.append(Problem(file, line, f"{f}.content", "empty assistant content"))
            ok = False
        elif _invalid_unicode(content):
            out.append(Problem(file, line, f"{f}.content", SURROGATE))
            ok = False
        if role == "system" and i != 0:
            out.append(Problem(file, line, f"{f}.role", "a system message may only come first"))
            ok = False
    if ok and not any(m["role"] == "assistant" for m in msgs):
        out.append(Problem(file, line, fld, "no assistant turn: nothing to supervise"))
        ok = False
    if ok and msgs[-1]["role"] != "assistant":
        out.append(Problem(file, line, f"{fld}[{len(msgs) - 1}].role", "the conversation must end with an assistant turn"))
        ok = False
    return [{"role": m["role"], "content": m["content"]} for m in msgs] if ok else None


def _text_field(rec: dict, key: str, where: tuple[str, int], out: list[Problem], *, nonempty: bool) -> str | None:
    v = rec.get(key)
    if not isinstance(v, str):
        out.append(Problem(*where, key, "missing or not a string"))
        return None
    if nonempty and not v.strip():
        out.append(Problem(*where, key, "empty"))
        return None
    if _invalid_unicode(v):
        out.append(Problem(*where, key, SURROGATE))
        return None
    return v


def _prompt_messages(rec: dict, where: tuple[str, int], out: list[Problem]) -> list[dict] | None:
    prompt = rec.get("prompt")
    if isinstance(prompt, list):  # a chat prefix
        msgs = _check_messages(prompt + [{"role": "assistant", "content": "x"}], where, "prompt", out)
        return msgs[:-1] if msgs else None
    p = _text_field(rec, "prompt", where, out, nonempty=True)
    system = rec.get("system")
    if system is not None and (not isinstance(system, str) or _invalid_unicode(system)):
        out.append(Problem(*where, "system", "must be a string" if not isinstance(system, str) else SURROGATE))
        return None
    if p is None:
        return None
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]


def parse_record(rec: Any, where: tuple[str, int], out: list[Problem], *, preference: bool = False):
    """Turn one decoded JSON value into a Sample (or Pair), appending problems to `out`."""
    file, line = where
    if not isinstance(rec, dict):
        out.append(Problem(file, line, "<record>", f"must be a JSON object, got {type(rec).__name__}"))
        return None
    src = f"{file}:{line}"
    if preference:
        prompt = _prompt_messages(rec, where, out)
        chosen = _text_field(rec, "chosen", where, out, nonempty=True)
        rejected = _text_field(rec, "rejected", where, out, nonempty=True)
        if prompt is None or chosen is None or rejected is None:
            return None
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "system", "chosen", "rejected")}
        mk = lambda reply: Sample(prompt + [{"role": "assistant", "content": reply}], src, meta)  # noqa: E731
        return Pair(mk(chosen), mk(rejected), src, meta)
    if "messages" in rec:
        msgs = _check_messages(rec["messages"], where, "messages", out)
        meta = {k: v for k, v in rec.items() if k != "messages"}
    elif "prompt" in rec or "completion" in rec:
        prompt = _prompt_messages(rec, where, out)
        completion = _text_field(rec, "completion", where, out, nonempty=True)
        msgs = prompt + [{"role": "assistant", "content": completion}] if prompt and completion else None
        meta = {k: v for k, v in rec.items() if k not in ("prompt", "completion", "system")}
    else:
        keys = ", ".join(sorted(map(str, rec))) or "none"
        out.append(Problem(file, line, "<record>", f"needs 'messages' or 'prompt'/'completion' (found keys: {keys})"))
        return None
    return Sample(msgs, src, meta) if msgs else None


def read_jsonl(path: str | Path, *, preference: bool = False) -> list:
    """Read and check a JSONL file; raise DataError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError([Problem(str(path), 0, "<file>", "no such file")])
    try:
        blobs = path.read_bytes().split(b"\n")
    except OSError as e:  # unreadable: permissions, an I/O error
        raise DataError([Problem(str(path), 0, "<file>", f"cannot be read ({e.strerror or e})")]) from None
    problems: list[Problem] = []
    items = []
    # Decoded line by line (lines end at \n only, as JSONL says), so that a bad byte is
    # reported on its own line along with every other problem.
    for i, blob in enumerate(blobs, 1):
        try:
            raw = blob.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(str(path), i, "<utf-8>", f"not UTF-8 text (byte {e.start + 1}: {e.reason})"))
            continue
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), i, "<json>", f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        except (ValueError, RecursionError) as e:  # nested thousands deep, a 5000-digit integer
            problems.append(Problem(str(path), i, "<json>", f"invalid JSON: {str(e) or type(e).__name__}"[:200]))
            continue
        item = parse_record(rec, (str(path), i), problems, preference=preference)
        if item is not None:
            items.append(item)
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError([Problem(str(path), 0, "<file>", "no records")])
    return items


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
