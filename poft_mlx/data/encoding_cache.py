"""Encoded data sets on disk: a second run, a --resume, a scoring pass pays no tokenization again.

An entry is one data source prepared for one tokenizer: every record's fate (ok, truncated,
shortened, dropped), the fitted text of the records that were cut, and the kept records'
tokens and masks as flat arrays (memory-mapped when read back, so 100k records cost no Python
objects). Its folder is named by a hash of everything that changes the encodings (key_desc):
the data's content fingerprint (sources.fingerprint), the tokenizer (tokenizer_identity: its
whole tokenizer.json, special tokens, class), the chat template text and its arguments, the
span, max_seq_length, the overlength policy, this module's ENCODING_FORMAT and the versions of
the libraries that render and tokenize. An entry is written into a temporary folder and renamed
into place whole; reading one checks its description, its record count, every file's size and
CRC-32, and any mismatch (a stale format, a torn or edited file) is logged, removed and rebuilt,
never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import weakref
import zlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from ..runtime import diskspace
from .render import Encoded

ENCODING_FORMAT = 1
STATUSES = ("ok", "truncated", "shortened", "dropped")
_FILES = {"tokens": np.int32, "mask": np.uint8, "bounds": np.int64, "status": np.uint8}


def home() -> Path:
    """poft-mlx's cache folder (POFT_MLX_HOME, default ~/.cache/poft-mlx): scores, encodings, models."""
    return Path(os.environ.get("POFT_MLX_HOME", Path.home() / ".cache" / "poft-mlx"))


def content_key(desc: dict) -> str:
    """A cache folder's name: the hash of its description (every field counts)."""
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_identity(tok) -> str:
    """sha256 of what decides a tokenizer's output: its serialised pipeline and vocabulary (the
    whole tokenizer.json of a fast tokenizer, else its vocabulary), special tokens and class."""
    tok = getattr(tok, "_tokenizer", tok)
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = {"class": type(tok).__name__, "special": getattr(tok, "special_tokens_map", {}),
             "split_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
             "added_special": sorted(int(i) for i, t in (getattr(tok, "added_tokens_decoder", {}) or {}).items()
                                     if getattr(t, "special", False))}
    h = hashlib.sha256(body.encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


# tokenizer_identity per Renderer: a Renderer reads its tokenizer once, when made (its special tokens), so a
# train and a valid split, or each file a scoring pass prepares, hash that tokenizer once (up to 1 s for Gemma's).
_IDENTITIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def renderer_identity(renderer) -> str:
    """tokenizer_identity(renderer.tok), computed once per renderer."""
    got = _IDENTITIES.get(renderer)
    if got is None:
        got = _IDENTITIES[renderer] = tokenizer_identity(renderer.tok)
    return got


def _versions() -> dict:
    out = {}
    for name in ("transformers", "tokenizers", "jinja2"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def key_desc(data_fingerprint: str, renderer, *, key: str, max_len: int, policy: str, earlier_replies: bool) -> dict:
    return {"format": ENCODING_FORMAT, "data": data_fingerprint, "key": key,
            "tokenizer": renderer_identity(renderer),
            "template_sha256": hashlib.sha256((renderer.template or "").encode()).hexdigest(),
            "template_kwargs": renderer.kwargs, "span": renderer.span, "max_seq_length": max_len,
            "overlength": policy, "earlier_replies": earlier_replies, "versions": _versions()}


class EncodingTable(Sequence):
    """A list of Encoded over flat arrays: tokens int32 [T], mask [T], bounds int64 [N + 1]."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, bounds: np.ndarray):
        self.tokens, self.mask, self.bounds = tokens, mask, bounds

    @classmethod
    def of(cls, encodings: list[Encoded]) -> "EncodingTable":
        bounds = np.zeros(len(encodings) + 1, np.int64)
        bounds[1:] = np.cumsum([len(e.tokens) for e in encodings])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(cat([e.tokens for e in encodings], np.int32), cat([e.mask for e in encodings], bool), bounds)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.bounds[i]), int(self.bounds[i + 1])
        return Encoded(np.asarray(self.tokens[a:b]), np.asarray(self.mask[a:b], dtype=bool))

    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def supervised(self) -> np.ndarray:
        """Supervised tokens per record after its first (mask[1:].sum()), float64 [N]."""
        c = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        first = np.asarray(self.mask[self.bounds[:-1][self.lengths() > 0]], np.int64)
        out = (c[self.bounds[1:]] - c[self.bounds[:-1]]).astype(np.float64)
        out[self.lengths() > 0] -= first
        return out


class Entry:
    """What an entry holds: each record's status, the cut records' fitted text, the table."""

    def __init__(self, status: np.ndarray, fitted: dict[int, dict], table: EncodingTable):
        self.status, self.fitted, self.table = status, fitted, table


class EncodingCache:
    """The entry of one (data, tokenizer, settings) description under `root`; see the module docstring."""

    def __init__(self, root: str | Path, desc: dict):
        self.root, self.desc = Path(root), desc
        self.dir = self.root / content_key(desc)
        self.problem: str | None = None  # why an existing entry was not used

    def load(self, n_records: int) -> Entry | None:
        """The entry, checked whole; None (and self.problem, the entry removed) when absent or bad."""
        if not self.dir.is_dir():
            return None
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
            if meta.get("desc") != json.loads(json.dumps(self.desc)):
                raise ValueError("its description differs")
            if meta.get("records") != n_records:
                raise ValueError(f"it has {meta.get('records')} records, the data {n_records}")
            for name in (*_FILES, "fitted"):
                path = self.dir / _file(name)
                if path.stat().st_size != meta["sizes"][name] or _crc(path) != meta["crc32"][name]:
                    raise ValueError(f"{path.name} does not match its checksum")
            arrays = {n: np.memmap(self.dir / _file(n), dt, "r") if meta["sizes"][n] else np.zeros(0, dt)
                      for n, dt in _FILES.items()}
            fitted = {int(k): v for k, v in json.loads((self.dir / "fitted.json").read_text()).items()}
            table = EncodingTable(arrays["tokens"], arrays["mask"].view(bool), arrays["bounds"])
            if len(arrays["status"]) != n_records or len(table) != int(np.isin(arrays["status"], (0, 1, 2)).sum()):
                raise ValueError("its arrays disagree")
            return Entry(np.asarray(arrays["status"]), fitted, table)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.problem = f"encoding cache {self.dir}: {e}; rebuilt"
            shutil.rmtree(self.dir, ignore_errors=True)
            return None

    def writer(self) -> "Writer":
        return Writer(self)


class Writer:
    """Streams an entry into a temporary folder; commit() renames it into place (atomic)."""

    def __init__(self, cache: EncodingCache):
        self.cache = cache
        cache.root.mkdir(parents=True, exist_ok=True)
        self.tmp = cache.root / f".tmp-{uuid.uuid4().hex}"
        self.tmp.mkdir()
        self.files = {n: open(self.tmp / _file(n), "wb") for n in ("tokens", "mask", "status")}
        self.bounds = [0]
        self.fitted: dict[int, dict] = {}
        self.count = 0

    def add(self, original, fitted, enc, status: str) -> None:
        self._write("status", np.array([STATUSES.index(status)], np.uint8))
        if fitted is not None:
            self._write("tokens", np.asarray(enc.tokens, np.int32))
            self._write("mask", np.asarray(enc.mask, np.uint8))
            self.bounds.append(self.bounds[-1] + len(enc.tokens))
            if fitted is not original:
                self.fitted[self.count] = {"text": fitted.text, "messages": fitted.messages, "meta": fitted.meta}
        self.count += 1

    def _write(self, name: str, arr: np.ndarray) -> None:
        with diskspace.writing(self.tmp / _file(name), arr.nbytes, "the encoding cache is unchanged"):
            self.files[name].write(arr.tobytes())

    def commit(self) -> Entry:
        for fh in self.files.values():
            fh.close()
        bounds = np.asarray(self.bounds, np.int64)
        fitted = json.dumps(self.fitted)
        with diskspace.writing(self.tmp, bounds.nbytes + len(fitted), "the encoding cache is unchanged"):
            (self.tmp / _file("bounds")).write_bytes(bounds.tobytes())
            (self.tmp / "fitted.json").write_text(fitted)
            names = (*_FILES, "fitted")
            meta = {"desc": self.cache.desc, "records": self.count,
                    "sizes": {n: (self.tmp / _file(n)).stat().st_size for n in names},
                    "crc32": {n: _crc(self.tmp / _file(n)) for n in names}}
            (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.replace(self.tmp, self.cache.dir)
        except OSError:  # another process put the same entry there first: keep its copy
            shutil.rmtree(self.tmp, ignore_errors=True)
        entry = self.cache.load(self.count)
        if entry is None:
            raise OSError(f"encoding cache {self.cache.dir}: the entry just written does not read back "
                          f"({self.cache.problem})")
        return entry

    def abort(self) -> None:
        for fh in self.files.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class MemoryWriter:
    """Writer's interface, kept in memory (a source that cannot be cached)."""

    def __init__(self):
        self.status, self.encodings, self.fitted = [], [], {}

    def add(self, original, fitted, enc, status: str) -> None:
        if fitted is not None:
            self.encodings.append(enc)
            if fitted is not original:
                self.fitted[len(self.status)] = {"text": fitted.text, "messages": fitted.messages, "meta": fitted.meta}
        self.status.append(STATUSES.index(status))

    def commit(self) -> Entry:
        return Entry(np.array(self.status, np.uint8), self.fitted, EncodingTable.of(self.encodings))

    def abort(self) -> None:
        pass


def _file(name: str) -> str:
    return "fitted.json" if name == "fitted" else f"{name}.bin"


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            crc = zlib.crc32(block, crc)
    return crc
