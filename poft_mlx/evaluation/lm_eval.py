"""EleutherAI's lm-evaluation-harness on poft-mlx models: `poft-mlx eval --lm-eval TASKS`.

An optional extra (``pip install 'poft-mlx[lm-eval]'``); lm_eval is imported only here, when
it is used. The harness talks to a model through three calls, which `PoftLM` answers with
poft-mlx's loading (a base, or a run's adapters on its target, see generation.open_generator):

* loglikelihood: context + continuation tokenized as the harness does it (TemplateLM: the
  whole string, split where the context's tokens end), the continuation tokens masked as
  targets and scored with modeling.batch_logprobs; is_greedy from a forward pass's argmax
  at the same positions.
* loglikelihood_rolling: the harness's disjoint windows of at most `max_length` tokens,
  each scored the same way, summed.
* generate_until: generation.generate_tokens (greedy unless the task samples), stopping at
  an end token, at the request's `until` strings, or after its `max_gen_toks`.

Prompts are the tasks' raw text, as lm-eval does by default; chat_template=True renders them
with the model's chat template (a run's template from its config), through lm-eval's
apply_chat_template hook. Built-in tasks download their data sets from the Hugging Face hub
(online users); a folder of task YAMLs (include_path) can define tasks on local files.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, MissingExtra
from ..models import modeling
from ..models.generation import generate_tokens, open_generator
from ..runtime import kernels

INSTALL_HINT = "pip install 'poft-mlx[lm-eval]'"
GREEDY_LOGITS_BYTES = 1 << 30  # the is_greedy forward pass's logits, per group of rows


LmEvalMissing = MissingExtra  # the name this module raised it under


def require_lm_eval():
    try:  # lazy: an optional extra
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError as e:
        raise MissingExtra(f"--lm-eval needs lm-evaluation-harness, an optional extra: {INSTALL_HINT} "
                            f"({e})") from None
    return lm_eval


class _Enc:
    """What modeling.make_batch reads: tokens and the mask of predicted tokens."""

    __slots__ = ("tokens", "mask")

    def __init__(self, tokens: np.ndarray, mask: np.ndarray):
        self.tokens, self.mask = tokens, mask


def _model_max_length(model) -> int:
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
        v = getattr(args, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


@lru_cache(maxsize=1)
def lm_class():
    """The harness model class (defined on first use: it subclasses lm_eval's TemplateLM)."""
    require_lm_eval()
    from lm_eval import utils as lm_utils  # lazy: an optional extra
    from lm_eval.api.model import TemplateLM

    class PoftLM(TemplateLM):
        """A poft-mlx Generator (model, tokenizer, template, stop tokens) as an lm-eval LM."""

        backend = "causal"

        def __init__(self, gen, *, batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                     seed: int = 0):
            super().__init__()
            self.gen = gen
            self.model = gen.model
            self.tokenizer = gen.renderer.tok  # the Hugging Face tokenizer
            self.batch_size = int(batch_size)
            self.max_length = int(max_length or _model_max_length(gen.model))
            self.max_gen_toks = int(max_gen_toks)
            self.seed = seed

        # ---------------------------------------------------------------- tokens
        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_token_id
            return int(eos if eos is not None else self.gen.stop_ids[0])

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return int(bos) if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            if add_special_tokens is None:  # the tokenizer's default, unless the text already has BOS
                bos = self.tokenizer.bos_token
                add_special_tokens = not (bos and string.startswith(bos))
            ids = list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens) -> str:
            return self.tokenizer.decode(tokens)

        # ---------------------------------------------------------------- chat template hooks
        @property
        def tokenizer_name(self) -> str:
            return str(self.gen.label).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.gen.renderer.template if chat_template else None

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            r = self.gen.renderer
            return r.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt,
                                             chat_template=r.template, **r.kwargs)

        def get_model_info(self) -> dict:
            return {"poft_mlx": {k: (str(v) if v is not None else None) for k, v in self.gen.source.items()}}

        # ---------------------------------------------------------------- scoring
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, greedy: bool = True, **kwargs):
            """(log p(continuation | context), is_greedy) per (key, context_enc, continuation_enc)."""
            encs = []
            for _, ctx, cont in requests:
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]
                n_cont = min(len(cont), len(full) - 1)
                mask = np.zeros(len(full), bool)
                if n_cont > 0:
                    mask[-n_cont:] = True
                encs.append(_Enc(np.asarray(full, np.int32), mask))
            order = sorted(range(len(encs)), key=lambda i: -len(encs[i].tokens))  # similar lengths together
            out: list[tuple[float, bool] | None] = [None] * len(encs)
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                scored = [i for i in idx if encs[i].mask.any()]
                for i in idx:
                    if not encs[i].mask.any():  # nothing to predict (an empty continuation)
                        out[i] = (0.0, True)
                if not scored:
                    continue
                batch = modeling.make_batch([encs[i] for i in scored], np.asarray(scored))
                lp, _ = modeling.batch_logprobs(self.model, batch)
                hits = self._greedy([encs[i] for i in scored]) if greedy else [False] * len(scored)
                lp = np.asarray(lp.astype(mx.float32)).tolist()
                for b, i in enumerate(scored):
                    out[i] = (float(lp[b]), hits[b])
            for (key, _, _), res in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
            return out

        def _greedy(self, encs: list) -> list[bool]:
            """Per sample: whether every target token is the argmax of the forward pass model(x) at its
            position. Rows go through together while their [rows, length, vocab] logits stay within
            GREEDY_LOGITS_BYTES (one row at least)."""
            vocab = int(getattr(getattr(self.model, "args", None), "vocab_size", 0) or 262144)
            order = sorted(range(len(encs)), key=lambda i: -len(encs[i].tokens))
            hits = [True] * len(encs)
            s = 0
            with kernels.patched(self.model):
                while s < len(order):
                    T = len(encs[order[s]].tokens) - 1
                    rows = order[s:s + max(1, GREEDY_LOGITS_BYTES // (4 * vocab * max(T, 1)))]
                    s += len(rows)
                    x = np.zeros((len(rows), T), np.int32)
                    for b, i in enumerate(rows):
                        x[b, :len(encs[i].tokens) - 1] = encs[i].tokens[:-1]
                    logits = self.model(mx.array(x))
                    for b, i in enumerate(rows):
                        e = encs[i]
                        t = np.nonzero(e.mask[1:])[0]  # prediction t produces token t + 1
                        best = np.asarray(mx.argmax(logits[b][mx.array(t)], axis=-1))
                        hits[i] = bool((best == e.tokens[t + 1]).all())
            return hits

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                (string,) = req.args
                windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores = self._loglikelihood_tokens([(None, a, b) for a, b in windows], greedy=False)
                total = float(sum(s for s, _ in scores))
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
                out.append(total)
            return out

        # ---------------------------------------------------------------- generation
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            groups: dict[tuple, list[int]] = {}
            prepared = []
            for i, req in enumerate(requests):
                context, kw = req.args
                kw = dict(kw or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else [u for u in until if u]
                max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
                sample = bool(kw.pop("do_sample", False))
                temperature = float(kw.pop("temperature", 0.0) or 0.0) if sample else 0.0
                top_p = float(kw.pop("top_p", 1.0) or 1.0) if sample else 1.0
                prompt = self.tok_encode(context) if context else [self.prefix_token_id]
                prompt = prompt[-max(1, self.max_length - max_new):]
                prepared.append((prompt, until))
                groups.setdefault((max_new, temperature, top_p), []).append(i)
            texts: list[str | None] = [None] * len(requests)
            for (max_new, temperature, top_p), idx in groups.items():
                replies = generate_tokens(self.model, self.gen.tokenizer, [prepared[i][0] for i in idx],
                                          self.gen.stop_ids, max_tokens=max_new, temperature=temperature,
                                          top_p=top_p, seed=self.seed, batch_size=self.batch_size,
                                          stop_strings=[prepared[i][1] for i in idx])
                for i, r in zip(idx, replies):
                    texts[i] = r.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
            return texts

    return PoftLM


def __getattr__(name):
    if name == "PoftLM":
        return lm_class()
    raise AttributeError(name)


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager; only the include folder's tasks when it defines every task asked for
    (indexing the few thousand built-in task files takes seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # lazy: an optional extra

    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def metrics(results: dict) -> dict[str, dict]:
    """{task: {metric: value}} from simple_evaluate's results: 'acc,none' -> 'acc'."""
    out = {}
    for task, row in results.get("results", {}).items():
        m = {}
        for key, v in row.items():
            if "," not in key or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            m[metric if filt == "none" else f"{metric},{filt}"] = float(v)
        n = (results.get("n-samples") or {}).get(task, {}).get("effective")
        if n is not None:
            m["samples"] = int(n)
        out[task] = m
    return out


def run_lm_eval(models: dict, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, chat_template: bool = False, batch_size: int = 8,
                bootstrap_iters: int = 1000, log: Callable[[str], None] | None = None,
                raw: dict | None = None) -> dict[str, dict]:
    """Harness `tasks` on each model: {name: {task: {metric: value}}}.

    models is eval's {name: (Config, adapter_path or None)}; limit caps the documents per
    task, num_fewshot overrides the tasks' shots. raw, when given, receives simple_evaluate's
    full result per model (configs, versions, per-sample logs left out).
    """
    lm_eval = require_lm_eval()
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ConfigError("--lm-eval: no task names given")
    manager = task_manager(tasks, include_path)
    missing = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]  # a YAML file also works
    if missing:
        raise ConfigError(f"--lm-eval: unknown task(s) {', '.join(missing)}"
                         + ("" if include_path else " (a folder of task YAMLs: --lm-eval-include)"))
    PoftLM = lm_class()
    out = {}
    for name, (cfg, adapters) in models.items():
        if log:
            log(f"lm-eval: {name} on {', '.join(tasks)}")
        gen = open_generator(cfg.model, cfg=cfg, adapter_path=adapters)
        lm = PoftLM(gen, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, apply_chat_template=chat_template,
                                      log_samples=False, bootstrap_iters=bootstrap_iters)
        out[name] = metrics(res)
        if raw is not None:
            raw[name] = {k: res[k] for k in ("results", "n-shot", "n-samples", "versions") if k in res}
        del lm, gen
    return out


def format_lm_eval_table(per_model: dict[str, dict]) -> str:
    """Tasks x metrics as rows, one column per model; a metric's stderr follows it (±)."""
    names = list(per_model)
    rows = []
    for name in names:
        for task, ms in per_model[name].items():
            for metric in ms:
                if metric.endswith("_stderr") or "_stderr," in metric or metric == "samples":
                    continue
                if (task, metric) not in rows:
                    rows.append((task, metric))

    def cell(name, task, metric):
        ms = per_model[name].get(task, {})
        if metric not in ms:
            return "-"
        base, _, filt = metric.partition(",")
        se = ms.get(f"{base}_stderr" + (f",{filt}" if filt else ""))
        return f"{ms[metric]:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")

    table = [["task", "metric", *names]]
    table += [[task, metric, *(cell(n, task, metric) for n in names)] for task, metric in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = ["  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
             for r in table]
    return "\n".join(lines)
