import json

import pytest

from poft_mlx.data.records import DataError, read_jsonl


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_chat_and_prompt_completion_records(tmp_path):
    p = _write(tmp_path, [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "q", "completion": "a", "system": "s", "id": 7},
    ])
    a, b = read_jsonl(p)
    assert a.messages[-1] == {"role": "assistant", "content": "hello"}
    assert b.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]
    assert b.meta == {"id": 7} and b.source.endswith("d.jsonl:2")
    assert a.uid != b.uid and len(a.uid) == 24


def test_every_problem_is_reported_with_file_line_and_field(tmp_path):
    p = _write(tmp_path, [
        "{not json",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"prompt": "q"},
        [1, 2],
        {"txt": "x"},  # ({"text": ...} is a text record)
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "more"}]},
        {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]},
    ])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    got = {(pr.line, pr.field) for pr in e.value.problems}
    assert got == {
        (1, "<json>"), (2, "messages[1].content"), (3, "messages[0].role"), (4, "messages"),
        (5, "completion"), (6, "<record>"), (7, "<record>"), (8, "messages[1].content"), (9, "messages[2].role"),
    }
    text = str(e.value)
    assert "d.jsonl:3: messages[0].role: unknown role 'robot'" in text
    assert "empty assistant content" in text and "invalid JSON" in text
    assert "9 problem(s)" in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "e.jsonl")


def test_preference_records(tmp_path):
    p = _write(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": ""}])
    with pytest.raises(DataError) as e:
        read_jsonl(p, preference=True)
    assert {(x.line, x.field) for x in e.value.problems} == {(2, "chosen"), (2, "rejected")}
