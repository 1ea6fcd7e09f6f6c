"""Hostile and broken model files (poft_mlx.models.files, issue 18): one clear error, bounded memory, no code run.

Each case corrupts a copy of a tiny model folder or GGUF and runs `poft-mlx convert` on it (the
command reads the source through the same checks as every loader): it must end with exit code
1 and one line `Error: <file>: <what is wrong>`, without a traceback and without writing the
output folder. The memory test runs the absurd-size cases in a subprocess and compares its peak
RSS with the one it had before them. Chat templates are rendered only by transformers in
jinja2's ImmutableSandboxedEnvironment; escapes the static check cannot see are stopped there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from test_gguf_convert import write_tiny_gguf
from tiny import make_model

from poft_mlx.cli.main import main
from poft_mlx.models.files import ModelFileError, check_template

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- hostile inputs


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _safetensors(folder: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _cut(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


# name: (how to break a copy of a good folder, the file named, what the error must say)
FOLDER_CASES = {
    "safetensors cut in half": (lambda d: _cut(d / "model.safetensors", lambda n: n // 2),
                                "model.safetensors", "past the end of the file"),
    "safetensors of 5 bytes": (lambda d: _cut(d / "model.safetensors", lambda n: 5),
                               "model.safetensors", "shorter than a safetensors header length"),
    "safetensors header length past the end": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}"),
        "model.safetensors", "the header length field says 1099511627776 bytes"),
    "safetensors header not JSON": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 6) + b"\xff\xfe{]]]"),
        "model.safetensors", "header is not JSON"),
    "safetensors declares a 1 TiB tensor": (
        lambda d: _safetensors(d, {"w": {"dtype": "F32", "shape": [2**20, 2**18], "data_offsets": [0, 2**40]}}),
        "model.safetensors", "(F32 [1048576, 262144], 1.0 TiB) ends at byte 1099511627776"),
    "safetensors shape and offsets disagree": (
        lambda d: _safetensors(d, {"w": {"dtype": "F32", "shape": [2**20, 2**18], "data_offsets": [0, 16]}},
                               b"\0" * 16),
        "model.safetensors", "span 16 bytes, but its dtype and shape need 1099511627776"),
    "safetensors negative shape": (
        lambda d: _safetensors(d, {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
        "model.safetensors", "shape [-4] is not a list of non-negative integers"),
    "safetensors unknown dtype": (
        lambda d: _safetensors(d, {"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
        "model.safetensors", "unknown dtype 'Q99'"),
    "safetensors overlapping tensors": (
        lambda d: _safetensors(d, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                   "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
        "model.safetensors", "tensors 'a' and 'b' overlap"),
    "index names a missing shard": (
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})),
        "model.safetensors.index.json",
        "names the shard 'model-00002-of-00002.safetensors', which is not in the folder"),
    "config.json negative hidden_size": (lambda d: _edit_json(d / "config.json", hidden_size=-32),
                                         "config.json", "hidden_size is -32; it must be at least 1"),
    "config.json zero layers": (lambda d: _edit_json(d / "config.json", num_hidden_layers=0),
                                "config.json", "num_hidden_layers is 0; it must be at least 1"),
    "config.json enormous vocab_size": (lambda d: _edit_json(d / "config.json", vocab_size=2**40),
                                        "config.json", "vocab_size is 1099511627776, larger than any model's"),
    "config.json a million layers": (lambda d: _edit_json(d / "config.json", num_hidden_layers=10**6),
                                     "config.json", "num_hidden_layers is 1000000, larger than any model's"),
    "config.json enormous intermediate_size": (lambda d: _edit_json(d / "config.json", intermediate_size=10**15),
                                               "config.json", "intermediate_size is 1000000000000000, larger than"),
    "config.json string size": (lambda d: _edit_json(d / "config.json", num_attention_heads="4"),
                                "config.json", "num_attention_heads is '4', not an integer"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("model_type: llama\n"),
                             "config.json", "not JSON"),
    "config.json without model_type": (lambda d: (d / "config.json").write_text('{"hidden_size": 32}'),
                                       "config.json", "no model_type"),
    "config.json path in model_type": (lambda d: _edit_json(d / "config.json", model_type="../../evil"),
                                       "config.json", "model_type '../../evil' is not an architecture name"),
    "tokenizer.json an HTML error page": (lambda d: (d / "tokenizer.json").write_text("<html>502 Bad Gateway</html>"),
                                          "tokenizer.json", "not JSON (Expecting value: line 1 column 1"),
    "tokenizer.json cut short": (lambda d: _cut(d / "tokenizer.json", lambda n: n // 2),
                                 "tokenizer.json", "not JSON"),
    "tokenizer.json binary": (lambda d: (d / "tokenizer.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff"),
                              "tokenizer.json", "not JSON: not UTF-8 text"),
    "tokenizer.json a JSON list": (lambda d: (d / "tokenizer.json").write_text("[1, 2]"),
                                   "tokenizer.json", "JSON list, expected an object"),
    "tokenizer_config.json not JSON": (lambda d: (d / "tokenizer_config.json").write_text("{'a': 1"),
                                       "tokenizer_config.json", "not JSON"),
    "chat template escapes the sandbox": (
        lambda d: _edit_json(d / "tokenizer_config.json",
                             chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}"),
        "tokenizer_config.json", "the chat template reaches for '__subclasses__'"),
    "chat_template.jinja reaches for globals": (
        lambda d: (d / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.popen('id').read() }}"),
        "chat_template.jinja", "reaches for '__globals__'"),
    "chat template via attr filter": (
        lambda d: _edit_json(d / "tokenizer_config.json", chat_template="{{ messages|attr('__class__') }}"),
        "tokenizer_config.json", "reaches for '__class__'"),
    "custom tokenizer code (auto_map)": (
        lambda d: (_edit_json(d / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
                              auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}),
                   (d / "tokenization_evil.py").write_text(f"open({str(d / 'RAN')!r}, 'w').close()\n")),
        "tokenizer_config.json", "the tokenizer is custom code in the folder"),
    "mlx-lm chat_template_type outside its package": (
        lambda d: _edit_json(d / "tokenizer_config.json", chat_template_type="os"),
        "tokenizer_config.json", "chat_template_type 'os' is not one of mlx-lm's chat_templates"),
}


def _tensor_info(reader, name: str):
    return next(t for t in reader.tensors if t.name == name).field.parts


def _scalar(reader, key: str):
    return reader.fields[key].parts[-1]


# name: (edit of a good GGUF opened with gguf-py read-write, or of its bytes; what the error must say)
GGUF_CASES = {
    "a 2^31 x 2^20 float32 tensor": (
        lambda r: _tensor_info(r, "token_embd.weight")[3].__setitem__(slice(None), [2**20, 2**31]),
        "tensor 'token_embd.weight' (F32 1048576 x 2147483648, 8.0 PiB) at data offset 0 ends 8.0 PiB past the end"),
    "5 dimensions": (lambda r: _tensor_info(r, "token_embd.weight")[2].__setitem__(0, 5),
                     "tensor 'token_embd.weight' declares 5 dimensions (1 to 4)"),
    "unknown tensor type": (lambda r: _tensor_info(r, "token_embd.weight")[4].__setitem__(0, 99),
                            "tensor 'token_embd.weight' has unknown type 99"),
    "offset past the end": (lambda r: _tensor_info(r, "output_norm.weight")[5].__setitem__(0, 2**50),
                            "tensor 'output_norm.weight' (F32 64, 256 bytes) at data offset 1125899906842624 ends"),
    "unaligned offset": (lambda r: _tensor_info(r, "output_norm.weight")[5].__setitem__(
        0, int(_tensor_info(r, "output_norm.weight")[5][0]) + 4), "is not a multiple of the alignment 32"),
    "2^40 tensors": (lambda r: r.fields["GGUF.tensor_count"].parts[0].__setitem__(0, 2**40),
                     "declares 1099511627776 tensors"),
    "2^40 metadata entries": (lambda r: r.fields["GGUF.kv_count"].parts[0].__setitem__(0, 2**40),
                              "declares 1099511627776 metadata entries"),
    "a 2^40-entry token list": (lambda r: r.fields["tokenizer.ggml.tokens"].parts[4].__setitem__(0, 2**40),
                                "metadata 'tokenizer.ggml.tokens' declares 1099511627776 entries"),
    "a 2^62-byte string": (lambda r: r.fields["general.architecture"].parts[3].__setitem__(0, 2**62),
                           "the value of 'general.architecture' (4611686018427387904 bytes) at byte"),
    "2^32-1 layers": (lambda r: _scalar(r, "llama.block_count").__setitem__(0, 2**32 - 1),
                      "llama.block_count is 4294967295, outside 1..4096"),
    "0 attention heads": (lambda r: _scalar(r, "llama.attention.head_count").__setitem__(0, 0),
                          "llama.attention.head_count is 0, outside 1..16384"),
    "hidden size not a multiple of the heads": (lambda r: _scalar(r, "llama.attention.head_count").__setitem__(0, 3),
                                                "llama.embedding_length 64 is not a multiple of"),
    "embedding size against the metadata": (lambda r: _scalar(r, "llama.embedding_length").__setitem__(0, 128),
                                            "tensor 'token_embd.weight' is 64 x 267, which does not fit"),
    "bos id past the vocabulary": (lambda r: _scalar(r, "tokenizer.ggml.bos_token_id").__setitem__(0, 10**6),
                                   "tokenizer.ggml.bos_token_id is 1000000, not a token id (the vocabulary has 267"),
    "a token-type count that shifts the header": (
        lambda r: r.fields["tokenizer.ggml.token_type"].parts[4].__setitem__(0, 5),
        "the name of tensor 0 at byte 3511 is 4294967297 bytes long (at most 65536)"),
    "token types of another length": ("types", "tokenizer.ggml.token_type has 5 entries for 267 tokens"),
    "cut in half": ("cut", "past the end of the file"),
    "cut inside the header": ("head", "cannot hold that many: the file is truncated or corrupt"),
}
ESCAPE = "{{ cycler.__init__.__globals__.os.popen('touch SENTINEL').read() }}"


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("good") / "model")


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> Path:
    return Path(write_tiny_gguf(tmp_path_factory.mktemp("good") / "good.gguf", "llama"))


def broken_folder(good: Path, dest: Path, case: str) -> Path:
    shutil.copytree(good, dest)
    FOLDER_CASES[case][0](dest)
    return dest


def broken_gguf(good: Path, dest: Path, case: str) -> Path:
    edit = GGUF_CASES[case][0]
    if edit == "types":  # written so, not edited: the lengths stay consistent in the file
        real = gguf.GGUFWriter.add_token_types
        try:
            gguf.GGUFWriter.add_token_types = lambda self, types: real(self, types[:5])
            return Path(write_tiny_gguf(dest, "llama"))
        finally:
            gguf.GGUFWriter.add_token_types = real
    shutil.copy(good, dest)
    if edit in ("cut", "head"):
        _cut(dest, (lambda n: n // 2) if edit == "cut" else (lambda n: 200))
    else:
        reader = gguf.GGUFReader(dest, "r+")
        edit(reader)
        reader.data.flush()
        del reader
    return dest


def convert_error(source: Path, out: Path) -> str:
    """`poft-mlx convert source out`'s output, checked to be one error line and nothing written."""
    result = CliRunner().invoke(main, ["convert", str(source), str(out)])
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line and not line.startswith("[INFO]")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and not out.exists()
    return lines[0]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_broken_model_folder_is_one_clear_error(good_folder, tmp_path, case):
    folder = broken_folder(good_folder, tmp_path / "model", case)
    _, file, says = FOLDER_CASES[case]
    line = convert_error(folder, tmp_path / "out")
    assert line.startswith(f"Error: {folder / file}: ") and says in line, line
    assert not (folder / "RAN").exists(), "code from the folder ran"


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_broken_gguf_is_one_clear_error(good_gguf, tmp_path, case):
    path = broken_gguf(good_gguf, tmp_path / "broken.gguf", case)
    line = convert_error(path, tmp_path / "out")
    assert line.startswith(f"Error: {path}: ") and GGUF_CASES[case][1] in line, line


def test_gguf_chat_template_escape_is_refused(tmp_path):
    template = ESCAPE.replace("SENTINEL", str(tmp_path / "RAN"))
    path = Path(write_tiny_gguf(tmp_path / "t.gguf", "llama", template=template))
    line = convert_error(path, tmp_path / "out")
    assert line.startswith(f"Error: {path} (tokenizer.chat_template): the chat template reaches for '__globals__'")
    assert not (tmp_path / "RAN").exists()
    other = tmp_path / "other.jinja"
    other.write_text(ESCAPE)
    good = write_tiny_gguf(tmp_path / "good.gguf", "llama")
    result = CliRunner().invoke(main, ["convert", good, str(tmp_path / "out2"), "--chat-template", str(other)])
    assert result.exit_code == 1
    assert "the chat template given: the chat template reaches for '__globals__'" in result.output


def test_loaders_check_before_mlx_reads(good_folder, tmp_path, monkeypatch):
    """modeling.load (train, score, eval) and fuse's base load refuse before mlx opens a file."""
    import mlx.core as mx

    from poft_mlx.export import fuse as export
    from poft_mlx.export.run import load_run_model
    from poft_mlx.models import modeling

    folder = broken_folder(good_folder, tmp_path / "model", "safetensors cut in half")

    def no_load(*args, **kwargs):
        raise AssertionError("mlx read the file")

    monkeypatch.setattr(mx, "load", no_load)
    with pytest.raises(ModelFileError, match=re.escape(str(folder / "model.safetensors")) + ": tensor .* past the end"):
        modeling.load(str(folder))
    run = export.Run(tmp_path / "run", tmp_path / "run" / "adapters", {}, folder)
    with pytest.raises(export.ExportError, match="cannot load base model .*past the end"):
        load_run_model(run, with_adapter=False)


def test_good_files_pass_and_load(good_folder, good_gguf, tmp_path):
    from poft_mlx.models import modeling
    from poft_mlx.models.refs import resolve_model

    assert modeling.load(str(good_folder)).path == good_folder
    assert (resolve_model(str(good_gguf)) / "model.safetensors").is_file()


def test_memory_stays_bounded(good_folder, good_gguf, tmp_path):
    """The absurd sizes are refused from their headers: peak RSS barely moves in a fresh process.

    Unchecked, the million-layer config makes mlx-lm build a million blocks (std::bad_alloc under
    an 8 GB limit); the process runs under a 16 GB address-space limit on the CPU backend so that
    a regression fails here instead of exhausting the machine.
    """
    folder_cases = ["safetensors declares a 1 TiB tensor", "safetensors header length past the end",
                    "config.json enormous vocab_size", "config.json a million layers"]
    gguf_cases = ["a 2^31 x 2^20 float32 tensor", "a 2^40-entry token list", "2^40 tensors", "2^32-1 layers"]
    sources = [broken_folder(good_folder, tmp_path / f"f{i}", c) for i, c in enumerate(folder_cases)]
    sources += [broken_gguf(good_gguf, tmp_path / f"g{i}.gguf", c) for i, c in enumerate(gguf_cases)]
    script = (
        "import resource, sys\nfrom click.testing import CliRunner\nfrom poft_mlx.cli.main import main\n"
        "import poft_mlx.models.refs, poft_mlx.models.gguf\nfrom poft_mlx.runtime.device import backend\n"
        "if backend() == 'cpu':\n    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for i, src in enumerate(sys.argv[1:]):\n"
        "    r = CliRunner().invoke(main, ['convert', src, src + '.out'])\n"
        "    assert r.exit_code == 1 and r.output.startswith('Error: '), r.output\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *map(str, sources)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env={**os.environ, "POFT_MLX_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = (int(x) for x in out.stdout.split()[-2:])
    assert after - before < 64 * 1024, f"peak RSS grew by {(after - before) / 1024:.0f} MiB"  # KiB on Linux


def test_templates_render_only_in_a_sandbox():
    """poft-mlx renders through transformers' apply_chat_template, which compiles in the sandbox;
    no poft-mlx module builds a Jinja environment of its own."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    assert isinstance(_compile_jinja_template("{{ 1 }}").environment, ImmutableSandboxedEnvironment)
    for path in sorted((ROOT / "poft_mlx").glob("*.py")):
        text = path.read_text()
        for pattern in (r"jinja2\.Environment\b", r"from jinja2 import .*\bEnvironment\b", r"\bjinja2\.Template\b",
                        r"from jinja2 import .*\bTemplate\b(?!Error)", r"\.from_string\(", r"NativeEnvironment"):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


# Escapes whose names are built at render time: no static check can see them; the sandbox stops them.
HIDDEN_ESCAPES = [
    "{% set u = '_' * 2 %}{{ (cycler|attr(u ~ 'init' ~ u)|attr(u ~ 'globals' ~ u))['os'].system('touch SENTINEL') }}",
    "{% set u = '_' * 2 %}{{ (''|attr(u ~ 'class' ~ u)|attr(u ~ 'mro' ~ u))[1]|attr(u ~ 'subclasses' ~ u) }}",
    "{% set u = '_' * 2 %}{{ (lipsum|attr(u ~ 'globals' ~ u))['os'].popen('touch SENTINEL').read() }}",
    "{% set u = '_' * 2 %}{{ messages.append|attr(u ~ 'self' ~ u) }}{{ messages.append(1) }}",
]


@pytest.mark.parametrize("template", HIDDEN_ESCAPES)
def test_escapes_the_check_cannot_see_are_stopped_by_the_sandbox(tmp_path, template):
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.data.records import Sample
    from poft_mlx.models.refs import resolve_model
    from poft_mlx.data.render import Renderer, TemplateError

    template = template.replace("SENTINEL", str(tmp_path / "RAN"))
    check_template(template, "t")  # passes: nothing to see before rendering
    folder = make_model(tmp_path / "m", template=template)
    renderer = Renderer(load_tokenizer(resolve_model(str(folder))), label="target m")
    sample = Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "t.jsonl:1")
    with pytest.raises(TemplateError, match=r"^target m: the chat template failed \((SecurityError|UndefinedError)"):
        renderer.encode(sample)
    assert not (tmp_path / "RAN").exists()


def test_unparsable_template_is_left_to_the_renderer():
    check_template("{% if %}", "t")  # a syntax error is reported where it is used, with a config override possible
    with pytest.raises(ModelFileError, match=r"^t \(template 'tool_use'\): the chat template reaches for '__class__'"):
        check_template([{"name": "default", "template": "{{ 1 }}"},
                        {"name": "tool_use", "template": "{{ x.__class__ }}"}], "t")
