"""r_ref for a data set: each aligned model scores the samples (cached), then the mean.

`cached` mode loads one aligned model at a time, scores what the cache lacks, and
releases it before training. `resident` mode keeps them loaded (ResidentReference) and
scores each training batch as it comes; both use the same scoring function.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..config import AlignedModel, Config
from ..data.render import Renderer
from ..errors import MissingScores
from ..models import modeling
from ..models.modeling import make_batch, resolve, sequence_logprobs
from ..models.refs import model_identity
from ..runtime.progress import Progress
from .cache import ScoreCache, cache_key, combine, home, lookup, missing_indices, score_dtype, score_samples


@dataclass
class AlignedHandle:
    spec: AlignedModel
    path: object
    renderer: Renderer
    cache: ScoreCache


def open_aligned(cfg: Config, spec: AlignedModel) -> AlignedHandle:
    """Resolve the model and its tokenizer (cheap) and open its score cache."""
    from mlx_lm.utils import load_tokenizer  # lazy: mlx-lm's import is slow

    path = resolve(spec.model)
    tok = load_tokenizer(path)
    renderer = Renderer(tok, chat_template=spec.chat_template, span=cfg.data.span,
                        template_kwargs=cfg.data.template_kwargs, label=f"aligned model {spec.model}")
    key, desc = cache_key(model_identity(path), renderer.template, cfg.data.span,
                          cfg.data.template_kwargs, cfg.score.max_seq_length, score_dtype(cfg.system.dtype))
    desc["ref"] = spec.model
    root = cfg.score.cache_dir or home() / "scores"
    return AlignedHandle(spec, path, renderer, ScoreCache(root, key, desc))


def score_all(cfg: Config, samples, *, group=None, log=print) -> list[AlignedHandle]:
    """Make sure every aligned model has a cached score for every sample (on every rank of `group`)."""
    handles = []
    for spec in cfg.aligned:
        h = open_aligned(cfg, spec)
        missing = missing_indices(h.cache, samples, group)
        if h.cache.corrupt:
            log(f"score cache {h.cache.dir}: {h.cache.corrupt} corrupt line(s) ignored")
        if missing:
            log(f"scoring {len(missing)} of {len(samples)} samples with {spec.model}")
            loaded = modeling.load(spec.model, dtype=cfg.system.dtype, trust_remote_code=cfg.trust_remote_code)
            main = group is None or group.rank() == 0
            with Progress(len(missing), f"score {spec.model}", enabled=main) as bar:
                result = score_samples(loaded, h.renderer, [samples[i] for i in missing], h.cache,
                                       batch_size=cfg.score.batch_size, max_len=cfg.score.max_seq_length,
                                       progress=bar.advance, group=group)
            del loaded
            _release()
            if result["too_long"]:
                log(f"{len(result['too_long'])} sample(s) exceed score.max_seq_length for {spec.model}")
        else:
            log(f"{spec.model}: all {len(samples)} samples already scored (cache {h.cache.dir})")
        handles.append(h)
    return handles


def reference_scores(handles: list[AlignedHandle], samples) -> tuple[np.ndarray, dict]:
    """r_ref per sample and each model's r_j; raises MissingScores naming the samples."""
    per_model, problems = {}, []
    for h in handles:
        r, missing = lookup(h.cache, samples)
        per_model[h.spec.model] = r
        if missing:
            where = ", ".join(samples[i].source for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            problems.append(f"{len(missing)} sample(s) lack a score from {h.spec.model}: {where}{more}")
    if problems:
        raise MissingScores("training needs an aligned score for every sample:\n  " + "\n  ".join(problems)
                            + "\nrun `poft-mlx score` with the same config first")
    r_ref = combine(list(per_model.values()), [h.spec.weight for h in handles])
    return r_ref, per_model


class ResidentReference:
    """Aligned models kept in memory; scores a batch of samples on demand."""

    def __init__(self, cfg: Config):
        self.models = []
        for spec in cfg.aligned:
            h = open_aligned(cfg, spec)
            loaded = modeling.load(spec.model, dtype=cfg.system.dtype, trust_remote_code=cfg.trust_remote_code)
            loaded.model.eval()
            self.models.append((h, loaded))

    def __call__(self, samples) -> np.ndarray:
        scores = []
        for h, loaded in self.models:
            batch = make_batch([h.renderer.encode(s) for s in samples], range(len(samples)))
            for _, lp, n in sequence_logprobs(loaded.model, [batch]):
                scores.append(np.array(lp, np.float64) / np.array(n, np.float64))
        return combine(scores, [h.spec.weight for h, _ in self.models])


def _release() -> None:
    gc.collect()
    mx.clear_cache()
    sys.stdout.flush()
