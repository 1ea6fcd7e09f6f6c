"""A full disk (issue 18): checkpoints, the score cache, fuse and convert on a small real file system.

Each test mounts a 4 MiB tmpfs (as root; skipped where mounting is not permitted) and unmounts it
in teardown. The disk is filled with a ballast file at the moment a test chooses (just before a
checkpoint, before scoring, before a fuse), so the ENOSPC comes from the kernel, through mlx's,
the tokenizers library's or Python's own writes. Every case must end in one error line naming the
path, the space needed and the space free, leave the previous checkpoint / cache entries intact
and nothing half-written where a later run would read it, and work again once space is back
(`train --resume` continues the run).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from poft_mlx.training import checkpoint as ckpt
from poft_mlx.runtime import diskspace
from poft_mlx.cli.main import main
from poft_mlx.scoring.cache import ScoreCache
from tiny import write_tiny_config

SIZE = 4 << 20


class Disk:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ballast = root / "ballast"

    def fill(self, leave: int = 0) -> None:
        """Take all the free space but `leave` bytes."""
        with open(self.ballast, "ab") as fh:
            free = diskspace.free_bytes(self.root) - leave
            try:
                while free > 0:
                    fh.write(b"\0" * min(free, 1 << 20))
                    fh.flush()
                    free = diskspace.free_bytes(self.root) - leave
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def files(self, under: Path | None = None) -> list[str]:
        base = under or self.root
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p != self.ballast)


@pytest.fixture
def disk(tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode}); "
                    "these tests need root")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def adapters(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_on_a_full_disk_keeps_the_previous_one_and_resume_finishes(tiny_models, tmp_path, disk,
                                                                             monkeypatch):
    cfg = write_tiny_config(tmp_path, tiny_models, objective="sft", aligned=[],
                            train={"iters": 6, "batch_size": 4, "steps_per_save": 2, "keep_last": 3,
                                   "steps_per_eval": 100})
    reference = tmp_path / "reference"
    assert invoke("train", "-c", cfg, "--set", f"run_dir={reference}").exit_code == 0
    run = disk.root / "run"
    real = ckpt.save_checkpoint

    def fill_before_step_4(run_dir, step, *args, **kwargs):
        if step == 4:
            disk.fill(leave=2048)  # another process took the space
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", fill_before_step_4)
    line = one_error(invoke("train", "-c", cfg, "--set", f"run_dir={run}"))
    assert line.startswith(f"Error: no space left on device writing {run / 'checkpoints'}: it needs ")
    assert f"free there; the previous checkpoint {run / 'checkpoints' / 'step-0000002'} is intact; free space, " \
           f"then `poft-mlx train --resume {run}`" in line
    assert (run / "checkpoints" / "latest").read_text() == "step-0000002"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["latest", "step-0000002"], "a partial checkpoint"
    adapters(run / "adapters" / ckpt.ADAPTER_FILE)  # the previous adapters still load
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    disk.free()
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert (run / "checkpoints" / "latest").read_text() == "step-0000006"
    got, want = adapters(run / "adapters" / ckpt.ADAPTER_FILE), adapters(reference / "adapters" / ckpt.ADAPTER_FILE)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_a_write_cut_by_enospc_leaves_nothing_half_written(disk, monkeypatch):
    """Past the free-space check (another process filled the disk meanwhile): the kernel's ENOSPC
    in mlx's own write; the temporary folder goes, `latest` and the adapters stay."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    model = nn.Linear(256, 256)
    opt = optim.Adam(1e-3)
    opt.init(model.trainable_parameters())
    run = disk.root / "run"
    first = ckpt.save_checkpoint(run, 1, model, opt, {"a": 1}, {"step": 1})
    ckpt.save_adapters(model, run / "adapters", {"a": 1})
    before = adapters(run / "adapters" / ckpt.ADAPTER_FILE)
    monkeypatch.setattr(diskspace, "check_space", lambda *a, **k: None)
    disk.fill(leave=300_000)  # room for the adapters, not the optimizer state
    model.update({"weight": model.weight + 1})
    with pytest.raises(diskspace.DiskFull, match=rf"^no space left on device writing {run / 'checkpoints'}.*: "
                                                  rf"it needs .*, .* free there; the previous checkpoint {first} "
                                                  "is intact"):
        ckpt.save_checkpoint(run, 2, model, opt, {"a": 1}, {"step": 2})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    assert ckpt.latest_checkpoint(run) == first
    disk.fill(leave=0)
    with pytest.raises(diskspace.DiskFull, match=rf"writing {run / 'adapters' / ckpt.ADAPTER_FILE}: .*; the "
                                                  rf"adapters in {run / 'adapters'} are unchanged"):
        ckpt.save_adapters(model, run / "adapters", {"a": 1})
    assert sorted(p.name for p in (run / "adapters").iterdir()) == [ckpt.ADAPTER_CONFIG, ckpt.ADAPTER_FILE]
    np.testing.assert_array_equal(adapters(run / "adapters" / ckpt.ADAPTER_FILE)["weight"], before["weight"])
    disk.free()
    assert ckpt.save_checkpoint(run, 2, model, opt, {"a": 1}, {"step": 2}) == run / "checkpoints" / "step-0000002"


# ----------------------------------------------------------------------------- score cache


def test_score_cache_on_a_full_disk_keeps_its_entries(tiny_models, tmp_path, disk):
    cache = disk.root / "scores"
    cfg = write_tiny_config(tmp_path, tiny_models, aligned=[str(tiny_models["aligned_a"])],
                            score={"batch_size": 4, "cache_dir": str(cache)})
    assert invoke("score", "-c", cfg, "--set", "data.valid=null").exit_code == 0  # the training file only
    (folder,) = [d for d in cache.iterdir() if d.is_dir()]
    kept = ScoreCache(cache, folder.name).entries
    disk.fill()
    line = one_error(invoke("score", "-c", cfg))  # the validation file needs new entries
    assert line.startswith(f"Error: no space left on device writing {folder}/")
    assert f"free there; the {len(kept)} scores already in the cache are intact and 4 were not stored; free " \
           "space and run again to score the rest" in line
    after = ScoreCache(cache, folder.name)
    assert after.corrupt == 0 and after.entries == kept
    disk.free()
    r = invoke("score", "-c", cfg)
    assert r.exit_code == 0, r.output
    final = ScoreCache(cache, folder.name)
    assert final.corrupt == 0 and len(final.entries) > len(kept) and kept.items() <= final.entries.items()


def test_a_put_cut_by_enospc_is_rolled_back(disk):
    cache = ScoreCache(disk.root, "k", {"format": 1})
    cache.put([("a", -1.5, 3)])
    disk.fill()
    items = [(f"uid-{i:06d}", -float(i) - 0.25, i + 1) for i in range(400)]  # ~30 KB: past the last page
    with pytest.raises(diskspace.DiskFull, match=r"the 1 scores already in the cache are intact and 400 were not"):
        cache.put(items)
    assert ScoreCache(disk.root, "k").entries == {"a": (-1.5, 3)} and ScoreCache(disk.root, "k").corrupt == 0
    assert cache.get("uid-000001") is None
    disk.free()
    cache.put(items)
    reread = ScoreCache(disk.root, "k")
    assert reread.corrupt == 0 and len(reread.entries) == 401


# ----------------------------------------------------------------------------- fuse and convert


def test_fuse_and_convert_on_a_full_disk_leave_no_partial_model(tiny_models, tmp_path, disk, monkeypatch):
    from test_gguf_convert import write_tiny_gguf

    cfg = write_tiny_config(tmp_path, tiny_models, objective="sft", aligned=[], train={"iters": 1, "batch_size": 4})
    run = tmp_path / "run"
    assert invoke("train", "-c", cfg, "--set", f"run_dir={run}").exit_code == 0
    out = disk.root / "fused"
    disk.fill(leave=20_000)
    line = one_error(invoke("fuse", run, out))  # refused before writing
    assert line.startswith(f"Error: no space left on device writing {out}/.poft-fuse-partial: it needs ")
    assert f"; nothing was left in {out}; free space and run fuse again" in line
    assert disk.files() == ["fused"]
    with monkeypatch.context() as m:  # and when the space goes while writing
        m.setattr(diskspace, "check_space", lambda *a, **k: None)
        line = one_error(invoke("fuse", run, out))
    assert "no space left on device writing" in line and f"nothing was left in {out}" in line
    assert disk.files() == ["fused"]

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    for source, dest in ((gguf, disk.root / "from-gguf"), (tiny_models["target"], disk.root / "from-folder")):
        line = one_error(invoke("convert", source, dest))
        assert line.startswith("Error: no space left on device writing ") and "it needs " in line, line
        assert f"nothing was written to {dest}; free space and convert again" in line
        assert disk.files() == ["fused"], "a partial conversion was left"

    disk.free()
    assert invoke("fuse", run, out).exit_code == 0 and (out / "poft_fuse_check.json").is_file()
    assert json.loads((out / "poft_fuse_check.json").read_text())["passed"]
    assert invoke("convert", gguf, disk.root / "from-gguf").exit_code == 0


def test_a_plain_enospc_anywhere_in_a_command_is_one_line(monkeypatch, tmp_path):
    """Writes without their own message (metrics.jsonl, a report) still end in one line."""
    from poft_mlx.scoring import run as scoring_run

    def full(cfg, files=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(scoring_run, "run_score", full)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    line = one_error(invoke("score", "-c", cfg))
    assert line.startswith(f"Error: no space left on device writing {tmp_path / 'metrics.jsonl'}: ")


def test_model_cache_on_a_full_disk_keeps_no_partial_conversion(tmp_path, disk):
    from test_gguf_convert import write_tiny_gguf

    from poft_mlx.models.refs import resolve_model

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    disk.fill()
    with pytest.raises(diskspace.DiskFull, match=rf"^no space left on device writing {disk.root}/models/gguf-\w+: "
                                                  r"it needs .*; nothing was written to"):
        resolve_model(gguf, cache_dir=disk.root)
    assert [p for p in disk.files() if p.startswith("models/")] == []
    disk.free()
    assert (resolve_model(gguf, cache_dir=disk.root) / "model.safetensors").is_file()
