"""Two runs, one folder (issue 18): the run folder is locked, the score cache is shared.

A real `poft-mlx train` holds its run folder (poft_mlx.runtime.runlock: an flock on RUN_DIR/.poft-lock
plus a record of pid, host and start time). While it is alive (stopped with SIGSTOP, so it
cannot finish first), a second `train` on the folder, fresh or --resume, fails at once with one
line naming it and writes nothing; once it is killed (kill -9), the next run takes the lock over
and says whose it was. Two `poft-mlx score` processes racing on one cache while a third process
reads it: no reader ever sees a wrong or changing score, and the cache ends complete and valid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from poft_mlx.cli.main import main
from poft_mlx.runtime.runlock import LOCK_FILE, RunLocked, lock_run, release_run
from poft_mlx.scoring.cache import ScoreCache
from tiny import write_tiny_config

BIN = Path(sys.executable).parent


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()}")


def lock_record(run: Path) -> dict | None:
    try:
        return json.loads((run / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


def test_a_live_run_keeps_its_folder_and_a_killed_one_is_taken_over(tiny_models, tmp_path):
    cfg = write_tiny_config(tmp_path, tiny_models, objective="sft", aligned=[],
                            train={"iters": 3, "batch_size": 4, "steps_per_save": 1})
    run = tmp_path / "run"
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        first = subprocess.Popen([str(BIN / "poft-mlx"), "train", "-c", str(cfg), "--set", f"run_dir={run}"],
                                 stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        # open_run locks, then writes config.yaml and data_fingerprint.txt (last).
        wait_for(lambda: (lock_record(run) or {}).get("pid") == first.pid and (run / "data_fingerprint.txt").exists(),
                 first, log, "the run's lock")
        os.kill(first.pid, signal.SIGSTOP)  # alive, holding the folder, and not finishing first
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        record = lock_record(run)
        assert record["host"] == socket.gethostname() and record["started"] and "train" in record["command"]
        who = f"{run} is in use by pid {first.pid} on {socket.gethostname()}, started {record['started']}"
        for args in (["--resume", run], ["-c", cfg, "--set", f"run_dir={run}"]):
            r = invoke("train", *args)
            assert r.exit_code == 1, r.output
            lines = [line for line in r.output.splitlines() if line.startswith("Error: ")]
            assert len(lines) == 1 and lines[0].startswith(f"Error: {who} (poft-mlx train"), r.output
            assert "Traceback" not in r.output
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before, "the refused runs wrote"
    finally:
        first.kill()  # SIGKILL ends a stopped process too
        first.wait()
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    r = invoke("train", *(["--resume", run] if resume else ["-c", cfg, "--set", f"run_dir={run}"]))
    assert r.exit_code == 0, r.output
    assert f"taking over the lock of pid {first.pid} on {socket.gethostname()}" in r.output
    assert "which is no longer running" in r.output
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert lock_record(run) is None, "a finished run gives the lock up"


def test_lock_in_one_process(tmp_path):
    """Taking it twice in one process is a no-op; released, another process may take it; a holder
    that has not recorded itself yet is still a holder."""
    import fcntl

    run = tmp_path / "r"
    lock_run(run)
    lock_run(run)
    probe = [sys.executable, "-c", "import sys; from poft_mlx.runtime.runlock import lock_run; lock_run(sys.argv[1])", str(run)]
    held = subprocess.run(probe, capture_output=True, text=True)
    assert held.returncode == 1 and f"RunLocked: {run} is in use by pid {os.getpid()} on " in held.stderr
    release_run(run)
    assert subprocess.run(probe, capture_output=True, text=True).returncode == 0
    assert lock_record(run)["pid"] != os.getpid()  # the probe's record, left by a process now gone
    fd = os.open(run / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        held = subprocess.run(probe, capture_output=True, text=True)
        assert held.returncode == 1 and "is in use by another process (it has not recorded itself yet)" in held.stderr
    finally:
        os.close(fd)


READER = r"""
import json, sys, time
from pathlib import Path
from poft_mlx.scoring.cache import ScoreCache
root, stop = Path(sys.argv[1]), Path(sys.argv[2])
seen, reads, changed = {}, 0, []
while True:
    done = stop.exists()
    for d in sorted(p for p in root.iterdir() if (p / "meta.json").exists()) if root.exists() else []:
        for uid, (lp, n) in ScoreCache(root, d.name).entries.items():
            old = seen.setdefault(f"{d.name}/{uid}", (lp, n))
            if old[1] != n or abs(old[0] - lp) > 1e-6 * abs(lp):
                changed.append((d.name, uid, old, (lp, n)))
        reads += 1
    if done:
        break
    time.sleep(0.02)
print(json.dumps({"reads": reads, "seen": seen, "changed": changed}))
"""


def test_two_scorers_and_a_reader_share_one_cache(tiny_models, tmp_path):
    cache = tmp_path / "scores"
    cfg = write_tiny_config(tmp_path, tiny_models, aligned=[str(tiny_models["aligned_a"])],
                            score={"batch_size": 2, "cache_dir": str(cache)})
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(cache), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    scorers = [subprocess.Popen([str(BIN / "poft-mlx"), "score", "-c", str(cfg)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=tmp_path) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in scorers]
    finally:
        stop.touch()
        for p in scorers:
            p.kill()
    assert [p.returncode for p in scorers] == [0, 0], outs
    observed, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    observed = json.loads(observed)
    assert observed["reads"] > 1 and observed["changed"] == []
    folders = sorted(d for d in cache.iterdir() if (d / "meta.json").exists())
    assert len(folders) == 1
    final, uids = {}, []
    for d in folders:
        c = ScoreCache(cache, d.name)
        assert c.corrupt == 0, (d, c.corrupt)
        uids.append(set(c.entries))
        final.update({f"{d.name}/{uid}": v for uid, v in c.entries.items()})
    assert len(uids[0]) > 20
    for key, (lp, n) in observed["seen"].items():  # everything the reader saw is what the cache holds
        assert final[key][1] == n and abs(final[key][0] - lp) <= 1e-6 * abs(lp), key
    r = invoke("score", "-c", cfg)  # a third run finds everything scored
    assert r.exit_code == 0 and "scoring " not in r.output and "already scored" in r.output, r.output


@pytest.mark.distributed
def test_data_parallel_ranks_all_refuse_a_locked_folder(tiny_models, tmp_path):
    """Rank 0 finds the folder locked and every rank stops with its message (none waits for the
    others). That only rank 0 takes the lock, test_distributed's two-rank runs show: were rank 1
    to take it too, it would find rank 0's and every such run would fail."""
    from test_distributed import finish, start_ranks

    cfg = write_tiny_config(tmp_path, tiny_models, objective="sft", aligned=[], train={"iters": 1, "batch_size": 4})
    run = tmp_path / "run"
    lock_run(run)  # this process holds it
    try:
        out = finish(start_ranks(tmp_path, [BIN / "poft-mlx", "train", "-c", cfg, "--set", f"run_dir={run}"]))
    finally:
        release_run(run)
    for rank, (code, stdout, stderr) in enumerate(out):
        assert code == 1 and f"Error: {run} is in use by pid {os.getpid()}" in stdout + stderr, (rank, stdout, stderr)
    assert not (run / "config.yaml").exists()
