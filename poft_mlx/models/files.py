"""Checks on model files before anything parses, allocates or runs them (issue 18).

A model folder or GGUF comes from elsewhere (a download, a package, a colleague's disk) and may
be cut short, corrupt or hostile. Before mlx, tokenizers, transformers or gguf-py read one, these
checks read headers and small files only, bound every size by the file's own length, and raise
ModelFileError (errors.py: a PoftError, which the CLI prints as one line) naming the file and what is wrong:

- safetensors: the 8-byte little-endian header length, the JSON header, and for every tensor a
  known dtype, a shape of non-negative integers and data_offsets whose span is shape x dtype
  size, inside the file and not overlapping another tensor. A sharded folder's index must not
  name a missing shard.
- GGUF: the whole header (metadata and tensor infos) walked with bounds checks, without building
  anything: every string, array and count must fit in the bytes that follow; tensor types known,
  at most 4 dims, offsets aligned, data inside the file; then the hyper-parameters and tokenizer
  fields the converter relies on. gguf-py's reader runs only on a file that passed.
- config.json: an object with a model_type, and size fields (hidden_size, vocab_size, ...) that
  are integers between 1 and a bound no real model reaches.
- JSON side files (tokenizer.json, tokenizer_config.json, ...): JSON objects.
- chat templates: poft-mlx renders them only through transformers' apply_chat_template, which
  compiles them in jinja2's ImmutableSandboxedEnvironment; a template that reaches for dunder
  attributes (the way out of a sandbox: ''.__class__.__mro__, cycler.__init__.__globals__) is
  refused here already, naming the file. mlx-lm's chat_template_type / tool_parser_type must
  name one of its own modules.

Verdicts on large JSON files are cached per process and in the poft-mlx cache (keyed by path,
size and mtime), so a 33 MB tokenizer.json is parsed once, not on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ModelFileError

CHECKS_VERSION = 1


def _fail(path: str | os.PathLike[str], what: str) -> ModelFileError:
    return ModelFileError(f"{path}: {what}")


def _size_of(path: Path) -> int:
    """The file's size in bytes; ModelFileError naming it when it cannot be opened for reading."""
    try:
        with open(path, "rb"):
            return path.stat().st_size
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None


def human(n: int) -> str:
    """A byte count for messages: 1.0 TiB, 12.5 MiB, 873 bytes."""
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------------------- safetensors

SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors library's own limit
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a .safetensors file's header against its size; returns the header."""
    path = Path(path)
    size = _size_of(path)
    if size < 8:
        raise _fail(path, f"{size} bytes, shorter than a safetensors header length (8 bytes): the file is "
                          "truncated or not a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _fail(path, f"the header length field says {n} bytes but the file has only {size - 8} after it: "
                              "the file is truncated or not a safetensors file")
        if n > SAFETENSORS_HEADER_MAX:
            raise _fail(path, f"a {human(n)} header, more than safetensors allows ({human(SAFETENSORS_HEADER_MAX)})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"the {n}-byte header is not JSON ({_one_line(e)}): the file is corrupt or not a "
                          "safetensors file") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header is JSON {type(header).__name__}, not an object of tensors")
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise _fail(path, "__metadata__ is not an object")
            bad = next((k for k, v in info.items() if not isinstance(v, str)), None)
            if bad is not None:
                raise _fail(path, f"__metadata__ {bad[:60]!r} is not a string (safetensors metadata are strings)")
            continue
        where = f"tensor {name[:200]!r}"
        if not isinstance(info, dict):
            raise _fail(path, f"{where}: its entry is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_BITS:
            raise _fail(path, f"{where}: unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"{where}: shape {str(shape)[:80]} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _fail(path, f"{where}: data_offsets {str(offsets)[:80]} are not [begin, end] with 0 <= begin <= end")
        bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
        need = -(-bits // 8)
        begin, end = offsets
        desc = f"{where} ({dtype} {shape}, {human(need)})"
        if end - begin != need:
            raise _fail(path, f"{desc}: data_offsets {offsets} span {end - begin} bytes, but its dtype and shape "
                              f"need {need}")
        if end > data:
            raise _fail(path, f"{desc} ends at byte {end} of the data, past the end of the file ({data} bytes of "
                              "data after the header): the file is truncated (an incomplete download?) or corrupt")
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {n0[:200]!r} and {n1[:200]!r} overlap in the file")
    return header


# ------------------------------------------------------------------------------- JSON files

_JSON_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.json", "model.safetensors.index.json",
                    "preprocessor_config.json")
_BIG_JSON = 1 << 20  # verdicts on files above this are cached
_verdicts: dict[tuple[str, int, int], bool] = {}


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in `path`, or a ModelFileError saying why it is not one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _fail(path, f"not JSON: not UTF-8 text (byte {e.start} of {len(raw)})") from None
    except ValueError as e:
        raise _fail(path, f"not JSON ({_one_line(e)}; {human(len(raw))}): the file is corrupt or truncated") from None
    if not isinstance(value, dict):
        raise _fail(path, f"JSON {type(value).__name__}, expected an object")
    return value


def check_json_file(path: Path, cache_dir: Path | None = None) -> None:
    """read_json_object's verdict; for large files cached by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _verdicts.get(key):
        return
    stamp = None
    if stat.st_size > _BIG_JSON and cache_dir is not None:
        digest = hashlib.sha256(repr((CHECKS_VERSION, *key)).encode()).hexdigest()[:32]
        stamp = cache_dir / "checked" / f"{digest}.ok"
        if stamp.is_file():
            _verdicts[key] = True
            return
    read_json_object(path)
    _verdicts[key] = True
    if stamp is not None:
        with contextlib.suppress(OSError):
            stamp.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=stamp.parent, prefix=".ok.")
            os.close(fd)
            os.replace(tmp, stamp)


# ------------------------------------------------------------------------------- config.json

# (least, most): bounds no real model comes near (the largest today: vocabularies of ~262k,
# hidden sizes of ~25k, ~128 layers, contexts of ~10M tokens).
CONFIG_SIZES = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 20), "intermediate_size": (1, 1 << 22),
    "num_hidden_layers": (1, 1 << 12), "num_attention_heads": (1, 1 << 14), "num_key_value_heads": (1, 1 << 14),
    "head_dim": (1, 1 << 16), "max_position_embeddings": (1, 1 << 26), "moe_intermediate_size": (1, 1 << 22),
    "n_embd": (1, 1 << 20), "d_model": (1, 1 << 20), "n_layer": (1, 1 << 12), "num_layers": (1, 1 << 12),
    "n_head": (1, 1 << 14), "n_positions": (1, 1 << 26), "num_local_experts": (0, 1 << 16),
    "num_experts": (0, 1 << 16), "num_experts_per_tok": (0, 1 << 16), "sliding_window": (0, 1 << 26),
}  # fmt: skip
_MODULE_KEYS = {"chat_template_type": "mlx_lm.chat_templates", "tool_parser_type": "mlx_lm.tool_parsers"}


def check_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json: an object with a model_type and sane sizes; returns it."""
    path = Path(path)
    config = read_json_object(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise _fail(path, "no model_type (mlx-lm picks the architecture by it)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", model_type) or ".." in model_type:
        raise _fail(path, f"model_type {model_type[:60]!r} is not an architecture name")
    _check_sizes(path, config, "")
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(sub), dict):
            _check_sizes(path, config[sub], f"{sub}.")
    return config


def _check_sizes(path: Path, config: dict[str, Any], prefix: str) -> None:
    for key, (least, most) in CONFIG_SIZES.items():
        value = config.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) and value else [value]  # per-layer lists (OpenELM)
        for v in values:
            if not _is_int(v):
                raise _fail(path, f"{prefix}{key} is {repr(value)[:60]}, not an integer")
            if v < least:
                raise _fail(path, f"{prefix}{key} is {v}; it must be at least {least}")
            if v > most:
                raise _fail(path, f"{prefix}{key} is {v}, larger than any model's (the limit is {most}): "
                                  "the config is corrupt or hostile")


# ------------------------------------------------------------------------------- chat templates


def _escapes(name: Any) -> bool:
    """__class__, __globals__, _TemplateReference__context: dunders and name-mangled privates."""
    return isinstance(name, str) and name.startswith("_") and "__" in name


def check_template(template: Any, where: str) -> None:
    """Refuse a Jinja chat template that reaches for dunder or name-mangled attributes (sandbox escapes).

    Rendering happens only in transformers' ImmutableSandboxedEnvironment, which blocks these at
    run time too; this check names the file before any rendering. Unparsable templates pass:
    the renderer reports them when (if) they are used.
    """
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        for i, item in enumerate(template):
            if isinstance(item, dict):
                check_template(item.get("template"), f"{where} (template {item.get('name', i)!r})")
        return
    if not isinstance(template, str):
        return
    try:
        tree = ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError:
        return
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            name = getattr(node.args[0], "value", None)  # a constant name; built ones are the sandbox's
        elif isinstance(node, nodes.Name):
            name = node.name
        if _escapes(name):
            raise ModelFileError(
                f"{where}: the chat template reaches for {name!r} (line {node.lineno}), a way out of the "
                "template sandbox; refusing to use it"
            )


# ------------------------------------------------------------------------------- folders


def check_folder(folder: str | os.PathLike[str], *, cache_dir: Path | None = None) -> None:
    """Every model file in `folder` that a loader would read: see the module docstring."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        check_config(config)
    for name in _JSON_SIDE_FILES:
        if (folder / name).is_file():
            check_json_file(folder / name, cache_dir)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        cfg = read_json_object(tok_config)
        check_template(cfg.get("chat_template"), str(tok_config))
        for key, package in _MODULE_KEYS.items():
            _check_module_name(tok_config, key, cfg.get(key), package)
        _check_tokenizer_code(tok_config, cfg)
    if (folder / "chat_template.jinja").is_file():
        check_template((folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace"),
                       str(folder / "chat_template.jinja"))
    if (folder / "chat_template.json").is_file():
        check_template(read_json_object(folder / "chat_template.json").get("chat_template"),
                       str(folder / "chat_template.json"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if isinstance(weight_map, dict):
            for shard in sorted({str(v) for v in weight_map.values()}):
                if "/" in shard or "\\" in shard or shard.startswith(".") or not (folder / shard).is_file():
                    raise _fail(index, f"names the shard {shard[:100]!r}, which is not in the folder: an incomplete "
                                       "download?")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)


def _check_tokenizer_code(path: Path, cfg: dict[str, Any]) -> None:
    """A tokenizer that only custom code in the folder provides (auto_map) is refused.

    poft-mlx never passes trust_remote_code to the tokenizer: transformers would stop and ask on
    the terminal whether to run the folder's code (and run it on a 'y').
    """
    auto_map = cfg.get("auto_map")
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    if not entry:
        return
    import transformers  # lazy: seconds to import; only a tokenizer with an auto_map needs it

    name = cfg.get("tokenizer_class")
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z_]\w*", name) and hasattr(transformers, name):
        return  # transformers has the class itself and uses it without running the folder's code
    shown = next((e for e in entry if e), entry) if isinstance(entry, list) else entry
    raise _fail(path, f"the tokenizer is custom code in the folder (auto_map AutoTokenizer {str(shown)[:80]!r}); "
                      "poft-mlx runs no code from model files")


def _check_module_name(path: Path, key: str, value: Any, package: str) -> None:
    if value is None:
        return
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", value)
            and importlib.util.find_spec(f"{package}.{value}") is not None):
        raise _fail(path, f"{key} {str(value)[:60]!r} is not one of mlx-lm's {package.rsplit('.', 1)[1]}")


# ------------------------------------------------------------------------------- GGUF

GGUF_MAX_DIMS = 4
GGUF_MAX_KEY = 65535
GGUF_MAX_ARRAY = 1 << 22  # entries of one metadata array: above any vocabulary (262k today)
GGUF_MAX_ARRAY_TOTAL = 1 << 24  # entries of all arrays together (gguf-py keeps one numpy view per entry)
GGUF_MAX_NESTING = 3
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
            10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}  # fmt: skip
_STRING, _ARRAY = 8, 9
# GGUF hyper-parameters of the supported architectures: (least, most), as CONFIG_SIZES.
GGUF_SIZES = {
    "block_count": (1, 1 << 12), "embedding_length": (1, 1 << 20), "feed_forward_length": (1, 1 << 22),
    "attention.head_count": (1, 1 << 14), "attention.head_count_kv": (1, 1 << 14),
    "attention.key_length": (1, 1 << 16), "attention.value_length": (1, 1 << 16),
    "context_length": (1, 1 << 26), "attention.sliding_window": (0, 1 << 26),
    "attention.sliding_window_pattern": (1, 1 << 12),
}  # fmt: skip


class _Cursor:
    """Bounds-checked little- or big-endian reads from a mapped file."""

    def __init__(self, data: Any, path: Path, order: str) -> None:
        self.data, self.path, self.order, self.pos, self.size = data, path, order, 0, len(data)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _fail(self.path, f"{what} at byte {self.pos} needs {human(n)}, past the end of the file "
                                   f"({self.size} bytes): the file is truncated or corrupt")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.scalar("Q", 8, f"the length of {what}")
        if limit is not None and n > limit:
            raise _fail(self.path, f"{what} at byte {self.pos - 8} is {n} bytes long (at most {limit})")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return raw


def check_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Walk a GGUF's header with bounds checks, then check what the converter relies on.

    Returns {"metadata": scalar values and strings by key (arrays as their length),
    "array_types": item types of arrays, "tensors": {name: (dims, type name, offset, bytes)}}.
    """
    import gguf  # lazy: gguf-py only where a GGUF is checked

    path = Path(path)
    size = _size_of(path)
    if size < 24:
        raise _fail(path, f"{size} bytes, shorter than a GGUF header (24 bytes): truncated or not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise _fail(path, "not a GGUF file (no GGUF magic)")
        (version,) = struct.unpack_from("<I", data, 4)
        order = "<"
        if version & 0xFFFF == 0:  # written on a big-endian machine, as gguf-py reads it
            order = ">"
            (version,) = struct.unpack_from(">I", data, 4)
        if version not in (2, 3):
            raise _fail(path, f"GGUF version {version} (supported: 2, 3)")
        cur = _Cursor(data, path, order)
        cur.pos = 8
        n_tensors = cur.scalar("Q", 8, "the tensor count")
        n_kv = cur.scalar("Q", 8, "the metadata count")
        if n_kv > (size - cur.pos) // 13:  # the smallest entry: key length, type, one byte
            raise _fail(path, f"declares {n_kv} metadata entries; {size} bytes cannot hold that many: the file is "
                              "truncated or corrupt")
        if n_tensors > (size - cur.pos) // 24:  # name length, n_dims, one dim, type, offset
            raise _fail(path, f"declares {n_tensors} tensors; {size} bytes cannot hold that many: the file is "
                              "truncated or corrupt")
        meta: dict[str, Any] = {}
        array_types: dict[str, int] = {}
        budget = [GGUF_MAX_ARRAY_TOTAL]
        for _ in range(n_kv):
            key = _utf8(path, cur.string("a metadata key", GGUF_MAX_KEY), "a metadata key")
            if key in meta:
                raise _fail(path, f"metadata key {key[:100]!r} appears twice")
            vtype = cur.scalar("I", 4, f"the type of {key!r}")
            meta[key] = _gguf_value(cur, vtype, key, 0, budget, array_types)
        alignment = meta.get("general.alignment", 32)
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise _fail(path, f"general.alignment {alignment!r} is not a power of two")
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = _utf8(path, cur.string(f"the name of tensor {i}", 1 << 16), f"the name of tensor {i}")
            if name in names:
                raise _fail(path, f"tensor {name[:100]!r} appears twice")
            names.add(name)
            n_dims = cur.scalar("I", 4, f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= GGUF_MAX_DIMS:
                raise _fail(path, f"tensor {name[:100]!r} declares {n_dims} dimensions (1 to {GGUF_MAX_DIMS})")
            dims = [cur.scalar("Q", 8, f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
            raw_type = cur.scalar("I", 4, f"the type of tensor {name!r}")
            offset = cur.scalar("Q", 8, f"the offset of tensor {name!r}")
            infos.append((name, dims, raw_type, offset))
        start = -(-cur.pos // alignment) * alignment
        tensors = {}
        for name, dims, raw_type, offset in infos:
            where = f"tensor {name[:100]!r}"
            try:
                qtype = gguf.GGMLQuantizationType(raw_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise _fail(path, f"{where} has unknown type {raw_type}") from None
            shape = " x ".join(str(d) for d in dims)
            if dims[0] % block:
                raise _fail(path, f"{where} ({qtype.name} {shape}): its first dimension is not a multiple of the "
                                  f"{qtype.name} block ({block})")
            n_bytes = math.prod(dims) // block * type_size
            desc = f"{where} ({qtype.name} {shape}, {human(n_bytes)})"
            if offset % alignment:
                raise _fail(path, f"{desc}: offset {offset} is not a multiple of the alignment {alignment}")
            if start + offset + n_bytes > size:
                raise _fail(path, f"{desc} at data offset {offset} ends {human(start + offset + n_bytes - size)} past "
                                  f"the end of the file ({size} bytes): the file is truncated or corrupt")
            tensors[name] = (dims, qtype.name, offset, n_bytes)
    summary = {"metadata": meta, "array_types": array_types, "tensors": tensors}
    _check_gguf_model(path, summary)
    return summary


def _gguf_value(cur: _Cursor, vtype: int, key: str, depth: int, budget: list[int], array_types: dict) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return cur.scalar(fmt, size, f"the value of {key!r}")
    if vtype == _STRING:
        return _utf8(cur.path, cur.string(f"the value of {key!r}"), f"the value of {key!r}")
    if vtype != _ARRAY:
        raise _fail(cur.path, f"metadata {key[:100]!r} has unknown type {vtype}")
    if depth >= GGUF_MAX_NESTING:
        raise _fail(cur.path, f"metadata {key[:100]!r} nests arrays more than {GGUF_MAX_NESTING} deep")
    itype = cur.scalar("I", 4, f"the item type of {key!r}")
    count = cur.scalar("Q", 8, f"the length of {key!r}")
    smallest = _SCALARS[itype][1] if itype in _SCALARS else 8 if itype == _STRING else 12 if itype == _ARRAY else None
    if smallest is None:
        raise _fail(cur.path, f"metadata {key[:100]!r} is an array of unknown type {itype}")
    if count > (cur.size - cur.pos) // smallest:
        raise _fail(cur.path, f"metadata {key[:100]!r} declares {count} entries, more than the "
                              f"{cur.size - cur.pos} bytes left in the file can hold: the file is truncated or corrupt")
    if count > GGUF_MAX_ARRAY or count > budget[0]:
        raise _fail(cur.path, f"metadata {key[:100]!r} declares {count} entries (at most {GGUF_MAX_ARRAY} per "
                              f"array, {GGUF_MAX_ARRAY_TOTAL} in all)")
    budget[0] -= count
    if depth == 0:
        array_types[key] = itype
    if itype in _SCALARS:
        cur.pos += count * smallest
        return count
    if itype == _STRING:
        for i in range(count):
            n = cur.scalar("Q", 8, f"the length of {key!r}[{i}]")
            cur.need(n, f"{key!r}[{i}] ({n} bytes)")
            cur.pos += n
        return count
    for i in range(count):
        _gguf_value(cur, _ARRAY, f"{key}[{i}]", depth + 1, budget, array_types)
    return count


def _utf8(path: Path, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, f"{what} is not UTF-8 text") from None


def _check_gguf_model(path: Path, summary: dict[str, Any]) -> None:
    """The hyper-parameters and tokenizer fields convert_gguf uses, for the architectures it knows."""
    meta, tensors, array_types = summary["metadata"], summary["tensors"], summary["array_types"]
    check_template(meta.get("tokenizer.chat_template"), f"{path} (tokenizer.chat_template)")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return  # the converter names the missing or unsupported architecture
    for suffix, (least, most) in GGUF_SIZES.items():
        key = f"{arch}.{suffix}"
        if key not in meta:
            continue
        value = meta[key]
        if key in array_types:
            continue  # per-layer arrays: the converter refuses them by name
        if not _is_int(value):
            raise _fail(path, f"{key} is {repr(value)[:60]}, not an integer")
        if not least <= value <= most:
            raise _fail(path, f"{key} is {value}, outside {least}..{most}: the file is corrupt or hostile")
    hidden, heads = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    kv = meta.get(f"{arch}.attention.head_count_kv")
    if _is_int(hidden) and _is_int(heads) and f"{arch}.attention.key_length" not in meta and hidden % heads:
        raise _fail(path, f"{arch}.embedding_length {hidden} is not a multiple of {arch}.attention.head_count {heads}")
    if _is_int(heads) and _is_int(kv) and heads % kv:
        raise _fail(path, f"{arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv}")
    embd = tensors.get("token_embd.weight")
    if embd is not None and _is_int(hidden) and (len(embd[0]) != 2 or embd[0][0] != hidden):
        raise _fail(path, f"tensor 'token_embd.weight' is {' x '.join(map(str, embd[0]))}, which does not fit "
                          f"{arch}.embedding_length {hidden}")
    n_tokens = meta.get("tokenizer.ggml.tokens")
    if "tokenizer.ggml.tokens" in meta:
        if array_types.get("tokenizer.ggml.tokens") != _STRING or not n_tokens:
            raise _fail(path, "tokenizer.ggml.tokens is not a non-empty list of strings")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in meta and meta[key] != n_tokens:
                raise _fail(path, f"{key} has {meta[key]} entries for {n_tokens} tokens")
        for name in ("bos", "eos", "padding", "unknown", "eot", "eom", "sep", "cls", "mask"):
            key = f"tokenizer.ggml.{name}_token_id"
            value = meta.get(key)
            if value is not None and (not _is_int(value) or not 0 <= value < n_tokens):
                raise _fail(path, f"{key} is {value}, not a token id (the vocabulary has {n_tokens} tokens)")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


__all__ = [
    "ModelFileError",
    "check_config",
    "check_folder",
    "check_gguf",
    "check_json_file",
    "check_safetensors",
    "check_template",
    "read_json_object",
]
