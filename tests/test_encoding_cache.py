"""The encoding cache (data/encoding_cache.py): a second prepare tokenizes nothing and returns the
same samples and encodings; anything that changes the encodings changes the key; a corrupt or
stale entry is detected, reported and rebuilt; a failed preparation leaves nothing behind."""

import json

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from poft_mlx.config import Config, build
from poft_mlx.data import batched, prepare as prep_mod
from poft_mlx.data.encoding_cache import home
from poft_mlx.data.prepare import prepare, target_renderer
from poft_mlx.errors import TemplateError
from tiny import CHATML, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder, 300, CHATML, "chatml")
    return load_tokenizer(folder)


def _data(tmp_path, n=12):
    p = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 5)},
                          {"role": "assistant", "content": f"the answer is {i} " * (1 + i % 7)},
                          {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "done"}]}
            for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(path, **data):
    return build(Config, {"model": "m", "data": {"train": str(path), "max_seq_length": 80, **data}})


def _run(tok, cfg, **kw):
    lines = []
    return prepare(cfg.data.train, target_renderer(tok, cfg), cfg, log=lines.append, **kw), lines


def _equal(a, b):
    assert [s.uid for s in a.samples] == [s.uid for s in b.samples] and a.report == b.report
    assert [s.meta for s in a.samples] == [s.meta for s in b.samples]
    assert len(a.encodings) == len(b.encodings)
    for x, y in zip(a.encodings, b.encodings):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask)


def _entries():
    root = home() / "encodings"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_a_second_prepare_tokenizes_nothing_and_equals_the_first(tok, tmp_path, monkeypatch):
    cfg = _cfg(_data(tmp_path))
    fresh, _ = _run(tok, cfg, cache=False)
    first, _ = _run(tok, cfg)
    assert first.report["truncated"] > 0 and len(_entries()) == 1  # cut records are in the entry too
    _equal(fresh, first)

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(prep_mod, "fit_many", no_tokenizing)
    second, _ = _run(tok, cfg)
    _equal(fresh, second)


@pytest.mark.parametrize("change", ["max_seq_length", "overlength", "span", "template", "kwargs", "content",
                                    "tokenizer"])
def test_what_changes_the_encodings_changes_the_key(tok, tmp_path, change, tmp_path_factory):
    path = _data(tmp_path)
    _run(tok, _cfg(path))
    other_tok, cfg = tok, _cfg(path)
    if change == "max_seq_length":
        cfg = _cfg(path, max_seq_length=81)
    elif change == "overlength":
        cfg = _cfg(path, overlength="drop")
    elif change == "span":
        cfg = _cfg(path, span="last")
    elif change == "template":
        cfg = build(Config, {"model": "m", "chat_template": "{#- another text -#}" + CHATML, "data": {"train": str(path),
                                                                                   "max_seq_length": 80}})
    elif change == "kwargs":
        cfg = _cfg(path, template_kwargs={"x": 1})
    elif change == "content":
        path.write_text(path.read_text().replace("done", "done!"))
    else:
        folder = tmp_path_factory.mktemp("tok2")
        make_tokenizer(folder, 310, CHATML, "chatml")
        other_tok = load_tokenizer(folder)
    got, _ = _run(other_tok, cfg)
    assert len(_entries()) == 2
    _equal(_run(other_tok, cfg, cache=False)[0], got)


@pytest.mark.parametrize("damage", ["tokens.bin", "mask.bin", "fitted.json", "status.bin", "meta.json", "cut"])
def test_a_damaged_entry_is_detected_and_rebuilt(tok, tmp_path, damage):
    cfg = _cfg(_data(tmp_path))
    _run(tok, cfg)
    first, _ = _run(tok, cfg, cache=False)  # in memory: the entry's arrays are mapped from its files
    (entry,) = _entries()
    f = entry / ("tokens.bin" if damage == "cut" else damage)
    raw = bytearray(f.read_bytes())
    if damage == "cut":
        raw = raw[:-4]
    else:
        raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    again, lines = _run(tok, cfg)
    assert any("encoding cache" in line and "rebuilt" in line for line in lines), lines
    _equal(first, again)
    third, lines = _run(tok, cfg)  # the rebuilt entry is whole
    assert not any("rebuilt" in line for line in lines)
    _equal(first, third)


def test_an_entry_of_another_record_count_is_not_used(tok, tmp_path, monkeypatch):
    cfg = _cfg(_data(tmp_path))
    _run(tok, cfg)
    (entry,) = _entries()
    meta = json.loads((entry / "meta.json").read_text())
    meta["records"] += 1
    (entry / "meta.json").write_text(json.dumps(meta))
    _, lines = _run(tok, cfg)
    assert any("records" in line and "rebuilt" in line for line in lines)


def test_a_failed_preparation_leaves_no_entry_and_no_temporary_folder(tok, tmp_path):
    path = _data(tmp_path, n=300)  # more than a chunk: the error comes mid-stream
    bad = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
           "{% if 'is 290 ' in m['content'] %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")
    cfg = build(Config, {"model": "m", "chat_template": bad, "data": {"train": str(path), "max_seq_length": 400}})
    with pytest.raises(TemplateError, match="message 1"):
        _run(tok, cfg)
    root = home() / "encodings"
    assert not root.exists() or list(root.iterdir()) == []
    assert batched.CHUNK < 300


def test_one_renderer_hashes_its_tokenizer_once(tok, tmp_path, monkeypatch):
    """A train and a valid split prepared with one Renderer (as training.run does) hash its tokenizer
    once; another Renderer hashes again, and gets the same key (the same entry is used)."""
    from poft_mlx.data import encoding_cache

    calls = []
    real = encoding_cache.tokenizer_identity
    monkeypatch.setattr(encoding_cache, "tokenizer_identity", lambda t: calls.append(t) or real(t))
    cfg = _cfg(_data(tmp_path))
    renderer = target_renderer(tok, cfg)
    first = prepare(cfg.data.train, renderer, cfg, log=lambda m: None)
    second = prepare(cfg.data.train, renderer, cfg, key="data.valid", log=lambda m: None)
    assert len(calls) == 1 and len(_entries()) == 2  # two keys (train, valid), one hash
    again, _ = _run(tok, cfg)
    assert len(calls) == 2 and len(_entries()) == 2  # a new Renderer hashes anew, and finds the train entry
    _equal(first, again)
    assert len(second.samples) == len(first.samples)
