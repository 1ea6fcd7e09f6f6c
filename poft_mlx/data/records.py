"""Data records: checked at the boundary, every problem reported at once with file, record, field.

Accepted records (a JSONL line, or a row of a Parquet / Arrow / Hugging Face table):
- chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...],
  "tools": [function schema, ...] (optional)}``; an assistant turn may carry ``tool_calls``
  (``[{"type": "function", "function": {"name": str, "arguments": object}}]``, content then
  optional), a tool turn answers them (``content``, optional ``tool_call_id`` / ``name``)
- prompt/completion: ``{"prompt": str, "completion": str, "system": str (optional)}``
- text: ``{"text": str}`` (continued pre-training: no template, the whole text is supervised)
- preference (objective ``dpo``): ``{"prompt": str|messages, "chosen": str, "rejected": str}``

A record is the first of chat, prompt/completion, text whose field it holds (not null).
`names` maps these field names to a data set's own columns (data.messages_field, ...), and every
problem names the column as the data set spells it. Other keys are kept as metadata (e.g.
``noise`` marks from scripts/inject_noise.py).

Null-valued keys are dropped from records, messages, tool calls (arguments included) and tool
schemas: Arrow (Parquet, `datasets`) gives every row every key any row has, null where it had
none, so a record read from a table is the same record, with the same uid, as from JSONL. A tool
call's arguments given as a string holding a JSON object are that object (templates write
``arguments | tojson``; a string would be quoted twice); tools given as a JSON string likewise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# The record fields a data set may name differently (data.<name>_field).
FIELDS = ("messages", "prompt", "completion", "system", "text", "chosen", "rejected", "tools")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based line of a JSONL file; 0-based row of a table
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


@dataclass
class Sample:
    """One supervised record: a conversation whose `messages` end with an assistant turn (with
    the `tools` its template is given), or a plain `text` (then `messages` is empty)."""

    messages: list[dict]
    source: str = ""  # "file:line", "file:row" or "hf:ID[:CONFIG]:SPLIT:INDEX"
    meta: dict = field(default_factory=dict)
    tools: list | None = None
    text: str | None = None

    @property
    def uid(self) -> str:
        """Content address: the same record has the same id in every file and format."""
        truncated = bool(self.meta.get("truncated"))
        if self.text is not None:
            payload = [{"text": self.text}, truncated]
        else:  # a conversation without tools hashes as it did before tools existed
            payload = [self.messages, truncated] + ([self.tools] if self.tools else [])
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False)
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


def drop_nulls(x: Any) -> Any:
    """`x` without null-valued keys, at every depth (see the module docstring)."""
    if isinstance(x, dict):
        return {k: drop_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [drop_nulls(v) for v in x]
    return x


def _bad_json_text(x: Any) -> bool:
    return _invalid_unicode(json.dumps(x, ensure_ascii=False, default=str))


def _check_tool_calls(calls: Any, where: tuple[str, int], fld: str, out: list[Problem]) -> list[dict] | None:
    """OpenAI-style tool calls, normalised to {type, function: {name, arguments}, id?}."""
    shape = "must be a non-empty list of {type: function, function: {name, arguments}} objects"
    if not isinstance(calls, list) or not calls:
        out.append(Problem(*where, fld, shape))
        return None
    norm = []
    for j, call in enumerate(calls):
        f = f"{fld}[{j}]"
        fn = call.get("function", call) if isinstance(call, dict) else None  # also the flat {name, arguments}
        if not isinstance(fn, dict):
            out.append(Problem(*where, f, "must be an object with 'function': {name, arguments}"))
            continue
        g = f"{f}.function" if fn is not call else f
        name, args = fn.get("name"), fn.get("arguments", {})
        if not isinstance(name, str) or not name.strip():
            out.append(Problem(*where, f"{g}.name", "missing, empty or not a string"))
            continue
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except (ValueError, RecursionError):
                parsed = None
            args = parsed if isinstance(parsed, dict) else args
        if not isinstance(args, (dict, str)):
            out.append(Problem(*where, f"{g}.arguments", "must be an object (or a string holding one)"))
            continue
        if _bad_json_text([name, args]):
            out.append(Problem(*where, g, SURROGATE))
            continue
        item = {"type": call.get("type") or "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        norm.append(item)
    return norm if len(norm) == len(calls) else None


def _check_messages(msgs: Any, where: tuple[str, int], fld: str, out: list[Problem]) -> list[dict] | None:
    file, line = where
    if not isinstance(msgs, list) or not msgs:
        out.append(Problem(file, line, fld, "must be a non-empty list of {role, content} objects"))
        return None
    ok = True
    norm = []
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
        calls = None
        if role == "assistant" and m.get("tool_calls"):  # [] is no call
            calls = _check_tool_calls(m["tool_calls"], where, f"{f}.tool_calls", out)
            ok = ok and calls is not None
        content = m.get("content")
        if content is None and (calls or role == "tool"):
            content = ""  # a turn that only calls tools; a tool that returned nothing
        if not isinstance(content, str):
            out.append(Problem(file, line, f"{f}.content", "missing or not a string"))
            ok = False
        elif role == "assistant" and not content.strip() and not m.get("tool_calls"):
            out.append(Problem(file, line, f"{f}.content", "empty assistant content"))
            ok = False
        elif _invalid_unicode(content):
            out.append(Problem(file, line, f"{f}.content", SURROGATE))
            ok = False
        if role == "system" and i != 0:
            out.append(Problem(file, line, f"{f}.role", "a system message may only come first"))
            ok = False
        if role == "tool":
            prev = msgs[i - 1] if i else None
            if not (isinstance(prev, dict) and (prev.get("role") == "tool" or (
                    prev.get("role") == "assistant" and prev.get("tool_calls")))):
                out.append(Problem(file, line, f"{f}.role",
                                   "a tool message must follow an assistant turn with tool_calls (or another tool message)"))
                ok = False
        item = {"role": role, "content": content}
        if calls:
            item["tool_calls"] = calls
        if role == "tool":
            for k in ("tool_call_id", "name"):
                if isinstance(m.get(k), str):
                    item[k] = m[k]
        norm.append(item)
    if ok and not any(m["role"] == "assistant" for m in norm):
        out.append(Problem(file, line, fld, "no assistant turn: nothing to supervise"))
        ok = False
    if ok and norm[-1]["role"] != "assistant":
        out.append(Problem(file, line, f"{fld}[{len(norm) - 1}].role", "the conversation must end with an assistant turn"))
        ok = False
    return norm if ok else None


def _check_tools(tools: Any, where: tuple[str, int], fld: str, out: list[Problem]) -> list | None:
    """A list of tool (function) schemas, or a string holding one as JSON; [] is None."""
    if isinstance(tools, str):
        try:
            tools = drop_nulls(json.loads(tools))
        except (ValueError, RecursionError):
            out.append(Problem(*where, fld, "a string that is not JSON; expected a list of tool schemas"))
            return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        out.append(Problem(*where, fld, "must be a list of tool schemas (objects), or a JSON string holding one"))
        return None
    if _bad_json_text(tools):
        out.append(Problem(*where, fld, SURROGATE))
        return None
    return tools or None


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


def _prompt_messages(rec: dict, where: tuple[str, int], out: list[Problem], names: dict) -> list[dict] | None:
    key, skey = names["prompt"], names["system"]
    prompt = rec.get(key)
    if isinstance(prompt, list):  # a chat prefix
        if not prompt:
            out.append(Problem(*where, key, "an empty list; expected a string or a non-empty list of messages"))
            return None
        msgs = _check_messages(prompt + [{"role": "assistant", "content": "x"}], where, key, out)
        return msgs[:-1] if msgs else None
    p = _text_field(rec, key, where, out, nonempty=True)
    system = rec.get(skey)
    if system is not None and (not isinstance(system, str) or _invalid_unicode(system)):
        out.append(Problem(*where, skey, "must be a string" if not isinstance(system, str) else SURROGATE))
        return None
    if p is None:
        return None
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]


def _kind(rec: dict, names: dict) -> str | None:
    """chat, pc (prompt/completion) or text: the first whose field the record holds, not null;
    else the first whose key it has (null), so that the problem names that field."""
    order = (("messages", "chat"), ("prompt", "pc"), ("completion", "pc"), ("text", "text"))
    for test in (lambda k: rec.get(names[k]) is not None, lambda k: names[k] in rec):
        for k, kind in order:
            if test(k):
                return kind
    return None


def parse_record(rec: Any, where: tuple[str, int], out: list[Problem], *, preference: bool = False,
                 names: dict | None = None):
    """Turn one decoded record into a Sample (or Pair), appending problems to `out`.

    names: {field: the data set's column} for fields named differently (see FIELDS)."""
    file, line = where
    if not isinstance(rec, dict):
        out.append(Problem(file, line, "<record>", f"must be a JSON object, got {type(rec).__name__}"))
        return None
    names = {**{k: k for k in FIELDS}, **(names or {})}
    src = f"{file}:{line}"
    if preference:
        prompt = _prompt_messages(rec, where, out, names)
        chosen = _text_field(rec, names["chosen"], where, out, nonempty=True)
        rejected = _text_field(rec, names["rejected"], where, out, nonempty=True)
        if prompt is None or chosen is None or rejected is None:
            return None
        meta = _meta(rec, names, ("prompt", "system", "chosen", "rejected"))
        mk = lambda reply: Sample(prompt + [{"role": "assistant", "content": reply}], src, meta)  # noqa: E731
        return Pair(mk(chosen), mk(rejected), src, meta)
    kind = _kind(rec, names)
    before = len(out)
    tools = None
    if kind == "chat":
        msgs = _check_messages(drop_nulls(rec.get(names["messages"])), where, names["messages"], out)
        if rec.get(names["tools"]) is not None:
            tools = _check_tools(drop_nulls(rec[names["tools"]]), where, names["tools"], out)
        meta = _meta(rec, names, ("messages", "tools"))
    elif kind == "pc":
        prompt = _prompt_messages(rec, where, out, names)
        completion = _text_field(rec, names["completion"], where, out, nonempty=True)
        msgs = prompt + [{"role": "assistant", "content": completion}] if prompt and completion else None
        meta = _meta(rec, names, ("prompt", "completion", "system"))
    elif kind == "text":
        text = _text_field(rec, names["text"], where, out, nonempty=True)
        msgs, meta = [], _meta(rec, names, ("text",))
    else:
        keys = ", ".join(sorted(map(str, rec))) or "none"
        wanted = f"'{names['messages']}', '{names['prompt']}'/'{names['completion']}' or '{names['text']}'"
        out.append(Problem(file, line, "<record>", f"needs {wanted} (found keys: {keys}); name a data set's "
                                                   "own fields with data.messages_field, data.prompt_field, ... "
                                                   "(README, Data)"))
        return None
    if kind != "chat" and rec.get(names["tools"]) is not None:
        out.append(Problem(file, line, names["tools"], "tools go with chat records (messages), not with "
                                                       + ("prompt/completion" if kind == "pc" else "text") + " records"))
    if len(out) > before:
        return None
    return Sample([], src, meta, text=text) if kind == "text" else Sample(msgs, src, meta, tools=tools)


def _meta(rec: dict, names: dict, used: tuple[str, ...]) -> dict:
    taken = {names[k] for k in used}
    return {k: v for k, v in rec.items() if k not in taken and v is not None}


def read_rows(rows: Iterable[tuple[int, Any]], file: str, *, preference: bool = False,
              names: dict | None = None) -> list:
    """Check the records of a table (index, record); raise DataError listing every problem."""
    problems: list[Problem] = []
    items = []
    for i, rec in rows:
        item = parse_record(rec, (file, i), problems, preference=preference, names=names)
        if item is not None:
            items.append(item)
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError([Problem(file, 0, "<file>", "no records")])
    return items


def read_jsonl(path: str | Path, *, preference: bool = False, names: dict | None = None) -> list:
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
        item = parse_record(rec, (str(path), i), problems, preference=preference, names=names)
        if item is not None:
            items.append(item)
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError([Problem(str(path), 0, "<file>", "no records")])
    return items


def to_record(sample: Sample) -> dict:
    """A Sample as a JSONL record that reads back as the same sample (same uid)."""
    if sample.text is not None:
        return {"text": sample.text, **sample.meta}
    return {"messages": sample.messages, **({"tools": sample.tools} if sample.tools else {}), **sample.meta}


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
