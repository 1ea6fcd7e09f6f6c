"""Experiment trackers: what metrics.jsonl gets, also sent to W&B, TensorBoard or trackio.

`train.report_to: [wandb, tensorboard, trackio]` (or `--report-to`) adds one loop.Callback per
tracker (run.run_train adds them, for every objective). Each logs, on rank 0 only:

- every train and val record of metrics.jsonl at its step, as `train/<name>` and `val/<name>`
  (the finite numbers: a NaN or infinity is how metrics.jsonl says an objective lacks the
  quantity, e.g. SFT's tau without aligned models; null is a non-finite gradient norm);
- the resolved configuration (config.to_dict, what RUN_DIR/config.yaml holds), once.

All three work offline and write next to the run unless their own settings say otherwise:

- wandb: wandb's own settings decide (WANDB_MODE, WANDB_DIR, WANDB_API_KEY / `wandb login`);
  with no credentials and no WANDB_MODE it logs offline instead of failing (`wandb sync` uploads
  later). Its folder is RUN_DIR/trackers/wandb unless WANDB_DIR is set. The run id is kept in
  RUN_DIR/trackers/wandb-run-id, so `train --resume` continues the same W&B run.
- tensorboard: event files in RUN_DIR/trackers/tensorboard (`tensorboard --logdir runs/`),
  written with TensorBoard's own event writer, no TensorFlow or torch; the config is a text
  summary named `config`. Scalars are float32 there, as always in TensorBoard. A resumed run
  starts a new event file with a session-start event at its step, which makes TensorBoard drop
  what the interrupted run logged after its checkpoint.
- trackio: its local database (TRACKIO_DIR, default $HF_HOME/trackio), project
  `train.project_name` (default poft-mlx), run named after the run folder; `trackio show`.

Each package is optional (`pip install 'poft-mlx[track]'`); asking for one that is missing
is a MissingExtra error before anything loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
import string
import sys
import time

import yaml

from ..config import Config, to_dict
from ..errors import MissingExtra
from ..rundir import RunDir
from .loop import Callback

EXTRA = "pip install 'poft-mlx[track]'"
DEFAULT_PROJECT = "poft-mlx"


def trackers_for(cfg: Config) -> list[Callback]:
    """One Callback per name in cfg.train.report_to (in that order, each once)."""
    names = list(dict.fromkeys(cfg.train.report_to))
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise MissingExtra(f"train.report_to: {', '.join(missing)} not installed, an optional extra: {EXTRA} "
                           f"(or pip install {' '.join(missing)})")
    return [TRACKERS[n](cfg) for n in names]


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: {'<split>/<name>': value} for its finite numbers."""
    split = record.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Tracker(Callback):
    """Opens on its first event on rank 0 (the step-0 validation comes before on_train_begin),
    logs each record, closes at the end of training."""

    def __init__(self, cfg: Config):
        self.cfg, self.rundir, self.opened = cfg, RunDir(cfg.run_dir), False
        self.project = cfg.train.project_name or DEFAULT_PROJECT
        self.name = self.rundir.root.resolve().name

    def _ready(self, loop) -> bool:
        if not loop.main_rank:
            return False
        if not self.opened:
            self.open(start_step=loop.state.step)  # > 0: a resumed run
            self.opened = True
        return True

    def on_train_begin(self, loop) -> None:
        self._ready(loop)

    def on_report(self, loop, record: dict) -> None:
        if self._ready(loop):
            self.log(record["step"], scalars(record))

    def on_eval(self, loop, record: dict) -> None:
        if self._ready(loop):
            self.log(record["step"], scalars(record))

    def on_train_end(self, loop, final: dict) -> None:
        if self._ready(loop):
            self.close(final)
            self.opened = False

    # what each tracker does
    def open(self, start_step: int) -> None: ...
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self, final: dict) -> None: ...


class WandbTracker(Tracker):
    def open(self, start_step: int) -> None:
        import wandb  # lazy: an optional extra

        self.rundir.trackers.mkdir(parents=True, exist_ok=True)
        id_file = self.rundir.trackers / "wandb-run-id"
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else _run_id()
        id_file.write_text(run_id + "\n")
        kwargs = dict(project=self.project, name=self.name, id=run_id, resume="allow", config=to_dict(self.cfg),
                      reinit="finish_previous")
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.rundir.trackers)
        if not os.environ.get("WANDB_CONSOLE"):  # our progress bar and log lines are no metrics
            kwargs["settings"] = wandb.Settings(console="off")
        try:
            self.run = wandb.init(**kwargs)
        except wandb.errors.UsageError as e:  # no credentials: log offline rather than lose the run
            if os.environ.get("WANDB_MODE"):
                raise
            print(f"wandb: {e} Logging offline; upload later with `wandb sync`.", file=sys.stderr)
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, final: dict) -> None:
        self.run.summary.update(final)
        self.run.finish()


class TensorBoardTracker(Tracker):
    def open(self, start_step: int) -> None:
        # lazy: an optional extra. TensorBoard's own writer and protos (what torch's SummaryWriter uses).
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.text import metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.pb = event_pb2, summary_pb2
        self.writer = EventFileWriter(str(self.rundir.trackers / "tensorboard"))
        if start_step:  # TensorBoard drops what an earlier process wrote from this step on (resuming logs it again)
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=start_step + 1, session_log=restart))
        text = "```yaml\n" + yaml.safe_dump(to_dict(self.cfg), sort_keys=False) + "```"
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()])
        value = summary_pb2.Summary.Value(tag="config/text_summary", tensor=tensor,
                                          metadata=metadata.create_summary_metadata("config", "the resolved config"))
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=start_step,
                                              summary=summary_pb2.Summary(value=[value])))
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        event_pb2, summary_pb2 = self.pb
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                             for k, v in values.items()])
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # a killed run keeps what it logged

    def close(self, final: dict) -> None:
        self.writer.close()


class TrackioTracker(Tracker):
    def open(self, start_step: int) -> None:
        import trackio  # lazy: an optional extra

        with contextlib.redirect_stdout(sys.stderr):  # its notes are no output of poft-mlx
            self.run = trackio.init(project=self.project, name=self.name, config=to_dict(self.cfg),
                                    resume="allow" if start_step else "never", embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, final: dict) -> None:
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            trackio.finish()


def _run_id() -> str:
    """A new W&B run id (8 lowercase letters and digits, as wandb makes them)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker, "trackio": TrackioTracker}
