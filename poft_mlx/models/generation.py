"""Generation: replies from a base model, a run folder or a fused folder, in the format it learned.

A run folder's config is the source of truth for the chat template: the target is loaded
with the run's `init_adapters` (a DPO run's first stage) fused and its adapters applied, and
prompts are rendered with `chat_template` from the run's config. A fused folder carries
that template in its tokenizer_config.json (`poft-mlx fuse` writes it), so it generates
the same tokens. Decoding is mlx-lm's BatchGenerator (continuous batching, KV cache,
mlx-lm's samplers); poft-mlx adds its model loading (float32 and dequantized matmuls on
the CPU backend, OpenBLAS on Linux). poft-mlx's CPU kernels (poft_mlx.kernels) stay off here:
they are compiled per input shape, and continuous batching changes the batch shape as replies
finish, so each new shape paid a C++ compile (measured: 26 vs 43-46 tok/s with them on).

Stopping: besides the tokenizer's eos tokens, the template's end-of-turn token (found by
rendering a probe conversation, as the supervised span does) ends a reply, so a target
whose eos differs from its turn marker (gemma base: <eos> vs <end_of_turn>) stops where it
was trained to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx

from ..config import load_config, read_yaml
from ..data.render import Renderer
from ..rundir import RunDir
from . import modeling
from .adapters import load_policy


@dataclass
class Generator:
    """A loaded model ready to answer: model, tokenizer, renderer (template) and stop tokens."""

    model: object
    tokenizer: object  # mlx-lm's TokenizerWrapper
    renderer: Renderer
    stop_ids: list[int]
    label: str
    source: dict = field(default_factory=dict)  # what was loaded: kind, model, adapters, template
    loaded: object = None  # modeling.Loaded (path, config) behind model and tokenizer

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        """The conversation rendered with the generation prompt, as token ids."""
        text = self.renderer.apply(messages, True)
        return list(self.renderer.tok(text, add_special_tokens=False)["input_ids"])


@dataclass
class Reply:
    text: str
    tokens: list[int]
    finish: str  # "stop" (an end token) or "length" (max_tokens reached)


def is_run_dir(path: str | Path) -> bool:
    return RunDir(path).is_run()


def open_generator(source: str, *, chat_template: str | None = None, dtype: str = "auto",
                   adapter_path: str | None = None, cfg=None) -> Generator:
    """Load `source` for generation: a run folder, a fused folder or any model reference.

    chat_template overrides the template (a builtin name, a .jinja file or Jinja text); by
    default a run uses its config's `chat_template` (else the tokenizer's), anything else the
    tokenizer's. adapter_path applies adapters to a base `source`; cfg (a Config) supplies the
    run's settings when the caller already holds them (eval).
    """
    if cfg is None and is_run_dir(source):
        run = RunDir(source)
        cfg = load_config(base=read_yaml(run.config))
        adapter_path = str(run.adapters)
    if cfg is not None:
        if dtype != "auto":
            cfg = _with_dtype(cfg, dtype)
        loaded = load_policy(cfg, adapter_path)
        template = chat_template or cfg.chat_template
        info = {"kind": "run" if adapter_path else "base", "model": cfg.model, "adapters": adapter_path,
                "init_adapters": cfg.init_adapters}
    else:
        loaded = modeling.load(source, dtype=dtype)
        if adapter_path:
            from mlx_lm.tuner.utils import load_adapters  # lazy: mlx-lm's import is slow

            load_adapters(loaded.model, adapter_path)
        template = chat_template
        info = {"kind": "model", "model": source, "adapters": adapter_path}
    loaded.model.eval()
    kwargs = cfg.data.template_kwargs if cfg is not None else None  # as the run rendered its data
    renderer = Renderer(loaded.tokenizer, chat_template=template, span="last", template_kwargs=kwargs,
                        label=f"model {source}")
    info["chat_template"] = template or "the tokenizer's"
    return Generator(loaded.model, loaded.tokenizer, renderer, stop_tokens(loaded.tokenizer, renderer),
                     str(source), info, loaded)


def _with_dtype(cfg, dtype: str):
    return replace(cfg, system=replace(cfg.system, dtype=dtype))


def stop_tokens(tokenizer, renderer: Renderer) -> list[int]:
    """eos ids plus the first special token that closes an assistant turn in the template."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    eos = getattr(renderer.tok, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    try:
        full = renderer.apply(probe, False)
    except Exception:  # a template that needs a system turn or other fields: eos only
        return sorted(ids)
    start = full.rfind("Hello there") + len("Hello there")
    enc = renderer.tok(full, add_special_tokens=False, return_offsets_mapping=True)
    for tok_id, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if a >= start and int(tok_id) in renderer.special_ids:
            ids.add(int(tok_id))
            break
    return sorted(ids)


def generate(gen: Generator, conversations: list[list[dict]], *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
             on_token: Callable[[int, int], None] | None = None,
             answer_end: Callable[[str], int | None] | None = None) -> list[Reply]:
    """Replies to each conversation (its last turn is the user's), in order.

    Greedy at temperature 0, else sampled (mlx-lm's sampler, top_p) from `seed`. batch_size
    sequences decode together (continuous batching: a finished one is replaced by the next).
    on_token(i, token) is called for every generated token of conversation i (streaming).
    answer_end(text) (optional) says where a reply has given its answer (a character index,
    or None while it has not): the reply ends there (e.g. evaluation.answers.gsm8k_answer_end).
    """
    prompts = [gen.prompt_tokens(m) for m in conversations]
    return generate_tokens(gen.model, gen.tokenizer, prompts, gen.stop_ids, max_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, on_token=on_token,
                           answer_end=answer_end)


def generate_tokens(model, tokenizer, prompts: list[list[int]], stop_ids: Iterable[int], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                    on_token: Callable[[int, int], None] | None = None,
                    stop_strings: list[list[str]] | None = None,
                    answer_end: Callable[[str], int | None] | None = None) -> list[Reply]:
    """Replies to token prompts. stop_strings[i] (optional) ends prompt i's reply at the first
    occurrence of any of its strings in the decoded text; the reply's text is cut there (its
    tokens are those generated up to and including the one that completed the string).
    answer_end (optional, every prompt) ends a reply once answer_end(decoded text) gives the
    index where its answer is complete; the text is cut at that index, the tokens as above."""
    from mlx_lm.generate import BatchGenerator  # lazy: mlx-lm's import is slow
    from mlx_lm.sample_utils import make_sampler

    if not prompts:
        return []
    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    out: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    # Not under kernels.patched (module docstring).
    bg = BatchGenerator(model, stop_tokens=[[t] for t in stop_ids], sampler=sampler,
                        completion_batch_size=batch_size, prefill_batch_size=batch_size)
    try:
        uids = bg.insert(prompts, [max_tokens] * len(prompts))
        index = {u: i for i, u in enumerate(uids)}
        out = {u: [] for u in uids}
        while responses := bg.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    out[r.uid].append(r.token)
                    if on_token is not None:
                        on_token(index[r.uid], r.token)
                    stops = stop_strings[index[r.uid]] if stop_strings else None
                    if (stops or answer_end is not None) and r.finish_reason is None:
                        text = tokenizer.decode(out[r.uid])
                        if (stops and any(s in text for s in stops)) or (answer_end and answer_end(text) is not None):
                            bg.remove([r.uid])
                            finish[r.uid] = "stop"
                            continue
                if r.finish_reason is not None:
                    finish[r.uid] = r.finish_reason
    finally:
        bg.close()
    replies = [Reply(tokenizer.decode(out[u]), out[u], finish.get(u, "length")) for u in uids]
    for i, r in enumerate(replies):
        for s in (stop_strings[i] if stop_strings else None) or []:
            if s in r.text:
                r.text = r.text[:r.text.index(s)]
        end = answer_end(r.text) if answer_end is not None else None
        if end is not None:
            r.text = r.text[:end]
    return replies


class StreamPrinter:
    """Prints one conversation's reply as its tokens arrive (full re-decode: exact text)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tok, self.write, self.tokens, self.shown = tokenizer, write, [], ""

    def __call__(self, i: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tok.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.write(text[len(self.shown):])
        self.shown = text

    def finish(self) -> None:
        """Print what is left (a reply may end inside a multi-byte character)."""
        text = self.tok.decode(self.tokens)
        self.write(text[len(self.shown):])
        self.shown = text
