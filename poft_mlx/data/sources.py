"""Data sources: what data.train / data.valid / data.test name, resolved to checked records.

A source is a string, or a mapping ``{path: SOURCE, weight: W, <field>_field: COLUMN}``; a key
may hold one source or a list of them (a mixture). The string forms, and each record's
`source` (what errors, reports and data_report.json name):

    FILE.jsonl (any suffix but       JSON Lines, read by records.read_jsonl    FILE:LINE (from 1)
      .parquet and .arrow)
    FILE.parquet                     Parquet, through `datasets`                FILE:ROW (from 0)
    FILE.arrow                       an Arrow stream file as `datasets` writes  FILE:ROW
    FOLDER                           a Dataset.save_to_disk folder              FOLDER:ROW
    FOLDER[:SPLIT]                   a DatasetDict.save_to_disk folder          FOLDER:SPLIT:ROW
    FOLDER[:SPLIT]                   else its .jsonl, .parquet and .arrow files (by name; not
                                     recursive), each as above; in a folder of split files
                                     (mlx-lm's train.jsonl / valid.jsonl / test.jsonl, or shards
                                     such as train-00000-of-00002.parquet) only the split's files
    hf:ID[[:CONFIG]:SPLIT][SLICE]    a Hugging Face Hub data set, e.g.          hf:ID[:CONFIG]:SPLIT:INDEX
                                     hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000]

hf: with two parts the second is the split (hf:ID:SPLIT); a config needs all three
(hf:ID:CONFIG:SPLIT, or hf:ID:CONFIG: for the default split). A split left out (of hf:, a
DatasetDict folder or a folder of split files) is the key's: train for data.train, validation
for data.valid (a folder's valid or validation files), test for data.test (and for eval's
held-out data); so data.train: DIR and data.valid: DIR read mlx-lm's data folder as it does. SLICE is `datasets`' split slicing (``[:2000]``, ``[100:200]``,
``[:10%]``, ``[-500:]``), and INDEX is the record's index in the whole split, so a record has the
same source in ``[:1000]`` and ``[:2000]``. Loading goes through datasets.load_dataset: its cache
is HF_DATASETS_CACHE (default HF_HOME/datasets), offline (HF_HUB_OFFLINE=1) only cached sets
load, and no loading script ever runs (datasets >= 4 has none; trust_remote_code is never
passed). With data.streaming, hf: sources and Parquet files are read record by record without
preparing the whole set first (a slice of a large set); a streamed slice takes record numbers
(``[:2000]``, ``[100:200]``), not percentages.

A mixture's weights (default 1) turn into counts: a source of n records with weight w gives
round(w * n) records (halves round up): every record floor(w * n + 1/2) // n times, and the
rest a sample without replacement, in the source's order, drawn by
numpy.random.default_rng([train.seed, the source's position in the list]); so weight 1 is every
record once, 0.5 a seeded half, 2 every record twice, and the same config always draws the same
records. Weights are per source, not shares of the total: to make A 75 % of a mixture of
1000-record A and B, give A weight 3. Duplicates share their uid and so their cached scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import DATA_FIELDS
from ..errors import ConfigError, DataError, InputMissing, PoftError
from .records import Problem, read_jsonl, read_rows

DEFAULT_SPLIT = {"data.train": "train", "data.valid": "validation", "data.test": "test"}
DATA_SUFFIXES = (".jsonl", ".parquet", ".arrow")
GRAMMAR = "hf:ID[[:CONFIG]:SPLIT][SLICE], e.g. hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000]"
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # as the Hub names them
_SPLIT = re.compile(r"\w+(\.\w+)*")
_SLICE = re.compile(r"\[(-?\d+%?)?:(-?\d+%?)?\]")
_ABSOLUTE = re.compile(r"\[(\d*):(\d*)\]")


@dataclass(frozen=True)
class Entry:
    """One source of a key: its spec, its weight (None: 1, unweighted) and its column names."""

    path: str
    weight: float | None
    names: dict  # record field -> the data set's column


@dataclass(frozen=True)
class HfSource:
    repo: str
    config: str | None
    split: str
    slice: str  # "" or "[...]"

    @property
    def label(self) -> str:
        return f"hf:{self.repo}{':' + self.config if self.config else ''}:{self.split}"


@dataclass
class Loaded:
    records: list  # Sample (or Pair) objects, the mixture drawn
    report: list  # per source: {source, records, weight, drawn}


# ---------------------------------------------------------------------------- parsing


def entries(spec: Any, data=None) -> list[Entry]:
    """The sources `spec` names, with the column names of `data` (a DataConfig) as defaults."""
    items = spec if isinstance(spec, list) else [spec]
    defaults = {f.removesuffix("_field"): getattr(data, f) for f in DATA_FIELDS if getattr(data, f, None)}
    out = []
    for item in items:
        if isinstance(item, dict):
            own = {k.removesuffix("_field"): v for k, v in item.items() if k in DATA_FIELDS and v}
            w = item.get("weight")
            out.append(Entry(str(item["path"]), None if w is None else float(w), {**defaults, **own}))
        else:
            out.append(Entry(str(item), None, dict(defaults)))
    return out


def parse_hf(spec: str, key: str = "data.train") -> HfSource:
    """hf:ID[[:CONFIG]:SPLIT][SLICE] (module docstring); ConfigError naming `key` otherwise."""
    body = spec[len("hf:"):]
    cut = body.rfind("[")
    sl = body[cut:] if cut >= 0 and body.endswith("]") else ""
    body = body[:len(body) - len(sl)]
    parts = body.split(":")
    bad = lambda why: ConfigError(f"{key}: {spec!r}: {why}; expected {GRAMMAR}")  # noqa: E731
    if len(parts) > 3:
        raise bad("too many ':' parts")
    repo = parts[0]
    config = (parts[1] or None) if len(parts) == 3 else None
    split = (parts[-1] if len(parts) > 1 else "") or DEFAULT_SPLIT.get(key, "train")
    if not _HF_ID.fullmatch(repo):
        raise bad(f"{repo!r} is not a data set id (owner/name)")
    if not _SPLIT.fullmatch(split):
        raise bad(f"{split!r} is not a split name")
    if sl and not _SLICE.fullmatch(sl):
        raise bad(f"{sl!r} is not a slice ([A:B], each a record number or a percentage, either left out)")
    return HfSource(repo, config, split, sl)


def _local(spec: str, key: str) -> tuple[Path, str | None]:
    """The path a local source names, and the split of a DatasetDict folder (FOLDER:SPLIT)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    head, sep, split = spec.rpartition(":")
    if sep and _SPLIT.fullmatch(split) and Path(head).expanduser().is_dir():
        return Path(head).expanduser(), split
    hint = f" (a Hugging Face data set? write hf:{spec})" if re.fullmatch(r"[\w.-]+/[\w.-]+(:.*)?", spec) else ""
    raise InputMissing(f"{key}: {spec} does not exist{hint}")


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return "datasetdict"
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "dataset"
        return "folder"
    return {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower(), "jsonl")


SPLIT_FILES = {"data.train": ("train",), "data.valid": ("valid", "validation"), "data.test": ("test",)}


def _split_of(file: Path) -> str | None:
    """The split a file's name says (train.jsonl, valid.parquet, test-00000-of-00002.parquet)."""
    stem = file.name[:-len(file.suffix)]
    return next((n for n in ("train", "valid", "validation", "test") if stem == n or stem.startswith(n + "-")), None)


def _files(folder: Path, key: str = "data.train", split: str | None = None) -> list[Path]:
    """A folder's data files; of a folder of split files, the split's (named, or the key's)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
    if split is None and not any(_split_of(f) for f in files):
        return files
    wanted = (split,) if split else SPLIT_FILES.get(key, ("train",))
    return [f for f in files if _split_of(f) in wanted]


def check(spec: Any, data=None, key: str = "data.train") -> None:
    """What can be checked without reading any data: the grammar, and that local paths exist
    (a folder holding data). InputMissing or ConfigError naming `key`."""
    for e in entries(spec, data):
        if e.path.startswith("hf:"):
            parse_hf(e.path, key)
            continue
        path, split = _local(e.path, key)
        if _kind(path) == "folder" and not _files(path, key, split):
            raise _no_files(path, key, split)


def _no_files(path: Path, key: str, split: str | None) -> InputMissing:
    files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
    if files:  # split files, none of this split
        wanted = " or ".join(f"{n}.*" for n in ((split,) if split else SPLIT_FILES.get(key, ("train",))))
        return InputMissing(f"{key}: {path} holds split files ({', '.join(files)}) but no {wanted}")
    return InputMissing(f"{key}: {path} is a folder without .jsonl, .parquet or .arrow files (and not a "
                        "save_to_disk data set)")


def describe(spec: Any) -> str:
    """A short name for `spec` (log lines, reports): the string itself for one source."""
    items = spec if isinstance(spec, list) else [spec]
    names = []
    for item in items:
        if isinstance(item, dict):
            w = item.get("weight")
            names.append(str(item.get("path")) + (f" (weight {w:g})" if w is not None else ""))
        else:
            names.append(str(item))
    return " + ".join(names)


def single_jsonl(spec: Any) -> Path | None:
    """The file when `spec` is one local JSONL file (read verbatim by keep_top), else None."""
    if not isinstance(spec, str) or spec.startswith("hf:"):
        return None
    path = Path(spec).expanduser()
    return path if path.is_file() and _kind(path) == "jsonl" else None


# ---------------------------------------------------------------------------- reading


def _every(read, items) -> list:
    """read(item) for every item, the record problems of all of them raised together as one
    DataError (so a user sees every bad record of every source at once)."""
    out, problems = [], []
    for item in items:
        try:
            out.append(read(item))
        except DataError as err:
            if not err.problems:
                raise
            problems.extend(err.problems)
    if problems:
        raise DataError(problems)
    return out


def load_records(spec: Any, data=None, *, seed: int = 0, preference: bool = False,
                 key: str = "data.train") -> Loaded:
    """Every record of `spec`, checked (all problems of all sources at once), the mixture drawn
    by weight (module docstring). data: the DataConfig (column names, streaming)."""
    ents = entries(spec, data)
    streaming = bool(getattr(data, "streaming", False))
    parts = _every(lambda e: read_source(e, key=key, preference=preference, streaming=streaming), ents)
    records, report = [], []
    for i, (e, recs) in enumerate(zip(ents, parts)):
        picked = draw(recs, e.weight, seed, i)
        records += picked
        report.append({"source": e.path, "records": len(recs), "weight": 1.0 if e.weight is None else e.weight,
                       "drawn": len(picked)})
    if not records:
        raise DataError(f"{key}: the weights draw no record ({describe(spec)})")
    return Loaded(records, report)


def counts(n: int, weight: float | None) -> tuple[int, int]:
    """(copies of every record, records sampled on top) for a source of n records."""
    if weight is None or n == 0:
        return 1, 0
    total = int(np.floor(weight * n + 0.5))
    return total // n, total % n


def draw(records: list, weight: float | None, seed: int, position: int) -> list:
    """The records a source of weight `weight` at `position` in its list contributes."""
    copies, extra = counts(len(records), weight)
    out = list(records) * copies
    if extra:
        rng = np.random.default_rng([seed % 2**32, position])
        out += [records[i] for i in np.sort(rng.choice(len(records), extra, replace=False))]
    return out


def read_source(e: Entry, *, key: str = "data.train", preference: bool = False, streaming: bool = False) -> list:
    """The checked records of one source (every record once; weights are load_records')."""
    if e.path.startswith("hf:"):
        return _read_hf(parse_hf(e.path, key), e.names, preference, streaming)
    path, split = _local(e.path, key)
    kind = _kind(path)
    if kind == "folder":
        files = _files(path, key, split)
        if not files:
            raise _no_files(path, key, split)
        parts = _every(lambda f: _read_file(f, _kind(f), e.names, preference, streaming), files)
        return [r for part in parts for r in part]
    if kind == "dataset" and split:
        raise InputMissing(f"{key}: {path} is one saved Dataset, without splits; name it without :{split}")
    if kind in ("dataset", "datasetdict"):
        return _read_saved(path, kind, split, e.names, preference, key)
    return _read_file(path, kind, e.names, preference, streaming)


def _read_file(path: Path, kind: str, names: dict, preference: bool, streaming: bool) -> list:
    if kind == "jsonl":
        return read_jsonl(path, preference=preference, names=names)
    datasets = _datasets()
    try:
        if kind == "parquet":
            ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=streaming)
        else:
            ds = datasets.Dataset.from_file(str(path))
    except PoftError:
        raise
    except Exception as e:  # not Parquet / Arrow, truncated, unreadable: the library's own reason
        raise DataError([Problem(str(path), 0, "<file>", f"cannot be read as {kind.title()} ({_why(e)})")]) from None
    rows = enumerate(ds) if streaming and kind == "parquet" else _rows(ds)
    return read_rows(rows, str(path), preference=preference, names=names)


def _read_saved(path: Path, kind: str, split: str | None, names: dict, preference: bool, key: str) -> list:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError([Problem(str(path), 0, "<file>", f"cannot be read as a save_to_disk data set ({_why(e)})")]) from None
    label = str(path)
    if kind == "datasetdict":
        wanted = (split,) if split else SPLIT_FILES.get(key, ("train",))
        found = next((w for w in wanted if w in ds), None)
        if found is None:
            how = f"the split {key} takes by default" if not split else "the split named"
            raise InputMissing(f"{key}: {path} has no split {' or '.join(map(repr, wanted))} ({how}); its splits: "
                               f"{', '.join(ds)} (name one as {path}:SPLIT)")
        ds, label = ds[found], f"{path}:{found}"
    return read_rows(_rows(ds), label, preference=preference, names=names)


def _read_hf(src: HfSource, names: dict, preference: bool, streaming: bool) -> list:
    ds = _load_hf(src, streaming)
    if streaming:
        m = _ABSOLUTE.fullmatch(src.slice or "[:]")
        if not m:
            raise ConfigError(f"{src.label}{src.slice}: with data.streaming a slice takes record numbers "
                              "([A:B], [:B], [A:]), not percentages or counts from the end")
        start = int(m.group(1) or 0)
        stop = int(m.group(2)) if m.group(2) else None
        rows = islice(enumerate(ds), start, stop)
    else:
        start, stop = 0, len(ds)
        if src.slice:
            datasets = _datasets()
            try:
                (inst,) = datasets.ReadInstruction.from_spec(f"{src.split}{src.slice}").to_absolute({src.split: len(ds)})
            except (ValueError, AssertionError) as e:
                raise ConfigError(f"{src.label}{src.slice}: {_why(e)}") from None
            start, stop = inst.from_, inst.to
        rows = _rows(ds.select(range(start, stop)), start)
    return read_rows(rows, src.label, preference=preference, names=names)


def _load_hf(src: HfSource, streaming: bool):
    datasets = _datasets()
    try:
        return datasets.load_dataset(src.repo, src.config, split=src.split, streaming=streaming)
    except PoftError:
        raise
    except Exception as e:  # not found, not cached offline, no such config or split, a script
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (f"; offline, only data sets in the cache ({datasets.config.HF_DATASETS_CACHE}) load"
                if offline else "")
        raise InputMissing(f"{src.label}{src.slice}: cannot load it ({_why(e)}){hint}") from None


def _rows(ds, start: int = 0, batch: int = 1000) -> Iterator[tuple[int, dict]]:
    """(index, record) of a datasets.Dataset, read a batch of columns at a time."""
    i = start
    for cols in ds.iter(batch_size=batch):
        keys = list(cols)
        for values in zip(*(cols[k] for k in keys)):
            yield i, dict(zip(keys, values))
            i += 1


def _datasets():
    try:  # lazy: a second to import, and only table and Hub sources need it
        import datasets
    except ImportError:  # a dependency, but a broken environment deserves a clear line
        raise InputMissing("Parquet, Arrow and hf: sources need the `datasets` package: pip install datasets") from None
    return datasets


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


# ---------------------------------------------------------------------------- fingerprint


def fingerprint(spec: Any, data=None, *, seed: int = 0, key: str = "data.train") -> str:
    """sha256 naming the data `spec` resolves to, without parsing it: for one JSONL file the
    file's own sha256 (as `sha256sum` prints it); otherwise a hash over every source's content
    (file bytes; a Hub set's `datasets` fingerprint of its cached split), its slice, weight
    and column names, and the seed when weights draw samples."""
    ents = entries(spec, data)
    one = ents[0] if len(ents) == 1 else None
    if one and one.weight is None and not one.names and single_jsonl(one.path):
        return _sha256(single_jsonl(one.path))
    h = hashlib.sha256()
    for e in ents:
        h.update(json.dumps([e.path, e.weight, e.names, _content(e, key, data)], sort_keys=True).encode())
    if any(e.weight is not None for e in ents):
        h.update(f"seed {seed}".encode())
    return h.hexdigest()


def _content(e: Entry, key: str, data) -> str:
    if e.path.startswith("hf:"):
        src = parse_hf(e.path, key)
        if getattr(data, "streaming", False):
            return "streamed"  # nothing local names the content
        return str(getattr(_load_hf(src, False), "_fingerprint", ""))
    path, split = _local(e.path, key)
    kind = _kind(path)
    if kind == "folder":  # the files read
        files = _files(path, key, split)
    else:  # a save_to_disk folder whole (its state.json holds `datasets`' fingerprint), or the file
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(str(split).encode())
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{_sha256(f)}\n".encode())
    return h.hexdigest()


_SHA256: dict[tuple, str] = {}  # (path, size, mtime, inode) -> sha256: a run hashes its data more than once


def _sha256(path: Path) -> str:
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _SHA256:
        _SHA256[memo] = _sha256_of(path)
    return _SHA256[memo]


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
