#!/usr/bin/env python
"""Inject noise into an SFT data set, as in the PoFT paper's noise ablation (docs/poft.md §3).

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

    python scripts/inject_noise.py train.jsonl train_noisy.jsonl --share 0.3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KINDS = ("mismatch", "chars")
# Characters drawn for insertions and substitutions: letters, digits, a little punctuation.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-+=$%"


def response_of(rec: dict) -> str:
    """The supervised reply of a record (last assistant turn, or the completion)."""
    if isinstance(rec.get("messages"), list):
        for m in reversed(rec["messages"]):
            if isinstance(m, dict) and m.get("role") == "assistant":
                return m["content"]
        raise ValueError("a chat record without an assistant turn")
    if "completion" in rec:
        return rec["completion"]
    raise ValueError("neither 'messages' nor 'completion': noise applies to SFT records only")


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
        raise ValueError(f"share must be in [0, 1], got {share}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown noise kind(s) {unknown or kinds}; choose from {', '.join(KINDS)}")
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
                    raise ValueError("every record has the same response: nothing to mismatch with")
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
    lines = [ln for ln in Path(src).read_text(encoding="utf-8").splitlines() if ln.strip()]
    records = []
    for n, ln in enumerate(lines, 1):
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}:{n}: invalid JSON ({e.msg})") from None
    noisy, counts = inject(records, **kwargs)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as fh:
        for ln, rec in zip(lines, noisy):
            fh.write((ln if rec is None else json.dumps(rec, ensure_ascii=False)) + "\n")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="input JSONL (chat or prompt/completion records)")
    ap.add_argument("dst", help="output JSONL")
    ap.add_argument("--share", type=float, default=0.3, help="share of records made noisy (default 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: mismatch,chars (default both)")
    ap.add_argument("--char-rate", type=float, default=0.1,
                    help="character edits per character of a 'chars' reply (default 0.1)")
    args = ap.parse_args(argv)
    try:
        counts = inject_file(args.src, args.dst, share=args.share, seed=args.seed,
                             kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
                             char_rate=args.char_rate)
    except (OSError, ValueError) as e:
        print(f"inject_noise: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.dst), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
