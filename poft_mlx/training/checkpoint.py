"""Atomic checkpoints and adapter files in a run folder (its layout: rundir.RunDir).

A checkpoint is written into a temporary folder and renamed into place, and `latest`
is replaced atomically after it: a crash mid-write leaves the previous one intact. A full
disk ends the write with DiskFull (the file, the space needed and free); the temporary files
are removed first, so the previous checkpoint, `latest` and the adapters stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import DiskFull, ModelMismatch
from ..rundir import ADAPTER_CONFIG, ADAPTER_FILE, STATE_FILE, RunDir, checkpoint_name
from ..runtime import diskspace


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with diskspace.writing(path, len(data), f"{path} is unchanged"):
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_adapters(model, folder: Path, adapter_config: dict, hint: str = "") -> None:
    """Write trainable weights + config in mlx-lm's layout, each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = folder / f".{ADAPTER_FILE}.{uuid.uuid4().hex[:8]}.safetensors"
    hint = hint or f"the adapters in {folder} are unchanged"
    try:
        with diskspace.writing(folder / ADAPTER_FILE, diskspace.nbytes(weights), hint):
            mx.save_safetensors(str(tmp), weights)
        os.replace(tmp, folder / ADAPTER_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _atomic_write(folder / ADAPTER_CONFIG, json.dumps(adapter_config, indent=2).encode())
    except DiskFull as e:
        raise e.at(folder / ADAPTER_CONFIG, hint) from None


def save_checkpoint(run_dir, step: int, model, optimizer, adapter_config: dict, state: dict) -> Path:
    run = RunDir(run_dir)
    ckpts = run.checkpoints
    ckpts.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = ckpts / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    opt = dict(tree_flatten(optimizer.state))
    weights = dict(tree_flatten(model.trainable_parameters()))
    need = diskspace.nbytes(weights) + diskspace.nbytes(opt) + 256 * 1024
    previous = latest_checkpoint(run)
    hint = (f"the previous checkpoint {previous} is intact; free space, then `poft-mlx train --resume {run}`"
            if previous else "no checkpoint was written; free space and start the run again")
    diskspace.check_space(ckpts, need, hint)  # before writing anything
    try:
        save_adapters(model, tmp, adapter_config, hint)
        with diskspace.writing(tmp, need, hint):
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
            mx.save_safetensors(str(tmp / "rng.safetensors"), {"state": mx.random.state[0]})
        _atomic_write(tmp / STATE_FILE, json.dumps(state, indent=1).encode())
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never left where clean_partial alone would find it
        if isinstance(e, DiskFull):
            raise e.at(ckpts / name, hint) from None
        raise
    final = ckpts / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:
        _atomic_write(run.latest_pointer, name.encode())
    except DiskFull as e:  # `latest` still names the previous checkpoint, which resume uses
        raise e.at(run.latest_pointer, hint) from None
    _fsync_dir(ckpts)
    return final


def prune(run_dir, keep_last: int) -> None:
    ckpts = sorted(RunDir(run_dir).checkpoints.glob("step-*"))
    for old in ckpts[: max(len(ckpts) - max(keep_last, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint (its state.json is written last, before the rename)."""
    run = RunDir(run_dir)
    ckpts, pointer = run.checkpoints, run.latest_pointer
    if pointer.exists():
        cand = ckpts / pointer.read_text().strip()
        if (cand / STATE_FILE).exists():
            return cand
    done = [p for p in sorted(ckpts.glob("step-*")) if (p / STATE_FILE).exists()]
    return done[-1] if done else None


def clean_partial(run_dir) -> None:
    for tmp in RunDir(run_dir).checkpoints.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore adapters, optimizer state and RNG; returns the trainer state."""
    weights = mx.load(str(path / ADAPTER_FILE))
    params = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k in weights if k not in params or weights[k].shape != params[k].shape]
    if bad or len(weights) != len(params):
        raise ModelMismatch(f"checkpoint {path} does not match the model's adapters (e.g. {bad[:3]}); "
                         "was the config changed since the run started?")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    set_rng_key(mx.load(str(path / "rng.safetensors"))["state"])
    return json.loads((path / STATE_FILE).read_text())


def set_rng_key(key: mx.array) -> None:
    """Make `key` (uint32 [2], a saved mx.random.state[0]) MLX's global PRNG key.

    mx.random.state cannot be assigned to (MLX 0.32), but seed(s) sets the key to the
    two 32-bit halves of s, so any key can be rebuilt exactly.
    """
    hi, lo = (int(x) for x in key.tolist())
    mx.random.seed((hi << 32) | lo)
