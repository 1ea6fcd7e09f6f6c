"""Aligned-model scores: token-mean log-likelihoods over the supervised span, cached on disk.

The cache is content-addressed. A model's folder is named by a hash of the model's
identity (weights, tokenizer, config), the compute dtype, its chat template, the span
policy and the template arguments; inside, each entry is keyed by the sample's content id. Entries are
appended as checksummed JSON lines to a shard file owned by one process, so two
processes (or data-parallel ranks) never write the same file, an interrupted run loses
at most the batch in flight, and a corrupt or truncated line is detected and rescored. A full
disk cuts the shard back to its last complete batch and raises DiskFull: the entries already
there stay valid, and a later run scores the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..data.batched import fit_many
from ..data.encoding_cache import content_key, home  # noqa: F401  (home: re-exported for references)
from ..models.modeling import make_batch, sequence_logprobs
from ..runtime import diskspace
from ..runtime import distributed as dist
from ..runtime.device import backend

SCORE_FORMAT = 1


def score_dtype(requested: str) -> str:
    """The dtype an aligned model scores in, as far as it is known before loading it.

    Scores in bfloat16 and float32 differ (by ~1e-3 on a tiny model), so they must not share
    a cache. 'auto' off the CPU computes in the model's own dtype, which the model identity
    (its weights) already pins.
    """
    if requested != "auto":
        return requested
    return "float32" if backend() == "cpu" else "model"


def cache_key(identity: str, template: str | None, span: str, template_kwargs: dict, max_len,
              dtype: str) -> tuple[str, dict]:
    """The cache folder's name and description; `dtype` is score_dtype()'s answer.

    Every field is hashed, so a cache written before a field existed is another folder
    (scored afresh), never misread.
    """
    desc = {
        "format": SCORE_FORMAT,
        "model": identity,
        "dtype": dtype,
        "template_sha256": hashlib.sha256((template or "").encode()).hexdigest(),
        "span": span,
        "template_kwargs": template_kwargs,
        "max_seq_length": max_len,
    }
    return content_key(desc), desc


class ScoreCache:
    """uid -> (lp_sum, n_tok) for one aligned model; see the module docstring."""

    def __init__(self, root: str | Path, key: str, desc: dict | None = None):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        if desc is not None and not (self.dir / "meta.json").exists():
            tmp = self.dir / f".meta.{uuid.uuid4().hex}"
            text = json.dumps(desc, indent=1, sort_keys=True)
            try:
                with diskspace.writing(self.dir / "meta.json", len(text), "the score cache is unchanged"):
                    tmp.write_text(text)
                os.replace(tmp, self.dir / "meta.json")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.entries: dict[str, tuple[float, int]] = {}
        self.corrupt = 0
        self._shard: int | None = None  # this process's shard, an O_APPEND descriptor
        self._shard_path: Path | None = None
        self.reload()

    def reload(self) -> None:
        self.corrupt = 0
        for shard in sorted(self.dir.glob("*.jsonl")):
            with open(shard, "rb") as fh:
                for raw in fh:
                    entry = _decode(raw)
                    if entry is None:
                        self.corrupt += 1
                    else:
                        self.entries[entry[0]] = entry[1:]

    def get(self, uid: str):
        return self.entries.get(uid)

    def put(self, items: list[tuple[str, float, int]]) -> None:
        """Append entries durably (fsync) to this process's shard, all of them or none."""
        data = b"".join(_encode(uid, lp, n) for uid, lp, n in items)
        hint = (f"the {len(self.entries)} scores already in the cache are intact and {len(items)} were not "
                "stored; free space and run again to score the rest")
        if self._shard is None:
            path = self.dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            with diskspace.writing(path, len(data), hint):
                self._shard = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                                      0o644)
            self._shard_path = path
        start = os.fstat(self._shard).st_size
        try:
            with diskspace.writing(self._shard_path, len(data), hint):
                view = memoryview(data)
                while view:
                    view = view[os.write(self._shard, view):]
                os.fsync(self._shard)
        except BaseException:
            with contextlib.suppress(OSError):  # no half line left behind (shrinking needs no space)
                os.ftruncate(self._shard, start)
            raise
        for uid, lp, n in items:
            self.entries[uid] = (float(lp), int(n))

    def close(self) -> None:
        if self._shard is not None:
            os.close(self._shard)
            self._shard = None


def _encode(uid: str, lp: float, n: int) -> bytes:
    body = json.dumps({"id": uid, "lp": float(lp), "n": int(n)}, separators=(",", ":"))
    return f"{body}\t{zlib.crc32(body.encode()):08x}\n".encode()


def _decode(raw: bytes):
    try:
        body, crc = raw.rstrip(b"\n").rsplit(b"\t", 1)
        if not raw.endswith(b"\n") or int(crc, 16) != zlib.crc32(body):
            return None
        d = json.loads(body)
        lp, n = float(d["lp"]), int(d["n"])
        if not np.isfinite(lp) or n <= 0:
            return None
        return d["id"], lp, n
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- scoring


def score_samples(loaded, renderer, samples, cache: ScoreCache, *, batch_size: int = 8,
                  max_len: int | None = None, progress=None, group=None) -> dict:
    """Score every sample not yet in `cache`, in length-sorted batches; returns counts.

    With a distributed `group` (the same `samples` on every rank), a sample is scored when
    any rank's cache lacks it; rank r scores batches r, r + world, ... (the very batches of
    one process, so the same scores bit for bit; the ranks meet after each round), then the
    scores are all-summed so that every rank's cache gets them all, whether or not the
    ranks share a file system.
    """
    todo, too_long = [], []
    seen, unique = set(), []
    for i in missing_indices(cache, samples, group):
        s = samples[i]
        if s.uid not in seen:
            seen.add(s.uid)
            unique.append(s)
    # fit_many at an unbounded length: renderer.encode of each, batched
    for s, (_, enc, _) in zip(unique, fit_many(unique, renderer, 1 << 62, "truncate")):
        if max_len and len(enc.tokens) > max_len:
            too_long.append(s)
            continue
        todo.append((len(enc.tokens), s.uid, enc))
    todo.sort(key=lambda t: t[0])
    world, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    scores = np.zeros((len(todo), 2), np.float64)  # (lp_sum, n_tok) of the rows this rank scored
    n_batches, done_tokens = -(-len(todo) // batch_size), 0
    rounds = range(0, n_batches, world)  # a round: batch first + r on rank r
    mine = [todo[(first + rank) * batch_size:(first + rank + 1) * batch_size] for first in rounds]
    batches = (make_batch([c[2] for c in chunk], range(len(chunk))) for chunk in mine if chunk)
    results = sequence_logprobs(loaded.model, batches)
    for first, chunk in zip(rounds, mine):
        if chunk:
            i = (first + rank) * batch_size
            _, lp, n = next(results)
            cache.put([(c[1], float(lp[j]), int(n[j])) for j, c in enumerate(chunk)])
            scores[i:i + len(chunk)] = np.stack([lp, n], axis=1)
        done = np.array([len(chunk), sum(c[0] for c in chunk)], np.float64)
        if world > 1:  # once a round: no rank waits long for another, and the bar shows them all
            total = mx.distributed.all_sum(mx.array(done), group=group, stream=mx.cpu)
            dist.wait(total, f"scoring (batch {first + 1} of {n_batches})")
            done = np.array(total)
        done_tokens += int(done[1])
        if progress:
            progress(int(done[0]), done_tokens)
    results.close()
    if world > 1 and todo:
        total = mx.distributed.all_sum(mx.array(scores), group=group, stream=mx.cpu)  # zeros elsewhere: exact
        dist.wait(total, "sharing aligned-model scores")
        total = np.array(total, np.float64)
        cache.reload()  # on a shared file system the other ranks' shards are already there
        cache.put([(c[1], float(total[j, 0]), int(total[j, 1])) for j, c in enumerate(todo)
                   if cache.get(c[1]) is None])
    return {"scored": len(todo), "too_long": [s.source for s in too_long]}


def missing_indices(cache: ScoreCache, samples, group=None) -> list[int]:
    """Indices of the samples without a score in `cache`; with a `group`, in any rank's cache."""
    missing = np.array([cache.get(s.uid) is None for s in samples], np.int32)
    if group is not None and group.size() > 1 and len(samples):
        total = mx.distributed.all_sum(mx.array(missing), group=group, stream=mx.cpu)
        dist.wait(total, "comparing the ranks' score caches")
        missing = np.array(total)
    return [int(i) for i in np.nonzero(missing)[0]]


def lookup(cache: ScoreCache, samples) -> tuple[np.ndarray, list[int]]:
    """Token-mean scores r_j for `samples` (NaN where missing) and the missing indices."""
    r = np.full(len(samples), np.nan, np.float64)
    missing = []
    for i, s in enumerate(samples):
        e = cache.get(s.uid)
        if e is None:
            missing.append(i)
        else:
            r[i] = e[0] / e[1]
    return r, missing


def combine(scores: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """r_ref = sum_j w_j r_j / sum_j w_j (the paper: the plain mean, all w_j = 1)."""
    w = np.asarray(weights, np.float64)
    return (np.stack(scores) * w[:, None]).sum(0) / w.sum()
