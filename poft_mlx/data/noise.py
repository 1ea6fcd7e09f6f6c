"""Noise for an SFT data set, as in the PoFT paper's noise ablation (docs/poft.md §3).

A chosen share of the records becomes noisy, split between two kinds:

    mismatch   the response is replaced by another record's response (prompt and reply
               no longer belong together)
    chars      characters of the response are inserted, deleted and substituted
               (edits = max(1, round(char_rate * length)))

Each noisy record gets a metadata field "noise" ("mismatch" | "chars") plus where its reply
came from ("noise_from": the donor's line) or how many edits it took ("noise_edits"), so that
`poft-mlx report` can show where the noisy samples land. The response is the last assistant
turn of a chat record, or the completion of a prompt/completion record. Clean records are
copied byte for byte, in their order, so their content ids (and cached scores) are unchanged.
The same input, share and seed give the same output.

    poft-mlx data gsm8k DIR --noise 0.3        (or scripts/inject_noise.py on any JSONL file)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, InputMissing

KINDS = ("mismatch", "chars")
# Characters drawn for insertions and substitutions: letters, digits, a little punctuation.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-+=$%"


def response_of(rec: dict) -> str:
    """The supervised reply of a record (last assistant turn, or the completion)."""
    if isinstance(rec.get("messages"), list):
        for m in reversed(rec["messages"]):
            if isinstance(m, dict) and m.get("role") == "assistant":
                return m["content"]
        raise DataError("a chat record without an assistant turn")
    if "completion" in rec:
        return rec["completion"]
    raise DataError("neither 'messages' nor 'completion': noise applies to SFT records only")


def with_response(rec: dict, reply: str) -> dict:
    out = json.loads(json.dumps(rec))
    if isinstance(out.get("messages"), list):
        i = max(k for k, m in enumerate(out["messages"]) if m.get("role") == "assistant")
        out["messages"][i]["content"] = reply
    else:
        out["completion"] = reply
    return out


def corrupt_chars(text: str, rng: np.random.Generator, rate: float) -> tuple[str, int]:
    """Apply max(1, round(rate * len)) random insertions, deletions and substitutions."""
    chars = list(text)
    n_edits = max(1, round(rate * len(chars)))
    for _ in range(n_edits):
        op = rng.integers(3) if len(chars) > 1 else 0  # never delete the last character
        if op == 0:  # insert
            chars.insert(int(rng.integers(len(chars) + 1)), ALPHABET[rng.integers(len(ALPHABET))])
        elif op == 1:  # delete
            del chars[int(rng.integers(len(chars)))]
        else:  # substitute with a different character
            i = int(rng.integers(len(chars)))
            choices = [c for c in ALPHABET if c != chars[i]]
            chars[i] = choices[rng.integers(len(choices))]
    out = "".join(chars)
    if out == text or not out.strip():  # edits that cancel out: one more substitution
        return corrupt_chars(text, rng, 0.0)
    return out, n_edits


def inject(records: list[dict], *, share: float, seed: int = 0, kinds=KINDS,
           char_rate: float = 0.1) -> tuple[list[dict | None], dict]:
    """Noisy versions of round(share * N) records (None where a record stays clean).

    The noisy records are split evenly between `kinds` (the remainder goes to the first).
    Returns (per-record replacement or None, counts).
    """
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"share must be in [0, 1], got {share}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ConfigError(f"unknown noise kind(s) {unknown or kinds}; choose from {', '.join(KINDS)}")
    replies = [response_of(r) for r in records]
    rng = np.random.default_rng(seed)
    n_noisy = round(share * len(records))
    chosen = rng.choice(len(records), size=n_noisy, replace=False)
    per_kind = [n_noisy // len(kinds) + (1 if k < n_noisy % len(kinds) else 0) for k in range(len(kinds))]
    out: list[dict | None] = [None] * len(records)
    counts = {k: 0 for k in kinds}
    start = 0
    for kind, n in zip(kinds, per_kind):
        for i in chosen[start:start + n]:
            i = int(i)
            if kind == "mismatch":
                donors = [j for j in range(len(records)) if replies[j] != replies[i]]
                if not donors:
                    raise DataError("every record has the same response: nothing to mismatch with")
                j = donors[rng.integers(len(donors))]
                rec = with_response(records[i], replies[j])
                rec.update(noise="mismatch", noise_from=j + 1)
            else:
                reply, edits = corrupt_chars(replies[i], rng, char_rate)
                rec = with_response(records[i], reply)
                rec.update(noise="chars", noise_edits=edits)
            out[i] = rec
            counts[kind] += 1
        start += n
    counts["clean"] = len(records) - n_noisy
    return out, counts


def inject_file(src: str | Path, dst: str | Path, **kwargs) -> dict:
    """Read JSONL `src`, write `dst` with clean lines copied verbatim; returns the counts."""
    try:
        text = Path(src).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputMissing(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{src}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = []
    for n, ln in enumerate(lines, 1):
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError as e:
            raise DataError(f"{src}:{n}: invalid JSON ({e.msg})") from None
    noisy, counts = inject(records, **kwargs)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as fh:
        for ln, rec in zip(lines, noisy):
            fh.write((ln if rec is None else json.dumps(rec, ensure_ascii=False)) + "\n")
    return counts
