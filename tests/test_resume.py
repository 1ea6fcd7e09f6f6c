"""Runs that survive: kill -9, a crash inside a checkpoint write, SIGINT/SIGTERM, NaN
batches, corrupt score caches, keep_last / best / early stopping, memory limits.

Every interrupted run is resumed and compared with one uninterrupted run of the same
config (the module's `reference`): the same per-step losses and learning rates (warmup
then cosine) and the same adapters. LoRA dropout is on, so the RNG state must be
restored too. The kill and signal tests run the real `poft-mlx` console script.
"""

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from poft_mlx.training import checkpoint as ckpt
from poft_mlx.runtime import device
from poft_mlx.training.loop import Callback
from poft_mlx.cli.main import main
from tiny import gsm_like, write_jsonl, write_tiny_config

ITERS = 16  # 6 batches per epoch: the runs cross epoch boundaries
POFT_MLX = Path(sys.executable).with_name("poft-mlx")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """The config every test resumes, and its uninterrupted run (in process)."""
    root = tmp_path_factory.mktemp("resume")
    path = write_tiny_config(
        root, tiny_models,
        adapter={"rank": 4, "alpha": 8, "dropout": 0.1},
        train={"iters": ITERS, "batch_size": 4, "learning_rate": 1e-2, "lr_schedule": "cosine", "warmup_steps": 3,
               "min_lr_ratio": 0.1, "steps_per_report": 1, "steps_per_eval": 4, "steps_per_save": 1, "keep_last": 2},
        # Shared by the module's runs (and subprocesses): scored once.
        score={"batch_size": 4, "cache_dir": str(root / "scores")},
    )
    ref = root / "reference"
    r = invoke("train", "-c", path, "--set", f"run_dir={ref}")
    assert r.exit_code == 0, r.output
    return SimpleNamespace(root=root, cfg=path, ref=ref)


# ---------------------------------------------------------------------------- helpers


def _no_nan(token):
    raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")


def read_metrics(run: Path, strict: bool = True) -> list[dict]:
    """metrics.jsonl; `strict=False` skips a line being written (a run still going)."""
    path = run / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line, parse_constant=_no_nan))
        except json.JSONDecodeError:
            if strict:
                raise
    return out


def split(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r["split"] == name]


def weights(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path / ckpt.ADAPTER_FILE)).items()}


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def assert_same_run(run: Path, ref: Path) -> None:
    """Same steps logged once each, same losses (1e-5) and learning rates, same adapters."""
    a, b = read_metrics(run), read_metrics(ref)
    for name in ("train", "val"):
        x, y = split(a, name), split(b, name)
        assert [r["step"] for r in x] == [r["step"] for r in y], name
        np.testing.assert_allclose([r["loss"] for r in x], [r["loss"] for r in y], rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose([r["lr"] for r in split(a, "train")], [r["lr"] for r in split(b, "train")], rtol=1e-6)
    for sub in ("adapters", "best"):
        wa, wb = weights(run / sub), weights(ref / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7, err_msg=f"{sub}/{k}")


def start(env, run: Path) -> tuple[subprocess.Popen, Path]:
    log = run.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(POFT_MLX), "train", "-c", str(env.cfg), "--set", f"run_dir={run}"],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=env.root)
    return proc, log


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until metrics.jsonl logs training step `step` (the process is then in a later step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before step {step}:\n{log.read_text()}")
        if any(r["step"] >= step for r in split(read_metrics(run, strict=False), "train")):
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no step {step} after {timeout}s:\n{log.read_text()}")


def test_reference_schedule_warms_up_then_decays(env):
    """The logged lr is the one the step used: linear warmup from 0 over 3 steps, then
    cosine from 1e-2 to 1e-3 over the others (mlx.optimizers' schedules)."""
    lr = [r["lr"] for r in split(read_metrics(env.ref), "train")]
    decay = ITERS - 3
    expect = [s / 3 * 1e-2 if s < 3 else 1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * (s - 3) / decay))
              for s in range(ITERS)]
    assert lr == pytest.approx(expect, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------- (a) kill -9


def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(env):
    kill_at = random.Random(2412_12865).randint(2, ITERS // 2)  # later steps: a margin before the run ends
    run = env.root / "killed"
    proc, log = start(env, run)
    wait_for_step(run, kill_at, proc, log)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    last = ckpt.latest_checkpoint(run)
    assert last is not None and kill_at - 1 <= step_of(last) < ITERS, (kill_at, last)
    # A kill can land in the middle of a metrics line too.
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "step": 1')
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert f"at step {step_of(last)}/{ITERS}" in r.output
    assert_same_run(run, env.ref)


# ---------------------------------------------------------------------------- (b) crash mid-checkpoint

CRASH_SCRIPT = '''
import os, signal, sys

import poft_mlx
from poft_mlx.training import checkpoint
from poft_mlx.cli.main import main

CRASH = ".tmp-step-%07d-" % int(sys.argv[1])
write = checkpoint._atomic_write


def crash_inside_checkpoint(path, data):
    """kill -9 halfway through state.json, the last file of the checkpoint at step CRASH."""
    if path.name == "state.json" and path.parent.name.startswith(CRASH):
        with open(path.with_name(".state.json.partial"), "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)


checkpoint._atomic_write = crash_inside_checkpoint
main(sys.argv[2:])
'''


def test_a_crash_inside_a_checkpoint_write_resumes_from_the_previous_checkpoint(env):
    crash = 5
    script = env.root / "crash.py"
    script.write_text(CRASH_SCRIPT)
    run = env.root / "crashed"
    p = subprocess.run([sys.executable, str(script), str(crash), "train", "-c", str(env.cfg), "--set", f"run_dir={run}"],
                       capture_output=True, text=True, timeout=300, cwd=env.root)
    assert p.returncode == -signal.SIGKILL, p.stderr
    (partial,) = (run / "checkpoints").glob(f".tmp-step-{crash:07d}-*")
    assert (partial / ckpt.ADAPTER_FILE).exists() and not (partial / "state.json").exists()
    assert ckpt.latest_checkpoint(run).name == f"step-{crash - 1:07d}"
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert f"at step {crash - 1}/{ITERS}" in r.output
    assert not list((run / "checkpoints").glob(".tmp-*")), "the partial checkpoint was left behind"
    assert_same_run(run, env.ref)


# ---------------------------------------------------------------------------- (c) SIGINT / SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_prints_the_resume_hint_and_exits_130(env, sig):
    at = random.Random(int(sig)).randint(2, ITERS // 2)
    run = env.root / f"signal-{sig.name}"
    proc, log = start(env, run)
    wait_for_step(run, at, proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130, log.read_text()
    out = log.read_text()
    assert f"resume with: poft-mlx train --resume {run}" in out and "Traceback" not in out
    m = re.search(r"stopped by signal (\d+) at step (\d+); checkpoint (\S+)", out)
    assert m and int(m.group(1)) == sig and at <= int(m.group(2)) < ITERS, out
    stopped = int(m.group(2))
    assert ckpt.latest_checkpoint(run) == Path(m.group(3)) and step_of(Path(m.group(3))) == stopped
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert f"at step {stopped}/{ITERS}" in r.output
    assert_same_run(run, env.ref)


class AtStep(Callback):
    """Test-only injection into training step k (1-based): raise SIGINT as the step starts
    (inside train(), where SIGINT sets a flag; elsewhere it would stop pytest), or make the
    aligned scores of its batches NaN (a NaN in the data)."""

    def __init__(self, k: int, *, sigint: bool = False, nan: bool = False):
        self.k, self.sigint, self.nan, self.current = k, sigint, nan, 0

    def on_step_begin(self, loop, step):
        self.current = step
        if self.sigint and step == self.k:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            signal.raise_signal(signal.SIGINT)

    def on_batch(self, loop, batch):
        if self.nan and self.current == self.k:
            batch.r_ref = batch.r_ref * float("nan")


def invoke_with(callback, *args):
    return CliRunner().invoke(main, [str(a) for a in args], obj={"callbacks": [callback]})


def test_a_stop_at_an_evaluation_step_inside_a_report_window(env):
    """Stopped after step 4, which is evaluated (every 2 steps) and in the middle of a
    report window (every 3): the resumed run still logs step 4's validation and the
    means over steps 4-6, not over 5-6."""
    common = ["-c", env.cfg, "--set", "train.iters=6", "--set", "train.steps_per_report=3",
              "--set", "train.steps_per_eval=2"]
    assert invoke("train", *common, "--set", f"run_dir={env.root / 'window-ref'}").exit_code == 0
    run = env.root / "window"
    r = invoke_with(AtStep(4, sigint=True), "train", *common, "--set", f"run_dir={run}")
    assert r.exit_code == 130 and "resume with" in r.output and "at step 4;" in r.output, r.output
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0 and "at step 4/6" in r.output, r.output
    a, b = read_metrics(run), read_metrics(env.root / "window-ref")
    assert [x["step"] for x in split(a, "train")] == [x["step"] for x in split(b, "train")] == [3, 6]
    assert [x["step"] for x in split(a, "val")] == [x["step"] for x in split(b, "val")] == [0, 2, 4, 6]
    for x, y in zip(a, b):
        for key in ("loss", "ce", "tau_mean", "samples"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["split"], x["step"], key)


# ---------------------------------------------------------------------------- (d) NaN

NAN_RUN = ["--set", "data.valid=null", "--set", "train.iters=6", "--set", "train.keep_last=10"]


def test_nan_stop_names_the_step_and_keeps_the_last_checkpoint(env):
    run = env.root / "nan-stop"
    saved = {}

    class NanRecordingSaves(AtStep):
        def on_save(self, loop, path):
            saved[path.name] = digest(path)

    r = invoke_with(NanRecordingSaves(5, nan=True), "train", "-c", env.cfg, "--set", f"run_dir={run}", *NAN_RUN,
                    "--set", "train.steps_per_save=2")
    assert r.exit_code == 1, r.output
    assert "non-finite loss" in r.output and "at step 5" in r.output and "nan_policy=skip" in r.output
    assert "Traceback" not in r.output
    # Steps 2 and 4 were saved; nothing after, nothing rewritten.
    assert sorted(saved) == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == sorted(saved)
    assert ckpt.latest_checkpoint(run).name == "step-0000004"
    for name, files in saved.items():
        assert digest(run / "checkpoints" / name) == files, name
    last = weights(run / "checkpoints" / "step-0000004")
    assert all(np.array_equal(v, weights(run / "adapters")[k]) for k, v in last.items())
    assert all(np.isfinite(v).all() for v in last.values())
    # And the run resumes from there (the injection fires once).
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0 and "at step 4/6" in r.output, r.output
    assert [x["step"] for x in split(read_metrics(run), "train")] == [1, 2, 3, 4, 5, 6]


def assert_step_skipped(run: Path, step: int) -> None:
    """The skipped step changed neither the adapters nor the optimizer; the next one changed both."""
    at = lambda s: run / "checkpoints" / f"step-{s:07d}"  # noqa: E731
    before, skipped, after = weights(at(step - 1)), weights(at(step)), weights(at(step + 1))
    assert all(np.array_equal(before[k], skipped[k]) for k in before)
    assert not all(np.array_equal(skipped[k], after[k]) for k in skipped)
    opt = lambda s: mx.load(str(at(s) / "optimizer.safetensors"))  # noqa: E731
    assert opt(step - 1)["step"].item() == opt(step)["step"].item() == opt(step + 1)["step"].item() - 1


def test_nan_skip_skips_the_batch_logs_it_and_finishes(env):
    run = env.root / "nan-skip"
    r = invoke_with(AtStep(3, nan=True), "train", "-c", env.cfg, "--set", f"run_dir={run}", *NAN_RUN, "--set", "train.nan_policy=skip")
    assert r.exit_code == 0, r.output
    assert "step 3: non-finite loss or gradient, batch skipped" in r.output
    train = {x["step"]: x for x in split(read_metrics(run), "train")}  # strict JSON: no NaN logged
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert [train[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert train[3]["loss"] is None and all(math.isfinite(train[s]["loss"]) for s in (1, 2, 4, 5, 6))
    assert_step_skipped(run, 3)
    assert all(np.isfinite(v).all() for v in weights(run / "adapters").values())


# ---------------------------------------------------------------------------- (e) score cache


def _cache_cfg(env, cache_dir, *, batch_size=4, models=1):
    from poft_mlx.config import load_config

    cfg = load_config([env.cfg], [f"score.cache_dir={cache_dir}", f"score.batch_size={batch_size}"])
    cfg.aligned = cfg.aligned[:models]
    return cfg


def test_corrupt_score_cache_lines_are_detected_and_only_those_samples_rescored(env, tmp_path):
    from poft_mlx.data.records import read_jsonl
    from poft_mlx.scoring.references import score_all
    from poft_mlx.scoring.cache import lookup

    cfg = _cache_cfg(env, tmp_path / "scores")
    samples = read_jsonl(cfg.data.train)
    (h,) = score_all(cfg, samples, log=lambda m: None)
    clean, _ = lookup(h.cache, samples)
    (shard,) = h.cache.dir.glob("*.jsonl")
    lines = shard.read_bytes().splitlines(keepends=True)
    assert len(lines) == len(samples) == 24
    uid = lambda line: json.loads(line.split(b"\t")[0])["id"]  # noqa: E731

    def flip(line: bytes, at: int) -> bytes:
        b = bytearray(line)
        b[at] ^= 0x01  # hex digit -> another hex digit, digit -> digit: still parses
        return bytes(b)

    lp_at = lines[9].index(b'"lp":') + 7
    bad = {uid(lines[3]), uid(lines[9]), uid(lines[-1])}
    corrupted = lines[:3] + [flip(lines[3], 10)] + lines[4:9] + [flip(lines[9], lp_at)] + lines[10:-1]
    # A garbage line, and a well-formed entry without a checksum that would overwrite a good score.
    corrupted.insert(5, b"\x00\xffgarbage{\n")
    corrupted.insert(7, json.dumps({"id": uid(lines[6]), "lp": -1.0, "n": 1}).encode() + b"\n")
    corrupted.append(lines[-1][:-9])  # killed mid-write: the last line is cut
    shard.write_bytes(b"".join(corrupted))

    logs = []
    (h,) = score_all(cfg, samples, log=logs.append)
    assert h.cache.corrupt == 5
    assert any(f"scoring {len(bad)} of 24 samples" in m for m in logs), logs
    (new,) = [p for p in h.cache.dir.glob("*.jsonl") if p != shard]
    assert sorted(uid(x) for x in new.read_bytes().splitlines()) == sorted(bad)
    again, missing = lookup(h.cache, samples)
    assert not missing
    np.testing.assert_allclose(again, clean, rtol=1e-5)
    # A third pass finds every sample scored.
    logs.clear()
    score_all(cfg, samples, log=logs.append)
    assert any("all 24 samples already scored" in m for m in logs), logs
    assert not any(m.startswith("scoring ") for m in logs), logs


def _score_in_another_process(cfg_path, data, cache_dir, barrier, times):
    import poft_mlx  # noqa: F401  (BLAS before mlx)
    import mlx_lm.utils  # noqa: F401  (slow imports before the barrier: score at the same time)
    from poft_mlx.config import load_config
    from poft_mlx.data.records import read_jsonl
    from poft_mlx.scoring.references import score_all

    cfg = load_config([cfg_path], [f"score.cache_dir={cache_dir}", "score.batch_size=1"])
    samples = read_jsonl(data)
    barrier.wait(timeout=300)
    t0 = time.time()
    score_all(cfg, samples, log=lambda m: None)
    times.put((t0, time.time()))


def test_two_processes_scoring_into_one_cache_leave_it_valid(env, tmp_path):
    from poft_mlx.data.records import read_jsonl
    from poft_mlx.scoring.references import open_aligned, reference_scores, score_all
    from poft_mlx.scoring.cache import _decode

    n = 96
    data = write_jsonl(tmp_path / "many.jsonl", gsm_like(n))
    ctx = mp.get_context("spawn")
    barrier, times = ctx.Barrier(2), ctx.Queue()
    shared = tmp_path / "shared"
    procs = [ctx.Process(target=_score_in_another_process, args=(str(env.cfg), str(data), str(shared), barrier, times))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    (a0, a1), (b0, b1) = times.get(timeout=5), times.get(timeout=5)
    assert a0 < b1 and b0 < a1, "the two processes did not score at the same time"

    cfg = _cache_cfg(env, shared, models=2)
    samples = read_jsonl(data)
    handles = [open_aligned(cfg, a) for a in cfg.aligned]
    uids = {s.uid for s in samples}  # gsm_like repeats itself: fewer distinct samples than n
    shards = {h.spec.model: sorted(h.cache.dir.glob("*.jsonl")) for h in handles}
    assert max(len(v) for v in shards.values()) == 2, "the processes did not both write into a cache"
    for h in handles:
        raw = [x for s in shards[h.spec.model] for x in s.read_bytes().splitlines(keepends=True)]
        decoded = [_decode(x) for x in raw]
        assert all(d is not None for d in decoded) and h.cache.corrupt == 0
        assert {d[0] for d in decoded} == uids and len(raw) >= len(uids)
    shared_r, _ = reference_scores(handles, samples)
    single = score_all(_cache_cfg(env, tmp_path / "single", models=2), samples, log=lambda m: None)
    single_r, _ = reference_scores(single, samples)
    np.testing.assert_allclose(shared_r, single_r, rtol=1e-5)


# ---------------------------------------------------------------------------- (f) keep_last, best, early stop


def test_keep_last_best_adapters_and_early_stopping(env):
    from poft_mlx.config import load_config
    from poft_mlx.evaluation.likelihood import run_eval

    run, iters, patience, keep = env.root / "early", 16, 2, 3
    # Plain SGD at a high rate: the validation loss improves, then bounces.
    r = invoke("train", "-c", env.cfg, "--set", f"run_dir={run}", "--set", f"train.iters={iters}",
               "--set", "train.optimizer=sgd", "--set", "train.learning_rate=3.0", "--set", "train.lr_schedule=constant",
               "--set", "train.warmup_steps=0", "--set", "train.steps_per_eval=1", "--set", "adapter.dropout=0",
               "--set", f"train.early_stopping_patience={patience}", "--set", f"train.keep_last={keep}")
    assert r.exit_code == 0, r.output
    val = [(x["step"], x["loss"]) for x in split(read_metrics(run), "val")]
    # The rule, replayed on the logged losses: stop once `patience` evaluations in a row
    # fail to beat the best so far.
    best, bad, expect = math.inf, 0, None
    for step, loss in val:
        best, bad = (loss, 0) if loss < best else (best, bad + 1)
        if bad >= patience:
            expect = step
            break
    assert expect is not None and expect < iters, val
    assert val[-1][0] == expect and split(read_metrics(run), "train")[-1]["step"] == expect
    assert f"early stopping at step {expect}" in r.output
    # keep_last: exactly the newest `keep` checkpoints, `latest` the last.
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == [f"step-{s:07d}" for s in range(expect - keep + 1, expect + 1)]
    assert ckpt.latest_checkpoint(run).name == f"step-{expect:07d}"
    # best/ holds the adapters of the lowest validation loss, which is not the last.
    best_step, best_loss = min(val, key=lambda v: v[1])
    assert best_step < expect
    cfg = load_config([run / "config.yaml"])
    assert run_eval(cfg, cfg.data.valid, str(run / "best"))["loss"] == pytest.approx(best_loss, rel=1e-5)
    assert run_eval(cfg, cfg.data.valid, str(run / "adapters"))["loss"] == pytest.approx(val[-1][1], rel=1e-5)


# ---------------------------------------------------------------------------- memory limits


def test_memory_limits_reach_mlx_in_bytes(env, monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "set_memory_limit", lambda n: calls.append(("memory", n)) or 0)
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: calls.append(("cache", n)) or 0)
    device.set_memory_limits(1.5, 0.25)
    assert calls == [("memory", 1_500_000_000), ("cache", 250_000_000)]
    calls.clear()
    device.set_memory_limits(None, None)
    device.set_memory_limits(None, 0)  # 0 = keep no cache
    assert calls == [("cache", 0)]
    calls.clear()
    r = invoke("train", "-c", env.cfg, "--set", f"run_dir={env.root / 'limits'}", *NAN_RUN, "--set", "train.iters=1",
               "--set", "system.memory_limit_gb=2.5", "--set", "system.cache_limit_gb=0.5")
    assert r.exit_code == 0, r.output
    assert calls == [("memory", 2_500_000_000), ("cache", 500_000_000)]


def test_memory_limits_are_applied_for_real():
    """No mocks: MLX reports back the limits it holds (on Metal and on the CPU alike)."""
    old_mem, old_cache = mx.set_memory_limit(2**40), mx.set_cache_limit(2**40)  # each returns the previous
    try:
        device.set_memory_limits(3.0, 0.0)
        assert mx.set_memory_limit(old_mem) == 3_000_000_000
        a = mx.ones((256, 1024))
        mx.eval(a)
        del a
        assert mx.get_cache_memory() == 0  # a zero cache limit frees buffers at once
    finally:
        mx.set_memory_limit(old_mem)
        mx.set_cache_limit(old_cache)


@pytest.mark.parametrize("threshold, cached_gb, clears", [(1.0, 2.0, 3), (1.0, 0.5, 0), (0.0, 2.0, 0)])
def test_clear_cache_threshold(env, monkeypatch, threshold, cached_gb, clears):
    """Above system.clear_cache_threshold_gb of cached memory the trainer clears the cache
    after the step; at or below it, or with the threshold off (0), it does not."""
    count = itertools.count()
    monkeypatch.setattr(mx, "get_cache_memory", lambda: int(cached_gb * 1e9))
    monkeypatch.setattr(mx, "clear_cache", lambda: next(count))
    run = env.root / f"clear-{threshold}-{cached_gb}"
    r = invoke("train", "-c", env.cfg, "--set", f"run_dir={run}", *NAN_RUN, "--set", "train.iters=3",
               "--set", f"system.clear_cache_threshold_gb={threshold}")
    assert r.exit_code == 0, r.output
    assert next(count) == clears

