"""data/batched.fit_many against the per-record code as it was (tests/render_before.py, frozen at
7dfa727) on real data and the real PyPI tokenizers, record for record, and against transformers'
own assistant-token mask; errors raised at the same record with the same message."""

import functools
import json

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

import render_before
from poft_mlx.data.batched import fit_many
from poft_mlx.data.encoding_cache import EncodingTable
from poft_mlx.data.records import Sample, read_jsonl
from poft_mlx.data.render import PLACEHOLDER, Renderer, TemplateError
from tiny import CHATML, make_tokenizer

MODELS = {"smollm2-135m-instruct": None, "qwen2.5-coder-0.5b-instruct": None, "gemma-3-270m": "gemma"}


@functools.lru_cache(maxsize=None)  # loading gemma's 262k-token tokenizer takes seconds: once per session
def _tokenizer(alias):
    from poft_mlx.errors import ModelRefError
    from poft_mlx.models.modeling import resolve

    try:
        return load_tokenizer(resolve(f"pypi:{alias}"))
    except ModelRefError as e:
        pytest.skip(f"pypi:{alias} unavailable: {e}")


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """ShareGPT chats (long multi-turn ones among them) and GSM8K pairs, as poft-mlx JSONL."""
    try:
        from poft_mlx.data.builtin import gsm8k_records
        from poft_mlx.data.sharegpt import sharegpt_chats

        chats = sharegpt_chats(limit=400)
        gsm = gsm8k_records()[:80]
    except Exception as e:  # noqa: BLE001  (a package not installed)
        pytest.skip(f"data packages unavailable: {e}")
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chats[:35] + gsm[:40]))
    return read_jsonl(path)


def _same(old, new):
    (s1, e1, st1), (s2, e2, st2) = old, new
    assert st1 == st2
    assert (s1 is None) == (s2 is None) and (e1 is None) == (e2 is None)
    if s1 is not None:
        assert s1.messages == s2.messages and s1.text == s2.text and s1.meta == s2.meta and s1.uid == s2.uid
        assert e1.tokens.dtype == e2.tokens.dtype == np.int32 and e1.mask.dtype == e2.mask.dtype == bool
        assert np.array_equal(e1.tokens, e2.tokens) and np.array_equal(e1.mask, e2.mask)


@pytest.mark.real
@pytest.mark.parametrize("alias", sorted(MODELS))
@pytest.mark.parametrize("max_len,policy", [(2048, "truncate"), (300, "truncate"), (300, "drop")])
def test_fit_many_equals_the_per_record_code_on_real_data(real_data, alias, max_len, policy):
    tok = _tokenizer(alias)
    old = render_before.Renderer(tok, chat_template=MODELS[alias])
    new = Renderer(tok, chat_template=MODELS[alias])
    expected = [render_before.fit_length(s, old, max_len, policy, earlier_replies=True) for s in real_data]
    got = list(fit_many(real_data, new, max_len, policy, earlier_replies=True, chunk=32))
    assert len(got) == len(expected) == len(real_data)
    for a, b in zip(expected, got):
        _same(a, b)
    assert new._shapes and all(new._shapes.values())  # chats of several replies took the one render
    statuses = {st for _, _, st in got}
    # every path is exercised: fits, cut (and shortened / dropped at 300 tokens)
    assert {"ok", "truncated"} <= statuses if policy == "truncate" else {"ok", "dropped"} <= statuses
    if max_len == 300 and policy == "truncate":
        assert "shortened" in statuses
    # and Renderer.encode, per record, is the old encode
    for s in real_data[:20]:
        a, b = old.encode(s), new.encode(s)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)


@pytest.mark.real
@pytest.mark.parametrize("alias", sorted(MODELS))
def test_the_text_by_text_path_equals_the_per_record_code(real_data, alias, monkeypatch):
    """A tokenizer whose Rust backend cannot be called directly (truncation or padding set) is
    called text by text through transformers, offsets read whole: the same encodings."""
    tok = _tokenizer(alias)
    old = render_before.Renderer(tok, chat_template=MODELS[alias])
    new = Renderer(tok, chat_template=MODELS[alias])
    monkeypatch.setattr(new, "_backend", lambda: None)
    expected = [render_before.fit_length(s, old, 300, "truncate", earlier_replies=True) for s in real_data]
    got = list(fit_many(real_data, new, 300, "truncate", earlier_replies=True, chunk=32))
    assert len(got) == len(expected) == len(real_data)
    for a, b in zip(expected, got):
        _same(a, b)
    assert {"ok", "truncated", "shortened"} <= {st for _, _, st in got}


GEN_CHATML = (  # ChatML with transformers' generation markers around what poft-mlx supervises
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.real
@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_span_equals_transformers_assistant_tokens_mask(real_data, alias):
    """An independent reference: apply_chat_template(return_assistant_tokens_mask=True) marks the
    tokens inside {% generation %}: each reply and its <|im_end|>, nothing of the markup."""
    tok = _tokenizer(alias)
    hf = tok._tokenizer
    renderer = Renderer(tok, chat_template=GEN_CHATML)
    chats = [s for s in real_data if s.text is None]
    got = list(fit_many(chats, renderer, 1 << 30, "truncate"))
    for s, (_, enc, _) in zip(chats, got):
        ref = hf.apply_chat_template(s.messages, chat_template=GEN_CHATML, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert enc.tokens.tolist() == list(ref["input_ids"])
        assert enc.mask.tolist() == [bool(m) for m in ref["assistant_masks"]], s.source


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder, 300, CHATML, "chatml")
    return load_tokenizer(folder)


def _chat(i):
    return Sample([{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
                  f"d.jsonl:{i + 1}")


def _raises_as_before(samples, old, new, chunk):
    """fit_length with `old` (the frozen code) over `samples` raises a TemplateError; fit_many with `new`
    raises the same message: (that message, what fit_many yielded before it)."""
    with pytest.raises(TemplateError) as before:
        for s in samples:
            render_before.fit_length(s, old, 64, "truncate")
    seen = []
    with pytest.raises(TemplateError) as now:
        for item in fit_many(samples, new, 64, "truncate", chunk=chunk):
            seen.append(item)
    assert str(now.value) == str(before.value)
    return str(now.value), seen


def test_a_bad_record_raises_the_same_error_after_the_same_records(tiny_tok):
    """A template that cannot render record 5's reply: fit_many yields records 0-4 first, then
    raises fit_length's very message, though the whole chunk was rendered before tokenizing."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if 'answer 5' in m['content'] %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")
    samples = [_chat(i) for i in range(9)]
    new, old = Renderer(tiny_tok, chat_template=template), render_before.Renderer(tiny_tok, chat_template=template)
    message, seen = _raises_as_before(samples, old, new, chunk=4)
    assert "message 1" in message
    assert len(seen) == 5
    for s, item in zip(samples, seen):
        _same(render_before.fit_length(s, old, 64, "truncate"), item)


def test_text_records_and_tools_equal_the_per_record_code(tiny_tok):
    from tiny import QWEN

    samples = [Sample(None, f"t:{i}", text=("some plain text " * (i + 1)).strip()) for i in range(6)]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    samples.append(Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "x", tools=tools))
    for max_len in (8, 1000):
        old, new = render_before.Renderer(tiny_tok, chat_template=QWEN), Renderer(tiny_tok, chat_template=QWEN)
        try:
            expected = [render_before.fit_length(s, old, max_len, "truncate") for s in samples]
        except TemplateError as e:  # the tiny Qwen template ignores tools: the same error, same record
            with pytest.raises(TemplateError, match="ignores `tools`") as now:
                list(fit_many(samples, new, max_len, "truncate"))
            assert str(now.value) == str(e)
            expected = [render_before.fit_length(s, old, max_len, "truncate") for s in samples[:-1]]
            samples_ = samples[:-1]
        else:
            samples_ = samples
        for a, b in zip(expected, fit_many(samples_, new, max_len, "truncate", chunk=4)):
            _same(a, b)


def test_encoding_table_is_the_list_it_holds(tiny_tok):
    renderer = Renderer(tiny_tok)
    encs = [renderer.encode(_chat(i)) for i in range(7)]
    table = EncodingTable.of(encs)
    assert len(table) == 7 and table.lengths().tolist() == [len(e.tokens) for e in encs]
    assert table.supervised().tolist() == [float(e.mask[1:].sum()) for e in encs]
    for a, b in zip(encs, table):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(table[-1].tokens, encs[-1].tokens) and len(table[2:5]) == 3
    empty = EncodingTable.of([])
    assert len(empty) == 0 and empty.lengths().tolist() == [] and empty.supervised().tolist() == []


@pytest.mark.real
@pytest.mark.parametrize("alias", sorted(MODELS))
def test_the_direct_renders_find_what_the_prefix_renders_find(real_data, alias):
    """Renderer._locate_each (one direct render per reply) and _locate_once (one for the whole chat)
    take every real chat (so the fast paths are the ones in use) and find the turns that
    _turns_by_prefixes, through apply_chat_template, finds; the direct renders are
    apply_chat_template's, character for character."""
    tok = _tokenizer(alias)
    r = Renderer(tok, chat_template=MODELS[alias])
    assert r._direct is not None
    template, variables = r._direct
    chats = [s for s in real_data if s.text is None]
    assert sum(sum(m["role"] == "assistant" for m in s.messages) >= 2 for s in chats) >= 10
    for span in ("all", "last"):
        r.span = span
        for s in chats:
            full = r.apply(s.messages, False)
            indices = [i for i, m in enumerate(s.messages) if m["role"] == "assistant"][-1 if span == "last" else 0:]
            exact = r._turns_by_prefixes(full, s.messages, indices, None)
            assert r._locate_each(full, s.messages, indices, None) == exact, s.source
            assert r._locate_once(full, s.messages, indices, None) == exact, s.source
            assert r._locate(full, s.messages, indices, None) == exact, s.source
            probe = s.messages[:indices[0]] + [{"role": "assistant", "content": PLACEHOLDER}]
            direct = template.render(messages=probe, tools=None, documents=None, add_generation_prompt=False,
                                     **variables)
            assert direct == r.apply(probe, False)
    assert r._shapes and all(r._shapes.values())  # every shape checked, and the one render trusted


def _pairs(i, n=2):
    msgs = []
    for k in range(n):
        msgs += [{"role": "user", "content": f"question {i}.{k}"}, {"role": "assistant", "content": f"answer {i}.{k}"}]
    return Sample(msgs, f"d.jsonl:{i + 1}")


def test_a_closing_that_depends_on_the_reply_s_place_is_caught_by_the_shape_check(tiny_tok):
    """A template that closes the reply at message 1 with an end-of-turn token and the others with
    a newline only: the one render takes every reply's closing to be the last one's and would miss
    that token, so the first chat of that shape, located both ways, marks the shape untrusted; every
    chat of it then equals the per-record code as it was."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if loop.index0 == 1 %}\n<end_of_turn>{% endif %}\n{% endfor %}")
    samples = [_pairs(i) for i in range(5)]
    new, old = Renderer(tiny_tok, chat_template=template), render_before.Renderer(tiny_tok, chat_template=template)
    s = samples[0]
    full = new.apply(s.messages, False)
    once = new._locate_once(full, s.messages, [1, 3], None)
    assert once is not None and once != new._turns_by_prefixes(full, s.messages, [1, 3], None)
    for a, b in zip([render_before.fit_length(x, old, 64, "truncate") for x in samples],
                    fit_many(samples, new, 64, "truncate", chunk=2), strict=True):
        _same(a, b)
    end_of_turn = tiny_tok.convert_tokens_to_ids("<end_of_turn>")
    _, enc, _ = render_before.fit_length(s, old, 64, "truncate")
    assert enc.mask[enc.tokens == end_of_turn].all()  # the token the one render would have missed
    assert list(new._shapes.values()) == [False]


def test_a_template_that_renders_the_last_reply_otherwise_raises_as_before(tiny_tok):
    """A template that writes the last reply differently (here a <think></think> before it, as
    Qwen3's does) is not prefix-consistent: the one render alone would accept it, but the shape
    check sends it to the per-prefix path, which raises the per-record code's error at the same
    record; a one-reply chat is still located."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% if loop.last and m['role'] == 'assistant' %}<think></think>{% endif %}"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    samples = [_pairs(0, 1), _pairs(1, 3), _pairs(2, 3)]
    new, old = Renderer(tiny_tok, chat_template=template), render_before.Renderer(tiny_tok, chat_template=template)
    full = new.apply(samples[1].messages, False)
    assert new._locate_once(full, samples[1].messages, [1, 3, 5], None) is not None
    _same(render_before.fit_length(samples[0], old, 64, "truncate"), next(fit_many(samples[:1], new, 64, "truncate")))
    message, seen = _raises_as_before(samples, old, new, chunk=2)
    assert "prefix-consistently" in message
    assert len(seen) == 1


def test_a_template_that_edits_the_reply_falls_back_to_the_prefix_renders(tiny_tok):
    """A reply the template writes neither as given nor stripped (here: its leading spaces cut, its
    trailing ones kept): _locate declines, and the turns are the per-record code's."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].lstrip() }}<|im_end|>\n"
                "{% endfor %}")
    s = Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello there!  "},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Bye."}], "x")
    new, old = Renderer(tiny_tok, chat_template=template), render_before.Renderer(tiny_tok, chat_template=template)
    full = new.apply(s.messages, False)
    assert new._locate(full, s.messages, [1, 3], None) is None
    assert new._locate_once(full, s.messages, [1, 3], None) is None
    _same(render_before.fit_length(s, old, 64, "truncate"), next(fit_many([s], new, 64, "truncate")))


@pytest.mark.real
@pytest.mark.parametrize("alias", sorted(MODELS))
def test_first_token_at_a_char_equals_a_linear_scan(real_data, alias):
    """Tokens.first (char_to_token, checked by its neighbour; else bisection) against a scan of the
    offsets as the tokenizer gives them, at every char of real renderings, from several `lo`."""
    tok = _tokenizer(alias)
    r = Renderer(tok, chat_template=MODELS[alias])
    texts = [r.render(s)[0] for s in real_data if s.text is None][:6]
    texts.append(real_data[-1].messages[-1]["content"] if real_data[-1].text is None else real_data[-1].text)
    for text, tokens in zip(texts, r.tokenize(texts, add_special_tokens=False)):
        assert tokens._encoding is not None  # the char_to_token path is the one under test
        offsets = np.asarray(tokens._encoding.offsets).reshape(-1, 2)
        n = len(tokens)
        for lo in (0, n // 3):
            for side in (0, 1):
                for char in range(0, len(text) + 2, 1 if len(text) < 3000 else 3):
                    edge = offsets[lo:, side]
                    hit = np.flatnonzero(edge >= char if side == 0 else edge > char)
                    assert tokens.first(side, char, lo) == (lo + int(hit[0]) if len(hit) else n), (side, char, lo)


def test_no_tools_reach_the_probe_as_they_reach_apply_chat_template(tiny_tok):
    """An empty tools list is no tools for apply (None to the template): the direct probe gets the
    same, so a template that tests `tools is none` keeps the one-probe path."""
    template = ("{% if tools is not none %}TOOLS\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"}]
    r = Renderer(tiny_tok, chat_template=template)
    for tools in (None, []):
        full = r.apply(msgs, False, tools)
        assert "TOOLS" not in full
        assert r._locate_each(full, msgs, [1], tools) == r._turns_by_prefixes(full, msgs, [1], tools)
