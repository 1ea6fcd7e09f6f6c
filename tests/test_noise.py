"""scripts/inject_noise.py: exact shares, clean records untouched, marks, determinism."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from poft_mlx.data.records import read_jsonl
from tiny import gsm_like, write_jsonl

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import inject_noise  # noqa: E402


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _records(n=40):
    # Distinct replies, both record formats (prompt/completion and multi-turn chat).
    recs = gsm_like(n)
    for i, r in enumerate(recs):
        if "completion" in r:
            r["completion"] += f" ({i})"
        else:
            r["messages"][-1]["content"] += f" ({i})"
    return recs


def test_share_kinds_marks_and_clean_lines(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", _records(40))
    counts = inject_noise.inject_file(src, tmp_path / "out.jsonl", share=0.3, seed=1, char_rate=0.1)
    assert counts == {"mismatch": 6, "chars": 6, "clean": 28}
    src_lines = src.read_text().splitlines()
    out_lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(out_lines) == 40
    replies = [inject_noise.response_of(json.loads(x)) for x in src_lines]
    seen = {"mismatch": 0, "chars": 0}
    for i, (a, b) in enumerate(zip(src_lines, out_lines)):
        rec, orig = json.loads(b), json.loads(a)
        kind = rec.get("noise")
        if kind is None:
            assert a == b  # clean records byte for byte
            continue
        seen[kind] += 1
        reply = inject_noise.response_of(rec)
        assert reply != replies[i]
        # Only the reply changed: the prompt side is untouched.
        assert inject_noise.with_response(rec, replies[i]) == {**orig, **{k: rec[k] for k in rec if k.startswith("noise")}}
        if kind == "mismatch":
            donor = rec["noise_from"] - 1
            assert donor != i and reply == replies[donor]
        else:
            assert 1 <= _levenshtein(reply, replies[i]) <= rec["noise_edits"]
            assert rec["noise_edits"] == max(1, round(0.1 * len(replies[i])))
    assert seen == {"mismatch": 6, "chars": 6}
    # poft-mlx reads the result and keeps the marks as metadata.
    samples = read_jsonl(tmp_path / "out.jsonl")
    assert sum(s.meta.get("noise") is not None for s in samples) == 12


def test_seeded_and_kinds(tmp_path):
    recs = _records(30)
    a, _ = inject_noise.inject(recs, share=0.5, seed=7)
    b, _ = inject_noise.inject(recs, share=0.5, seed=7)
    c, _ = inject_noise.inject(recs, share=0.5, seed=8)
    assert a == b and a != c
    only, counts = inject_noise.inject(recs, share=0.2, seed=0, kinds=("chars",))
    assert counts == {"chars": 6, "clean": 24}
    assert {r["noise"] for r in only if r} == {"chars"}
    none, counts = inject_noise.inject(recs, share=0.0)
    assert none == [None] * 30 and counts["clean"] == 30
    with pytest.raises(ValueError, match="unknown noise kind"):
        inject_noise.inject(recs, share=0.1, kinds=("typos",))
    with pytest.raises(ValueError, match="share"):
        inject_noise.inject(recs, share=1.5)


def test_command_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", _records(10))
    r = subprocess.run([sys.executable, str(SCRIPTS / "inject_noise.py"), str(src), str(tmp_path / "o.jsonl"),
                        "--share", "0.4", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"out": str(tmp_path / "o.jsonl"), "mismatch": 2, "chars": 2, "clean": 6}
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    r = subprocess.run([sys.executable, str(SCRIPTS / "inject_noise.py"), str(bad), str(tmp_path / "x.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "SFT records only" in r.stderr
