"""Property-based fuzzing of the input boundaries: data files and config files.

Whatever the input, `read_jsonl` raises only DataError (naming the file, the line and
the field), `load_config` only ConfigError (naming the file or the key), and
`poft-mlx train -c bad.yaml` exits 1 or 2 with a short message, never a traceback.
Records that `read_jsonl` accepts are usable downstream (hashable text, a reply to learn).

Model files too: whatever a safetensors or GGUF header holds, model_files raises only
ModelFileError, and a file it passes is one that mlx / gguf-py read without an error. Random
argument lists for the commands end in usage text or one error line, never a traceback.

The runs are derandomized (the same inputs on every run); POFT_FUZZ_EXAMPLES=5000 tries
that many random ones per fuzzer instead. `pytest -s` prints how many inputs each fuzzer tried.
`test_fuzz_at_scale` (marker fuzz_scale, skipped unless selected with `-m fuzz_scale` or
POFT_FUZZ_SCALE=N) runs every fuzzer with N random inputs each (default 7000: 105,008 in all, the
hostile YAML fuzzer having only its 8 texts).
"""

import collections
import dataclasses
import json
import os
import re
import typing

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poft_mlx.cli.main import main
from poft_mlx.config import Config, ConfigError, load_config
from poft_mlx.data.records import ROLES, DataError, read_jsonl

_DEEP = int(os.environ.get("POFT_FUZZ_EXAMPLES", 0))


def fuzz(max_examples: int = 250, scale: int | None = None):
    """Settings for one fuzzer (not a global profile: other test files keep their own).

    `scale`: that many random (not derandomized) examples, for test_fuzz_at_scale."""
    n = scale or _DEEP or max_examples
    return settings(max_examples=n, derandomize=not (scale or _DEEP), database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))

TRIED: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    width = max(map(len, TRIED), default=0)
    lines = [f"  {name.ljust(width)}  {n:6d}" for name, n in sorted(TRIED.items())]
    print(f"\nmalformed inputs tried ({sum(TRIED.values())} in all):\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------- strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
# Strings as JSON can carry them: any code point, lone surrogates ("\ud800") included.
strings = st.lists(st.characters() | st.characters(categories=["Cs"]), max_size=12).map("".join)
# Values where strings are expected: mostly strings (blank, odd), else anything.
texts = st.one_of(strings, st.sampled_from(["", "  ", "\ud800", "ok\udfff", "\x00"]), json_values)
roles = st.sampled_from(ROLES) | st.sampled_from(["", "USER", "tool", "model", "Assistant"]) | json_values


@st.composite
def messages(draw):
    out = []
    for _ in range(draw(st.integers(0, 5))):
        m = {}
        if draw(st.booleans()) or draw(st.booleans()):
            m["role"] = draw(roles)
        if draw(st.booleans()) or draw(st.booleans()):
            m["content"] = draw(texts)
        if draw(st.booleans()):
            m[draw(st.text(max_size=6))] = draw(json_values)
        out.append(m if draw(st.integers(0, 9)) else draw(json_values))
    return out


@st.composite
def records(draw):
    """Near-valid records: the known shapes with fields missing, mistyped or unknown."""
    kind = draw(st.sampled_from(["chat", "prompt", "preference", "other"]))
    if kind == "chat":
        rec = {"messages": draw(messages() | json_values)}
    elif kind == "prompt":
        rec = {"prompt": draw(texts | messages()), "completion": draw(texts)}
        if draw(st.booleans()):
            rec["system"] = draw(texts)
    elif kind == "preference":
        rec = {"prompt": draw(texts | messages()), "chosen": draw(texts), "rejected": draw(texts)}
    else:
        rec = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    for key in list(rec):
        if draw(st.integers(0, 5)) == 0:
            del rec[key]
    return rec


@st.composite
def well_typed_records(draw):
    """The right shapes and types with any text: blank, control characters, lone surrogates."""
    kind = draw(st.sampled_from(["chat", "prompt", "preference"]))
    if kind == "chat":
        turns = [{"role": r, "content": draw(strings)} for r in draw(st.lists(st.sampled_from(ROLES), max_size=3))]
        return {"messages": turns + [{"role": "assistant", "content": draw(strings)}]}
    rec = {"prompt": draw(strings), "system": draw(strings)}
    if kind == "prompt":
        return {**rec, "completion": draw(strings)}
    return {**rec, "chosen": draw(strings), "rejected": draw(strings)}


def dump(rec) -> bytes:
    return json.dumps(rec, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def jsonl_files(draw, lines):
    """A file of lines from `lines`, sometimes with a valid record, blank lines and CRLF."""
    body = draw(st.lists(lines, min_size=0, max_size=6))
    if draw(st.booleans()):
        body.insert(draw(st.integers(0, len(body))), dump({"prompt": "q", "completion": "a"}))
    if draw(st.booleans()):
        body.insert(draw(st.integers(0, len(body))), b"   ")
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    return end.join(body) + (end if draw(st.booleans()) else b"")


INVALID_UTF8 = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf0\x28\x8c\x28", b"\x80", b"\xe2\x82"]


@st.composite
def with_invalid_utf8(draw):
    line = dump(draw(records()))
    at = draw(st.integers(0, len(line)))
    return line[:at] + draw(st.sampled_from(INVALID_UTF8)) + line[at:]


hostile = st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b'{"prompt": 1e999999, "completion": -Infinity}',
                           b'{"messages": NaN}', b"\x00", b"\xef\xbb\xbf" + dump({"prompt": "q", "completion": "a"})])

LINE_FUZZERS = {
    "jsonl: random bytes": st.binary(max_size=120),
    "jsonl: random JSON values": json_values.map(dump),
    "jsonl: records with bad fields": records().map(dump),
    "jsonl: well-typed records, odd text": well_typed_records().map(dump),
    "jsonl: invalid UTF-8": with_invalid_utf8(),
    "jsonl: hostile lines": hostile,
}


# ---------------------------------------------------------------------------- read_jsonl


def check_read_jsonl(path, n_lines: int, preference: bool) -> None:
    try:
        items = read_jsonl(path, preference=preference)
    except DataError as e:
        assert e.problems and str(path) in str(e)
        for p in e.problems:
            assert p.file == str(path) and p.field and p.message
            assert str(p).startswith(f"{path}:{p.line}: {p.field}: ")
            # A record's problem names its line; only whole-file problems use line 0.
            assert (1 <= p.line <= n_lines) if not p.field.startswith("<file>") else p.line == 0, str(p)
        return
    for item in items:
        for s in ([item.chosen, item.rejected] if preference else [item]):
            if s.text is not None:  # a text record
                assert s.text.strip() and not s.messages and len(s.uid) == 24
                continue
            assert s.messages[-1]["role"] == "assistant"
            assert s.messages[-1]["content"].strip() or s.messages[-1].get("tool_calls")
            for m in s.messages:
                assert m["role"] in ROLES and isinstance(m["content"], str)
            assert len(s.uid) == 24  # hashes its text: no lone surrogates


def fuzz_read_jsonl(folder, name: str, scale: int | None = None) -> None:
    path = folder / f"{re.sub(r'[^a-z]+', '-', name)}.jsonl"

    @fuzz(scale=scale)
    @given(data=jsonl_files(LINE_FUZZERS[name]), preference=st.booleans())
    def run(data, preference):
        TRIED[name] += 1
        path.write_bytes(data)
        check_read_jsonl(path, len(data.split(b"\n")), preference)

    run()


@pytest.mark.parametrize("name", list(LINE_FUZZERS))
def test_read_jsonl_raises_only_data_errors(folder, name):
    fuzz_read_jsonl(folder, name)


def test_data_errors_name_the_line_of_invalid_utf8_and_hostile_json(tmp_path):
    good = dump({"prompt": "q", "completion": "a"})
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([good, good + b"\xff", good, b"[" * 100_000, b"9" * 5000, good]) + b"\n")
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert [(p.line, p.field) for p in e.value.problems] == [(2, "<utf-8>"), (4, "<json>"), (5, "<json>")]
    path.write_bytes(dump({"prompt": "q\ud800", "completion": "a"}) + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: prompt: .*surrogate"):
        read_jsonl(path)


# ---------------------------------------------------------------------------- load_config

# Every key a config can hold, derived from the dataclasses: a field added later is fuzzed too.
_HINTS = typing.get_type_hints(Config)
SECTIONS = {name: [f.name for f in dataclasses.fields(tp)] for name, tp in _HINTS.items() if dataclasses.is_dataclass(tp)}
TOP = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
# Values as YAML writes them, including what PyYAML reads in surprising ways.
yaml_values = st.one_of(json_values, st.integers(min_value=10**20), st.sampled_from(
    [".inf", "-.inf", ".nan", "1e999", "1e-5", "yes", "off", "~", "2024-01-01", "0x1F", "1_000", "!!binary aGk=", "[", "{a: 1"]))


@st.composite
def config_trees(draw):
    """Config-shaped mappings: known keys with values of any type, plus unknown keys."""
    tree = {}
    for key in draw(st.lists(st.sampled_from(TOP + list(SECTIONS)) | st.text(max_size=8), max_size=5)):
        if key in SECTIONS and draw(st.booleans()):
            sub = draw(st.lists(st.sampled_from(SECTIONS[key]) | st.text(max_size=6), max_size=3))
            tree[key] = {k: draw(yaml_values) for k in sub}
        elif key == "aligned" and draw(st.booleans()):
            tree[key] = draw(st.lists(st.fixed_dictionaries({}, optional={
                "model": yaml_values, "weight": yaml_values, "chat_template": yaml_values, "x": yaml_values}) | yaml_values,
                max_size=3))
        else:
            tree[key] = draw(yaml_values)
    return tree


def as_yaml(tree) -> bytes:
    # Raw YAML scalars (".inf", "[") go in unquoted, the way a user would type them.
    text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    return re.sub(r"'(\.inf|-\.inf|\.nan|1e999|1e-5|yes|off|~|2024-01-01|0x1F|1_000|!!binary aGk=|\[|\{a: 1)'",
                  r"\1", text).encode("utf-8", "surrogatepass")


@st.composite
def mangled_yaml(draw):
    """A valid config text with a few bytes inserted, deleted or replaced."""
    text = bytearray(as_yaml(draw(config_trees())) or b"model: m\n")
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(st.binary(min_size=1, max_size=3) | st.sampled_from([b":", b"-", b"\t", b"  ", b"{", b"&a", b"*a", b"\n"]))
        if op == "insert":
            text[at:at] = junk
        elif op == "delete":
            del text[at:at + len(junk)]
        else:
            text[at:at + len(junk)] = junk
    return bytes(text)


CONFIG_FUZZERS = {
    "config: random bytes": st.binary(max_size=200),
    "config: random text": st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    "config: wrong types and unknown keys": config_trees().map(as_yaml),
    "config: mangled YAML": mangled_yaml(),
    "config: hostile YAML": st.sampled_from([b"[" * 1500, b"a: &a [*a]\nmodel: *a\n", b"train: &t {iters: *t}\n",
                                              b"beta: " + b"9" * 5000, b"\xef\xbb\xbfmodel: m\n", b"%YAML 9.9\n---\nmodel: m\n",
                                              b"model: !!python/object:os.system x\n", b"--- 1\n--- 2\n"]),
}


def key_paths(tree, prefix="", depth=0) -> set[str]:
    """Every key path in `tree` ("train.iters", "aligned[0].model"); YAML aliases can loop."""
    out = set()
    if depth > 6:
        return out
    if isinstance(tree, dict):
        for k, v in tree.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out |= {p} | key_paths(v, p, depth + 1)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out |= {f"{prefix}[{i}]"} | key_paths(v, f"{prefix}[{i}]", depth + 1)
    return out


def check_load_config(path) -> None:
    try:
        load_config([path])
    except ConfigError as e:
        msg = str(e)
        assert str(path) in msg, msg
        try:
            tree = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except Exception:
            return  # not YAML: the message names the file (and the line, where YAML knows it)
        if isinstance(tree, dict):
            # A schema error names the offending key (as "key:" or "'key'").
            assert any(f"{p}:" in msg or f"'{p}'" in msg for p in key_paths(tree)), msg


def fuzz_load_config(folder, name: str, scale: int | None = None) -> None:
    path = folder / f"{re.sub(r'[^a-z]+', '-', name)}.yaml"

    @fuzz(scale=scale)
    @given(data=CONFIG_FUZZERS[name])
    def run(data):
        TRIED[name] += 1
        path.write_bytes(data)
        check_load_config(path)

    run()


@pytest.mark.parametrize("name", list(CONFIG_FUZZERS))
def test_load_config_raises_only_config_errors(folder, name):
    fuzz_load_config(folder, name)


overrides = st.one_of(
    st.builds("{}={}".format, st.sampled_from(TOP + [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]) | st.text(max_size=10),
              yaml_values.map(lambda v: v if isinstance(v, str) else json.dumps(v))),
    st.text(max_size=30))


def fuzz_overrides(scale: int | None = None) -> None:
    @fuzz(scale=scale)
    @given(items=st.lists(overrides, min_size=1, max_size=3))
    def run(items):
        TRIED["config: --set key=value"] += 1
        try:
            load_config([], items)
        except ConfigError as e:
            assert str(e)

    run()


def test_overrides_raise_only_config_errors():
    fuzz_overrides()


def test_non_finite_huge_and_out_of_range_numbers_are_config_errors(tmp_path):
    for text, needle in [("train:\n  iters: .inf\n", "train.iters"), ("train:\n  iters: .nan\n", "train.iters"),
                         ("beta: " + "9" * 400 + "\n", "beta"), ("system:\n  memory_limit_gb: .inf\n", "system.memory_limit_gb"),
                         ("model: {x: 1}\n", "model")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config([path])
    assert load_config([], ["train.seed=12345678901234567891"]).train.seed == 12345678901234567891
    # Every value out of its range, at once: these would divide by zero or fail deep in training.
    with pytest.raises(ConfigError) as e:
        load_config([], ["train.batch_size=0", "train.steps_per_report=0", "adapter.dropout=1", "system.cache_limit_gb=-1"])
    assert str(e.value) == ("--set: train.batch_size: must be at least 1, got 0; train.steps_per_report: must be at least 1, "
                            "got 0; system.cache_limit_gb: must be at least 0, got -1.0; adapter.dropout: must be at least 0 "
                            "and below 1, got 1.0")


# ---------------------------------------------------------------------------- the CLI

CLI_FUZZ = st.one_of(CONFIG_FUZZERS["config: wrong types and unknown keys"], CONFIG_FUZZERS["config: mangled YAML"],
                     CONFIG_FUZZERS["config: random bytes"])


def fuzz_cli_config(folder, scale: int | None = None) -> None:
    @fuzz(120, scale=scale)
    @given(data=CLI_FUZZ)
    def run(data):
        TRIED["cli: poft-mlx train -c bad.yaml"] += 1
        path = folder / "bad.yaml"
        path.write_bytes(data)
        r = CliRunner().invoke(main, ["train", "-c", str(path), "--set", f"run_dir={folder / 'run'}"])
        assert r.exit_code in (1, 2), (r.exit_code, r.output, r.exception)
        assert isinstance(r.exception, SystemExit), repr(r.exception)
        assert "Traceback" not in r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert lines and lines[0].startswith("Error:") and len(lines) <= 3, r.output

    run()


def test_cli_train_with_a_bad_config_prints_a_message_not_a_traceback(folder):
    fuzz_cli_config(folder)


def test_cli_train_with_a_folder_as_data_prints_a_message(folder):
    empty = folder / "no-data"  # a folder of data files is a source (data/sources.py); this one has none
    empty.mkdir(exist_ok=True)
    r = CliRunner().invoke(main, ["train", "--set", "model=m", "--set", f"data.train={empty}",
                                  "--set", "objective=sft", "--set", f"run_dir={folder / 'run'}"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert r.output.strip() == (f"Error: data.train: {empty} is a folder without .jsonl, .parquet or .arrow "
                                "files (and not a save_to_disk data set)")


# ---------------------------------------------------------------------------- CLI argument lists

# What a user may type after `poft-mlx`: the commands that only read arguments and files (not
# quickstart, chat or data, which start long jobs or wait for a terminal), their options, and
# values of every kind. No Hub access (HF_HUB_OFFLINE, no token), and a scratch working folder.
ARGV_COMMANDS = {
    "train": ["-c", "--config", "--set", "--resume"],
    "score": ["-c", "--set"],
    "eval": ["-c", "--set", "--data", "--base", "--no-base", "--json-out", "--generate", "--out", "--answer",
             "--max-tokens", "--gen-batch-size", "--temp", "--limit", "--lm-eval", "--lm-eval-limit"],
    "report": ["-c", "--set", "-o", "--run", "--keep-top", "--out"],
    "convert": ["--dtype", "--quantize", "--chat-template"],
    "fuse": ["--keep-quantization", "--no-check", "--tol", "--base", "--peft"],
    "export-peft": ["--base-model-name", "--base"],
    "push": ["--private", "--dry-run", "--endpoint", "--message"],
    "plot": ["-o", "--out", "--svg"],
    "generate": ["-p", "--prompt", "--max-tokens", "--temp", "--top-p", "--seed", "--system", "--chat-template",
                 "--adapter-path", "--batch-size"],
}
# An argument can hold any character but NUL (argv entries are C strings); bytes that are not
# UTF-8 reach Python as lone surrogates (surrogateescape).
ARGV_VALUES = ["", "-", "--", "0", "-1", "1e999", "nan", "3.5", "99999999999999999999", "x=y", "train.iters=0",
               "model=", "data.train=/nonexistent.jsonl", "=", "bfloat16", "q4", "keep", "a/b", "pypi:nope",
               "/", ".", "..", "~", "/dev/null", "http://127.0.0.1:9", "\udcff", "\udc80x", "é" * 3, "-h", "--help"]
argv_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=12)


@st.composite
def argv_lists(draw, folder):
    places = [str(folder), str(folder / "bad.yaml"), str(folder / "nothing"), str(folder / "run")]
    command = draw(st.sampled_from(list(ARGV_COMMANDS)) | argv_text)
    words = st.sampled_from(ARGV_COMMANDS.get(command, ["-c"])) | st.sampled_from(ARGV_VALUES + places) | argv_text
    return [command, *draw(st.lists(words, max_size=8))]


def fuzz_cli_argv(folder, monkeypatch, scale: int | None = None) -> None:
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(folder / "no-token"))
    (folder / "bad.yaml").write_text("model: [\n")
    work = folder / "cwd"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)

    @fuzz(150, scale=scale)
    @given(argv=argv_lists(folder))
    def run(argv):
        TRIED["cli: random argument lists"] += 1
        r = CliRunner().invoke(main, argv)
        assert r.exit_code in (0, 1, 2), (argv, r.exit_code, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), (argv, repr(r.exception))
        assert "Traceback" not in r.output, (argv, r.output)
        if r.exit_code == 1:
            errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
            assert len(errors) == 1, (argv, r.output)

    run()


def test_cli_random_argument_lists_print_usage_or_one_error(folder, monkeypatch):
    fuzz_cli_argv(folder, monkeypatch)


# ---------------------------------------------------------------------------- model file headers


def _tiny_safetensors() -> bytes:
    import struct

    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                         "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
                         "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(range(40))


ST_BYTES = _tiny_safetensors()
st_dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F64", "Q4", "", 1, None])
st_ints = st.integers(-3, 50) | st.sampled_from([2**31, 2**40, 2**63, 2**64 + 1]) | json_values
safetensors_headers = st.dictionaries(
    st.text(max_size=6) | st.just("__metadata__"),
    st.fixed_dictionaries({}, optional={"dtype": st_dtypes, "shape": st.lists(st_ints, max_size=3) | json_values,
                                        "data_offsets": st.lists(st_ints, max_size=3) | json_values}) | json_values,
    max_size=4)


@st.composite
def safetensors_files(draw):
    import struct

    kind = draw(st.sampled_from(["header", "mutated", "cut"]))
    if kind == "header":
        raw = json.dumps(draw(safetensors_headers)).encode()
        length = draw(st.sampled_from([len(raw), len(raw) + 1, len(raw) - 1, 0, 2**40])) if draw(st.booleans()) \
            else len(raw)
        return struct.pack("<Q", max(length, 0)) + raw + draw(st.binary(max_size=64))
    data = bytearray(ST_BYTES)
    if kind == "cut":
        return bytes(data[:draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


def fuzz_safetensors(folder, scale: int | None = None) -> None:
    import mlx.core as mx

    from poft_mlx.models.files import ModelFileError, check_safetensors

    path = folder / "fuzz.safetensors"

    @fuzz(200, scale=scale)
    @given(data=safetensors_files())
    def run(data):
        TRIED["model files: safetensors"] += 1
        path.write_bytes(data)
        try:
            header = check_safetensors(path)
        except ModelFileError as e:
            assert str(e).startswith(f"{path}: ")
            return
        loaded = mx.load(str(path))  # what the check passes, mlx reads
        assert set(loaded) <= set(header) - {"__metadata__"}

    run()


def test_safetensors_headers_raise_only_model_file_errors(folder):
    fuzz_safetensors(folder)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    from test_gguf_convert import write_tiny_gguf

    return open(write_tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf", "llama"), "rb").read()


def _header_end(data: bytes) -> int:
    import gguf

    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return int(gguf.GGUFReader(f.name).data_offset)


@st.composite
def gguf_files(draw, data: bytes, end: int):
    import struct

    out = bytearray(data)
    kind = draw(st.sampled_from(["bytes", "words", "cut"]))
    if kind == "cut":
        return bytes(out[:draw(st.integers(0, len(out)))])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, end - 1))  # the header: counts, lengths, types, dims, offsets
        if kind == "bytes":
            out[at] = draw(st.integers(0, 255))
        else:
            value = draw(st.sampled_from([0, 1, 5, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
            out[at:at + 8] = struct.pack("<Q", value)[: max(0, min(8, end - at))]
    return bytes(out)


def fuzz_gguf(folder, data: bytes, scale: int | None = None) -> None:
    import gguf

    from poft_mlx.models.files import ModelFileError, check_gguf

    path = folder / "fuzz.gguf"
    end = _header_end(data)

    @fuzz(200, scale=scale)
    @given(blob=gguf_files(data, end))
    def run(blob):
        TRIED["model files: GGUF"] += 1
        path.write_bytes(blob)
        try:
            check_gguf(path)
        except ModelFileError as e:
            assert str(e).startswith(f"{path}") and "\n" not in str(e)
            return
        reader = gguf.GGUFReader(path)  # what the check passes, gguf-py reads
        for t in reader.tensors:
            assert t.data.nbytes == t.n_bytes, t.name

    run()


def test_gguf_headers_raise_only_model_file_errors(folder, gguf_bytes):
    fuzz_gguf(folder, gguf_bytes)


# ---------------------------------------------------------------------------- at scale

SCALE = int(os.environ.get("POFT_FUZZ_SCALE", 0) or 7000)


@pytest.mark.fuzz_scale
def test_fuzz_at_scale(folder, monkeypatch, gguf_bytes):
    """Every fuzzer above with SCALE random inputs (POFT_FUZZ_SCALE, default 7000): 15 x 7000 + the 8 hostile
    YAML texts = 105,008."""
    import time

    start, before = time.monotonic(), sum(TRIED.values())
    for name in LINE_FUZZERS:
        fuzz_read_jsonl(folder, name, SCALE)
    for name in CONFIG_FUZZERS:
        fuzz_load_config(folder, name, SCALE)
    fuzz_overrides(SCALE)
    fuzz_cli_config(folder, SCALE)
    fuzz_cli_argv(folder, monkeypatch, SCALE)
    fuzz_safetensors(folder, SCALE)
    fuzz_gguf(folder, gguf_bytes, SCALE)
    total = sum(TRIED.values()) - before
    print(f"\nfuzz at scale: {total} inputs in {time.monotonic() - start:.0f} s, 0 tracebacks")
    assert total >= 100_000 or SCALE < 7000
