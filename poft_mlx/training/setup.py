"""What every training run does first: create and lock its run folder."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, save_config
from ..data.prepare import log
from ..data.sources import fingerprint
from ..errors import RunLocked, WouldOverwrite
from ..rundir import RunDir
from ..runtime import device
from ..runtime import distributed as dist
from ..runtime.runlock import lock_run, release_run


def create_run(cfg: Config, *, resume: bool) -> tuple[RunDir, object]:
    """Check and create the run folder (rank 0 writes config and data fingerprint); returns (run, group).

    Rank 0 first locks the folder for the whole run (runlock.lock_run): a second process on it
    gets RunLocked naming the first, on every rank. Refuses to start a new run over an existing
    one, so nothing already done is lost.
    """
    run = RunDir(cfg.run_dir)
    dist.set_timeout(cfg.system.peer_timeout_s)
    group = dist.group()
    refused = None
    if group.rank() == 0:
        try:
            lock_run(run.root, log=log)
        except RunLocked as e:
            refused = str(e)
    if group.size() > 1:
        refused = dist.broadcast_json(refused, "locking the run folder")
    if refused:
        raise RunLocked(refused)
    if not resume and run.has_checkpoints():
        raise WouldOverwrite(f"{run} already holds a run; resume it with --resume {run} or choose another run_dir")
    device.set_memory_limits(cfg.system.memory_limit_gb, cfg.system.cache_limit_gb)
    if group.rank() == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        run.fingerprint.write_text(fingerprint(cfg.data.train, cfg.data, seed=cfg.train.seed) + "\n")
    return run, group


def finished(run_dir: Path) -> Path:
    """A finished run gives its folder's lock up (a failed one keeps it until the process exits)."""
    release_run(run_dir)
    return run_dir
