"""`poft-mlx eval` without --generate: likelihood metrics of a model (+ adapters) on held-out data."""

from __future__ import annotations

from ..config import Config
from ..data.prepare import prepare, target_renderer
from ..errors import ConfigError
from ..models.adapters import load_policy
from ..runtime import distributed as dist
from ..training.loop import evaluate
from ..training.objectives import Poft, Sft
from ..training.run import encoded_data


def run_eval(cfg: Config, data, adapter_path: str | None, loaded=None) -> dict:
    """CE, perplexity, PoFT loss, tau and win rate on `data` for a model (+ adapters): the PoFT
    quantities against the aligned models when the config has them, else CE alone (loss = CE).
    data: any data source (data/sources.py); None: data.test.

    loaded: the model already loaded as load_policy(cfg, adapter_path) loads it (eval --generate
    reuses the generator's), else it is loaded here."""
    data = data or cfg.data.test
    if not data:
        raise ConfigError("no held-out data: give --data or set data.test")
    dist.set_timeout(cfg.system.peer_timeout_s)
    if loaded is None:
        loaded = load_policy(cfg, adapter_path)  # a DPO run's init_adapters fused first
    renderer = target_renderer(loaded.tokenizer, cfg)
    ds = encoded_data(prepare(data, renderer, cfg, key="data.test"), cfg, bool(cfg.aligned))
    objective = Poft.from_config(cfg) if cfg.aligned else Sft.from_config(cfg)
    m = evaluate(loaded.model, ds, objective, batch_size=cfg.score.batch_size, group=dist.group())
    if not cfg.aligned:
        m["loss"] = m.get("ce")
    return m
