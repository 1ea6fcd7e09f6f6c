"""Experiment trackers (training/trackers.py), offline: one tiny PoFT run reports to W&B (offline
mode), TensorBoard and trackio at once, and each tracker's own files, read back with its own
reader, hold exactly the metrics of metrics.jsonl and the resolved config.

- wandb: the offline run's .wandb file (LevelDB log records of wandb's protobuf Record, which
  wandb sync uploads) parsed with wandb's own protos;
- TensorBoard: the event file through tensorboard's EventAccumulator (scalars are float32);
- trackio: its local SQLite store (TRACKIO_DIR) through trackio's SQLiteStorage.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from poft_mlx.cli import main
from poft_mlx.config import Config, build, load_config, to_dict
from poft_mlx.errors import MissingExtra
from poft_mlx.rundir import RunDir
from tiny import write_tiny_config

pytest.importorskip("wandb")
pytest.importorskip("tensorboard")
pytest.importorskip("trackio")


def expected(run: RunDir) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {'train/loss': {step: value}, ...}, the finite numbers only."""
    out: dict[str, dict[int, float]] = {}
    for r in run.read_metrics():
        for k, v in r.items():
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(f"{r['split']}/{k}", {})[r["step"]] = float(v)
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_models):
    """A PoFT run reporting to all three trackers, 2 steps and then resumed to 4 (both processes'
    records make one run in every tracker); (run folder, tracker dirs, final config)."""
    root = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    dirs = {"wandb": root / "wandb", "trackio": root / "trackio"}
    mp.setenv("POFT_MLX_HOME", str(root / "home"))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(dirs["wandb"]))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("TRACKIO_DIR", str(dirs["trackio"]))
    import trackio.sqlite_storage
    import trackio.utils

    for module in (trackio, trackio.utils, trackio.sqlite_storage):  # read at trackio's import
        mp.setattr(module, "TRACKIO_DIR", dirs["trackio"], raising=False)
    dirs["wandb"].mkdir()
    path = write_tiny_config(root, tiny_models, train={"steps_per_eval": 2, "lr_schedule": "constant"},
                             score={"batch_size": 4})
    run_dir = root / "run"
    args = ["train", "-c", str(path), "--iters", "2", "--batch-size", "4", "--learning-rate", "1e-2",
            "--steps-per-report", "1", "--adapter-path", str(run_dir / "adapters"),
            "--report-to", "wandb,tensorboard", "--report-to", "trackio", "--project-name", "poft-test"]
    for argv in (args, ["train", "--resume", str(run_dir), "--iters", "4"]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 0, (r.output, r.exception)
    cfg = load_config([run_dir / "config.yaml"])
    yield RunDir(run_dir), dirs, cfg
    mp.undo()


def test_the_run_logged_what_the_trackers_should_show(tracked):
    run, _, cfg = tracked
    got = expected(run)
    assert cfg.train.report_to == ["wandb", "tensorboard", "trackio"] and cfg.run_dir == str(run.root)
    assert sorted(got["train/loss"]) == [1, 2, 3, 4] and sorted(got["val/loss"]) == [0, 2, 4]
    assert {"train/tau_mean", "train/lr", "val/ce"} <= set(got)


# ---------------------------------------------------------------------------- wandb


def wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then
    LevelDB log blocks of 32 KiB, each chunk with a 7-byte header (crc32c, length, type
    FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def test_wandb_offline_run_holds_the_metrics_and_the_config(tracked):
    run, dirs, cfg = tracked
    paths = sorted(dirs["wandb"].glob("wandb/offline-run-*/run-*.wandb"))  # WANDB_DIR wins over the run folder
    assert len(paths) == 2 and len({p.name for p in paths}) == 1  # the resumed process: the same run id
    records = [rec for p in paths for rec in wandb_records(p)]
    history: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                if not k.startswith("_"):
                    assert row["_step"] not in history.get(k, {}), (k, row["_step"])  # each step once
                    history.setdefault(k, {})[row["_step"]] = float(v)
    assert history == expected(run)  # every metric at every step, bit for bit (JSON doubles)
    start = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"][-1]
    assert start.project == "poft-test" and start.display_name == "run"
    config = {i.key: json.loads(i.value_json) for i in start.config.update if i.key != "_wandb"}
    assert build(Config, config) == cfg
    assert (run.trackers / "wandb-run-id").read_text().strip() == start.run_id


# ---------------------------------------------------------------------------- tensorboard


def test_tensorboard_event_file_holds_the_metrics_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, cfg = tracked
    acc = EventAccumulator(str(run.trackers / "tensorboard"))
    acc.Reload()
    want = expected(run)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(s, float(np.float32(v))) for s, v in sorted(by_step.items())], tag  # float32 in TensorBoard
    first, text = acc.Tensors("config/text_summary")  # the config of each process, the resumed one's last
    assert (first.step, text.step) == (0, 2)
    body = text.tensor_proto.string_val[0].decode()
    assert body.startswith("```yaml\n") and build(Config, yaml.safe_load(body[8:-3])) == cfg


# ---------------------------------------------------------------------------- trackio


def test_trackio_local_store_holds_the_metrics_and_the_config(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    run, dirs, cfg = tracked
    assert SQLiteStorage.get_project_db_path("poft-test").parent == dirs["trackio"]
    assert SQLiteStorage.get_runs("poft-test") == ["run"]
    logs = SQLiteStorage.get_logs("poft-test", "run")
    got: dict[str, dict[int, float]] = {}
    for row in logs:
        for k, v in row.items():
            if "/" in k and isinstance(v, (int, float)):
                assert row["step"] not in got.get(k, {}), (k, row["step"])  # each step once
                got.setdefault(k, {})[row["step"]] = float(v)
    assert got == expected(run)
    stored = {k: v for k, v in SQLiteStorage.get_run_config("poft-test", "run").items() if not k.startswith("_")}
    assert build(Config, stored) == cfg


# ---------------------------------------------------------------------------- without the packages


def test_a_tracker_that_is_not_installed_is_one_error_naming_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    from poft_mlx.training import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n, *a: None if n == "trackio" else real(n, *a))
    cfg = load_config([], ["train.report_to=[tensorboard, trackio]", f"run_dir={tmp_path}"])
    with pytest.raises(MissingExtra, match=r"trackio not installed.*pip install 'poft-mlx\[track\]'"):
        trackers.trackers_for(cfg)
    r = CliRunner().invoke(main, ["train", "--model", "m", "--data", str(tmp_path), "--report-to", "trackio"])
    assert r.exit_code == 1 and r.output.count("Error:") == 1 and "poft-mlx[track]" in r.output, r.output


def test_only_rank_0_reports_and_nothing_opens_before_an_event(tmp_path):
    from poft_mlx.training.trackers import TensorBoardTracker, scalars

    cfg = build(Config, {"run_dir": str(tmp_path / "run"), "train": {"report_to": ["tensorboard"]}})
    tracker = TensorBoardTracker(cfg)

    class Loop:
        main_rank = False

        class state:
            step = 0

    tracker.on_report(Loop, {"split": "train", "step": 1, "loss": 1.0})
    assert not tracker.opened and not (tmp_path / "run").exists()
    assert scalars({"split": "val", "step": 3, "loss": 2, "tau_mean": float("nan"), "grad_norm": None,
                    "ppl": float("inf"), "samples": 8}) == {"val/loss": 2.0, "val/samples": 8.0}
    assert to_dict(cfg)["train"]["report_to"] == ["tensorboard"]


def test_a_resumed_run_replaces_in_tensorboard_what_the_killed_one_logged_after_its_checkpoint(tmp_path):
    """A run killed after step 4 whose last checkpoint is step 2 logs steps 3-4 again on resume:
    TensorBoard shows the resumed values, each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from poft_mlx.training.trackers import TensorBoardTracker

    cfg = build(Config, {"run_dir": str(tmp_path / "run")})
    killed = TensorBoardTracker(cfg)
    killed.open(start_step=0)
    for step in (1, 2, 3, 4):
        killed.log(step, {"train/loss": float(step)})
    resumed = TensorBoardTracker(cfg)  # no close(): the first process was killed
    resumed.open(start_step=2)
    for step in (3, 4, 5):
        resumed.log(step, {"train/loss": 10.0 + step})
    resumed.close(final={})
    acc = EventAccumulator(str(RunDir(cfg.run_dir).trackers / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1), (2, 2), (3, 13), (4, 14), (5, 15)]


def test_a_dpo_run_reports_too(tmp_path, tiny_models):
    """The DPO path (training/dpo.run_pairs) gets the trackers from run_train as every objective does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tiny import write_jsonl

    pairs = [{"prompt": f"What is {i} plus 2?", "chosen": f"It is {i + 2}.", "rejected": f"It is {i + 5}. The fox."}
             for i in range(6)]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", pairs)
    write_jsonl(data / "valid.jsonl", pairs[:2])
    run = RunDir(tmp_path / "dpo")
    r = CliRunner().invoke(main, ["train", "--model", str(tiny_models["target"]), "--chat-template", "gemma",
                                  "--objective", "dpo", "--data", str(data), "--iters", "2", "--batch-size", "2",
                                  "--max-seq-length", "96", "--steps-per-report", "1", "--adapter-path", str(run),
                                  "--report-to", "tensorboard"])
    assert r.exit_code == 0, (r.output, r.exception)
    acc = EventAccumulator(str(run.trackers / "tensorboard"))
    acc.Reload()
    want = expected(run)
    assert "train/reward_acc" in want and set(acc.Tags()["scalars"]) == set(want)
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == \
        [(s, float(np.float32(v))) for s, v in sorted(want["val/loss"].items())]
