"""Tiny offline models for mechanics tests: a BPE tokenizer trained on the spot + random weights."""

from __future__ import annotations

import json
from pathlib import Path

import poft_mlx  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus three? Two plus three is five.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "user assistant system model",
] * 20

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5's template shape: a default system prompt when none is given.
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- else %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{%- endif %}{%- for m in messages %}{%- if not (m.role == 'system' and loop.first) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def make_tokenizer(folder: Path, vocab_size: int = 300, template: str | None = CHATML, style: str = "chatml") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<bos>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    eos = "<|im_end|>" if style == "chatml" else "<end_of_turn>"
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": eos,
           "pad_token": "<pad>", "model_max_length": 4096}
    if template:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok.get_vocab_size()


def make_model(folder: Path, *, vocab_size: int = 300, arch: str = "llama", seed: int = 0,
               template: str | None = CHATML, style: str = "chatml", hidden: int = 32, layers: int = 2) -> Path:
    """A random tiny decoder in HF layout that mlx_lm.load reads."""
    import importlib

    folder = Path(folder)
    n_vocab = make_tokenizer(folder, vocab_size, template, style)
    config = {"model_type": arch, "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": 2 * hidden,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": n_vocab,
              "tie_word_embeddings": arch != "qwen2", "rope_theta": 10000.0, "max_position_embeddings": 512}
    if arch == "gemma3_text":
        config.update(head_dim=8, query_pre_attn_scalar=8, sliding_window=64, sliding_window_pattern=2)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = module.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class Enc:
    """An encoding for make_batch: `tokens`, supervised from position `start` on."""

    def __init__(self, tokens, start):
        import numpy as np

        self.tokens = np.asarray(tokens, np.int32)
        self.mask = np.zeros(len(tokens), bool)
        self.mask[start:] = True


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def gsm_like(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rec = {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                            {"role": "assistant", "content": f"{a} plus {b} is {a + b}. " * (1 + i % 3)}]}
        if i % 4 == 0:
            rec = {"prompt": f"Say hello {i}.", "completion": "Hello! How can I help you today?"}
        if i % 5 == 0:
            rec["messages"] = [{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": "Hello!"},
                               {"role": "assistant", "content": "Hello! How can I help you?"},
                               {"role": "user", "content": f"What is {a} plus {b}?"},
                               {"role": "assistant", "content": f"It is {a + b}."}]
            rec.pop("prompt", None)
            rec.pop("completion", None)
        out.append(rec)
    return out


def matmul_tol(cpu: float) -> float:
    """A tolerance for comparisons that go through float32 matmuls of different shapes.

    Exact-ish on the CPU (BLAS sgemm) and on Metal; MLX's CUDA backend runs float32
    matmuls in TF32 (10-bit mantissa), measured at ~1e-4 relative on these models.
    """
    from poft_mlx.runtime.device import backend

    return cpu if backend() != "cuda" else max(cpu, 2e-3)


def write_tiny_config(root: Path, models: dict, *, n_valid: int = 8, **sections) -> Path:
    """The shared end-to-end config: the tiny target and both aligned models on GSM-like data.

    Writes train.jsonl (24 records), valid.jsonl and cfg.yaml into `root`; each keyword is a
    config section (e.g. ``train={...}``) or key that the calling test sets.
    """
    import yaml

    cfg = {
        "model": str(models["target"]),
        "chat_template": "gemma",
        "aligned": [str(models["aligned_a"]), str(models["aligned_b"])],
        "data": {"train": str(write_jsonl(root / "train.jsonl", gsm_like(24))),
                 "valid": str(write_jsonl(root / "valid.jsonl", gsm_like(n_valid, offset=100))),
                 "max_seq_length": 96},
        **sections,
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
