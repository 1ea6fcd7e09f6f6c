"""Export a training run as a fused Hugging Face model folder, checked (PEFT adapters: peft.py).

Why the check: mlx-lm's fuse re-quantizes the fused weight when the base is quantized, and a LoRA
delta smaller than half a quantization step rounds away, so the "fine-tuned" model silently equals
the base (mlx-lm #1172). `fuse_run` therefore dequantizes by default and always compares the
fused model, read back from disk, with base + adapter on a few real samples, failing loudly with
the numbers when they differ.

Layouts: a run folder holds adapters/adapter_config.json + adapters/adapters.safetensors in
mlx-lm's layout (LoRALinear: y = base(x) + scale * (x @ lora_a) @ lora_b, lora_a (in, r),
lora_b (r, out); DoRA adds the magnitude m (out,)) and config.yaml, metrics.jsonl,
data_fingerprint.txt. MLX parameter names equal Hugging Face names for the text models mlx-lm
mirrors (llama, qwen2, gemma3, ...), so weights are written under their own names.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model, load_model, load_tokenizer, make_shards, save_config

from ..data.render import resolve_template
from ..errors import ExportError, FuseCheckError
from ..runtime import diskspace
from .hub import CHECK_FILE
from .run import PARTIAL, Run, empty_out_dir, load_run_model, open_finished_run, require_base, write_provenance

__all__ = ["CheckReport", "ExportError", "FuseCheckError", "FuseReport", "Run", "check_fused", "fuse_run"]

MAX_CHECK_TOKENS = 128
_FALLBACK_SAMPLES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Write a short poem about the sea, the wind and a lighthouse keeper who cannot sleep.",
    "Question: what is 17 times 23? Answer: 17 times 23 is 391.",
    "In 1905 Albert Einstein published four papers that changed physics.",
]
# Files of a base folder never copied into an export: weights (rewritten), its config
# (rewritten), its model card (push writes ours).
_NOT_COPIED = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.gguf", "*.pt", "*.pth",
               "*.h5", "*.msgpack", "*.npz", "config.json", "README.md", ".*"]


@dataclass
class CheckReport:
    """Fused vs base + adapter on `samples` sequences (`tokens` positions), computed in float32.

    When the fused folder was dequantized, the reference base (+ adapter) is the base
    dequantized the same way, so the check isolates the fuse from the cost of storing a
    quantized base in a float dtype, which is reported apart (dequantization_kl / _max_abs:
    quantized base vs its dequantized copy).
    mean_kl = mean over tokens of KL(adapter || fused); effect_kl = KL(adapter || base), the
    size of the adapter's effect; base_kl = KL(base || fused). max_abs_diff = max |fused -
    adapter| logit, adapter_effect = max |adapter - base|, fused_vs_base = max |fused - base|.
    Passes when mean_kl <= atol + tol * effect_kl: KL rather than the max logit because bf16
    rounding of fused weights moves a few logits of a 50k-vocabulary model by ~0.2 while the
    distributions barely change. erased: the fused model is nearer the base than the adapter.
    Memory: one model at a time, in float32 (4 bytes per parameter).
    """

    samples: int
    tokens: int
    mean_kl: float
    effect_kl: float
    base_kl: float
    max_abs_diff: float
    adapter_effect: float
    fused_vs_base: float
    top1_agreement: float
    base_top1_agreement: float
    dequantization_kl: float | None
    dequantization_max_abs: float | None
    tol: float
    atol: float
    passed: bool
    erased: bool
    requantized: bool  # the fused folder keeps MLX quantization
    sample_source: str
    notes: list[str] = field(default_factory=list)


@dataclass
class FuseReport:
    """What fuse_run wrote; dequantized: a quantized base was written as float."""

    out_dir: Path
    base: Path
    fine_tune_type: str
    quantized_base: bool
    dequantized: bool
    check: CheckReport | None


def fuse_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dequantize: bool = True,
    check: bool = True,
    tol: float = 0.1,
    atol: float = 1e-5,
    base: str | Path | None = None,
) -> FuseReport:
    """Fuse a run's adapter into its base and write a Hugging Face model folder to `out_dir`.

    With dequantize (default) a quantized base is written in its dequantized float dtype, with
    no quantization block in config.json, so transformers loads it; dequantize=False keeps MLX
    quantization (an mlx-lm folder) and re-rounds the fused weights. With check, the folder is
    read back and compared with base + adapter (see CheckReport); the report goes to
    out_dir/poft_fuse_check.json and a failure raises FuseCheckError.
    """
    run = open_finished_run(run_dir, base)
    base_dir = require_base(run)
    out = empty_out_dir(out_dir)
    # Everything is written into a hidden folder inside `out` and moved up when complete: a full
    # disk (DiskFull) or a crash leaves no partial model where a later command would take it.
    work = out / PARTIAL
    work.mkdir()
    try:
        report = _fuse_into(run, base_dir, work, out, dequantize=dequantize, check=check, tol=tol, atol=atol)
    except FuseCheckError:
        _move_up(work, out)  # the failing report stays for inspection (push refuses the folder)
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _move_up(work, out)
    return report


def _fuse_into(run: Run, base_dir: Path, out: Path, final: Path, *, dequantize: bool, check: bool, tol: float,
               atol: float) -> FuseReport:
    model, config = load_run_model(run, with_adapter=True)
    quantized = "quantization" in config or any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if "lora_a" in m]
    if fused:
        model.update_modules(tree_unflatten(fused))
    hf_config = json.loads((base_dir / "config.json").read_text())
    if dequantize:
        model = dequantize_model(model)
        hf_config.pop("quantization", None)
        hf_config.pop("quantization_config", None)
    weights = dict(tree_flatten(model.parameters()))
    for key in {"torch_dtype"} | ({"dtype"} & set(hf_config)):  # transformers 5 reads dtype
        hf_config[key] = _float_dtype_name(weights)
    side = sum(p.stat().st_size for p in base_dir.iterdir() if p.is_file() and not p.name.endswith(".safetensors"))
    need = diskspace.nbytes(weights) + side
    hint = f"nothing was left in {final}; free space and run fuse again"
    diskspace.check_space(out, need, hint)  # before writing anything
    with diskspace.writing(out, need, hint):
        _write_weights(out, weights)
        save_config(hf_config, out / "config.json")
        del model, weights
        _copy_side_files(base_dir, out, hf_config)
        _write_chat_template(run, out)
        write_provenance(run, out, "fused" + (" (dequantized)" if dequantize and quantized else ""))
    report = FuseReport(final, base_dir, run.fine_tune_type, quantized, quantized and dequantize, None)
    if check:
        report.check = check_fused(run, out, tol=tol, atol=atol)
        with diskspace.writing(out / CHECK_FILE, 4096, hint):
            (out / CHECK_FILE).write_text(json.dumps(asdict(report.check), indent=2) + "\n")
        if not report.check.passed:
            raise FuseCheckError(_failure_message(final, report.check), report.check)
    return report


def _move_up(work: Path, out: Path) -> None:
    """The finished files from `work` into `out` (renames on one file system), then `work` goes."""
    for path in sorted(work.iterdir()):
        os.replace(path, out / path.name)
    work.rmdir()


def _float_dtype_name(weights: dict[str, mx.array]) -> str:
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dtype = max(set(floats), key=floats.count) if floats else mx.float32
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")


def _write_weights(out: Path, weights: dict[str, mx.array]) -> None:
    """Safetensors tagged format=pt (transformers' convention), an index only when sharded."""
    shards = make_shards(weights)
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), shards[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_side_files(base: Path, out: Path, hf_config: dict[str, Any]) -> None:
    """Tokenizer, chat template, generation config, licence and custom code, copied verbatim."""
    for path in sorted(base.iterdir()):
        if path.is_file() and not any(fnmatch.fnmatch(path.name, p) for p in _NOT_COPIED):
            shutil.copy2(path, out / path.name)
    if not (out / "generation_config.json").exists():
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_chat_template(run: Run, out: Path) -> None:
    """The template the run trained with goes into tokenizer_config.json, so that every tool that
    reads the folder (mlx_lm.generate, transformers, poft-mlx generate) formats prompts the way the
    model learned; a base without a template (gemma-3 base) would otherwise get none."""
    spec = run.folder.read_config().get("chat_template")
    path = out / "tokenizer_config.json"
    if not spec or not path.is_file():
        return
    config = json.loads(path.read_text())
    config["chat_template"] = resolve_template(spec)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)  # transformers 5 prefers this file: keep one source


def check_samples(run: Run, tokenizer: Any, vocab_size: int) -> tuple[list[list[int]], str]:
    """Up to 4 token sequences (<= 128 tokens) from the run's training data, else fixed English."""
    texts = _training_texts(run)
    source = "training data" if texts else "fixed English sentences"
    texts = texts or _FALLBACK_SAMPLES
    if tokenizer is None:  # pseudo-random ids: the check compares models, not text
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab_size, 48).tolist() for _ in range(4)], "random token ids (no tokenizer)"
    samples = [ids[:MAX_CHECK_TOKENS] for ids in (list(tokenizer.encode(t)) for t in texts) if ids]
    return (samples, source) if samples else check_samples(run, None, vocab_size)


def _training_texts(run: Run, limit: int = 4) -> list[str]:
    train = (run.folder.read_config().get("data") or {}).get("train")
    if not train:
        return []
    path = Path(str(train))
    path = path if path.is_file() else run.run_dir / path
    texts: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if isinstance(record.get("messages"), list):
            text = "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
        else:
            text = "".join(str(record.get(k, "")) for k in ("prompt", "completion", "text"))
        if text.strip():
            texts.append(text)
        if len(texts) == limit:
            break
    return texts


def _logits(model: nn.Module, samples: list[list[int]]) -> list[np.ndarray]:
    # float32 so the check measures the weights written, not activation rounding. Quantized
    # layers are expanded exactly in float32 (scales cast first): same values as the quantized
    # matmul, which is ~30x slower on CPU.
    model.set_dtype(mx.float32)
    model = dequantize_model(model)
    out = [np.array(model(mx.array(ids)[None])[0].astype(mx.float32)) for ids in samples]
    mx.clear_cache()
    return out


def _compare(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float, float]:
    """max |a - b|, mean KL(a || b) over tokens, top-1 agreement of b with a."""
    diff, kl, agree, n = 0.0, 0.0, 0.0, 0
    for x, y in zip(a, b):
        x, y = x.astype(np.float64), y.astype(np.float64)  # float32 KL noise is ~1e-7
        lx = x - _logsumexp(x)
        ly = y - _logsumexp(y)
        diff = max(diff, float(np.abs(x - y).max()))
        kl += float(np.sum(np.exp(lx) * (lx - ly)))
        agree += float(np.sum(x.argmax(-1) == y.argmax(-1)))
        n += x.shape[0]
    return diff, max(kl / n, 0.0), agree / n


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def check_fused(
    run: Run | str | Path, fused_dir: str | Path, *, tol: float = 0.1, atol: float = 1e-5
) -> CheckReport:
    """Compare the fused folder with base + adapter and with the base, one model in memory at a time."""
    run = run if isinstance(run, Run) else open_finished_run(run)
    fused_dir = Path(fused_dir)
    base = require_base(run)
    try:
        tokenizer = load_tokenizer(base)
    except Exception:  # the check works on ids; a missing tokenizer only changes the samples
        tokenizer = None
    base_config = json.loads((base / "config.json").read_text())
    try:
        fused_config = json.loads((fused_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"the fused folder {fused_dir} has no readable config.json: {e}") from None
    dequantized = "quantization" in base_config and "quantization" not in fused_config
    samples, source = check_samples(run, tokenizer, int(base_config.get("vocab_size", 256)))
    adapted = _logits(load_run_model(run, with_adapter=True, dequantize=dequantized)[0], samples)
    base_logits = _logits(load_run_model(run, with_adapter=False, dequantize=dequantized)[0], samples)
    try:
        fused = _logits(load_model(fused_dir)[0], samples)
    except Exception as e:
        raise ExportError(f"the fused folder {fused_dir} does not load back: {e}") from None
    max_diff, kl, top1 = _compare(adapted, fused)
    effect, effect_kl, base_top1 = _compare(adapted, base_logits)
    fused_vs_base, base_kl, _ = _compare(base_logits, fused)
    deq_max = deq_kl = None
    if dequantized:
        deq_max, deq_kl, _ = _compare(_logits(load_run_model(run, with_adapter=False)[0], samples), base_logits)
    notes = []
    if effect_kl <= atol:
        notes.append(f"the adapter barely changes the base (mean KL {effect_kl:.3g} <= atol): nothing to verify")
    if deq_kl is not None and deq_kl > effect_kl:
        notes.append(f"storing the quantized base as {fused_config.get('torch_dtype')} changes it more "
                     f"(KL {deq_kl:.3g}) than the adapter does (KL {effect_kl:.3g})")
    passed = kl <= atol + tol * effect_kl
    return CheckReport(
        samples=len(samples), tokens=sum(len(s) for s in samples), mean_kl=kl, effect_kl=effect_kl,
        base_kl=base_kl, max_abs_diff=max_diff, adapter_effect=effect, fused_vs_base=fused_vs_base,
        top1_agreement=top1, base_top1_agreement=base_top1, dequantization_kl=deq_kl,
        dequantization_max_abs=deq_max, tol=tol, atol=atol, passed=passed,
        erased=not passed and base_kl < kl, requantized="quantization" in fused_config,
        sample_source=source, notes=notes,
    )


def _failure_message(out: Path, r: CheckReport) -> str:
    msg = (
        f"the fused model in {out} does not reproduce base + adapter: mean KL(adapter || fused) {r.mean_kl:.4g} "
        f"> allowed {r.atol + r.tol * r.effect_kl:.4g} (atol {r.atol:g} + tol {r.tol:g} x the adapter's own effect, "
        f"KL(adapter || base) {r.effect_kl:.4g}); max |fused - adapter| logit {r.max_abs_diff:.4g} (adapter effect "
        f"{r.adapter_effect:.4g}); top-1 agreement {r.top1_agreement:.3f} (base: {r.base_top1_agreement:.3f}); "
        f"{r.tokens} tokens."
    )
    if r.erased:
        msg += f" The fused model is closer to the base than to the adapter (KL(base || fused) {r.base_kl:.4g})."
    if r.requantized:
        msg += (" Re-quantizing the fused weights rounded the adapter update away: fuse with dequantize=True"
                " (no --keep-quantization).")
    else:
        msg += " The fused weights or config are wrong for this model: please report it with the check file."
    return msg + f" Report: {out / CHECK_FILE}"
