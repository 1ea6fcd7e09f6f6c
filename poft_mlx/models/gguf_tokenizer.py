"""Rebuild a Hugging Face tokenizer from the vocabulary stored in a GGUF's metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the tokens, a type per
token, merges (byte-level BPE) or scores (SentencePiece), the special token ids and the name of
the pre-tokenizer (`tokenizer.ggml.pre`). Two tokenizer models cover our architectures:

- `gpt2`: byte-level BPE (SmolLM2, Qwen2). The merges are in the file; the pre-tokenizer is
  chosen by name, because the split regex is not stored.
- `llama`: SentencePiece BPE (Gemma 3, Llama 2). The merges are rebuilt from the scores: a
  SentencePiece BPE merges the adjacent pair whose joined piece scores highest, which is an HF
  BPE whose merges are ranked by the score of their result. Unknown characters fall back to
  the <0xNN> byte tokens.

Control tokens become special added tokens; user-defined ones (Gemma's runs of spaces and
newlines, Qwen's <tool_call>) become added tokens matched whole in the raw text, as llama.cpp
and SentencePiece match them.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import ModelFileError

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of the Hugging Face tokenizers these vocabularies were trained with.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "qwen2", "llama-bpe", "llama3")
_SPECIAL_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The `tokenizers` tokenizer described by GGUF metadata `meta` (key -> value)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta)
    else:
        raise ModelFileError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    tokens, types = meta["tokenizer.ggml.tokens"], _types(meta)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )
    tokenizer.post_processor = _post_processor(meta)
    return tokenizer


def tokenizer_files(meta: dict[str, Any], chat_template: str | None = None) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for the tokenizer of `meta`.

    `chat_template` replaces the GGUF's `tokenizer.chat_template` when given.
    """
    special = special_tokens(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length", 2048),
    }
    template = chat_template if chat_template is not None else meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    """{"bos_token": "<s>", ...} for the special token ids the GGUF names."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id") for name, key in _SPECIAL_IDS.items()}
    return {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}


def _byte_level_bpe(meta: dict[str, Any]) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise ModelFileError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(BYTE_LEVEL_PRE_TOKENIZERS)}"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    llama3 = pre in ("llama-bpe", "llama3")
    tokenizer = Tokenizer(models.BPE(_vocab(meta["tokenizer.ggml.tokens"]), merges, ignore_merges=llama3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("qwen2", "llama-bpe", "llama3"))
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any]) -> Tokenizer:
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = _types(meta)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    model = models.BPE(
        _vocab(tokens), sentencepiece_merges(tokens, scores, types),
        unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True,
    )  # fmt: skip
    tokenizer = Tokenizer(model)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's highest-scoring-piece-first rule.

    Every split of a normal token into two normal tokens is a merge, ranked by the token's score
    (best first, then by id); splits of one token are ordered by the ids of their pieces.
    """
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == NORMAL}
    ranked = sorted((i for t, i in normal.items() if len(t) > 1), key=lambda i: (-scores[i], i))
    merges: list[tuple[str, str]] = []
    for i in ranked:
        token = tokens[i]
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = [p for p in pairs if p[0] in normal and p[1] in normal]
        merges.extend(sorted(pairs, key=lambda p: (normal[p[0]], normal[p[1]])))
    return merges


def _post_processor(meta: dict[str, Any]) -> processors.PostProcessor | None:
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    add_bos = _add_bos(meta) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False) if meta.get("tokenizer.ggml.model") == "gpt2" else None

    def sequence(name: str, type_id: int) -> list[str]:
        head = [f"{tokens[bos]}:{type_id}"] if add_bos else []
        return head + [f"${name}:{type_id}"] + ([f"{tokens[eos]}:{type_id}"] if add_eos else [])

    special = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
    return processors.TemplateProcessing(
        single=" ".join(sequence("A", 0)), pair=" ".join(sequence("A", 0) + sequence("B", 1)), special_tokens=special
    )


def _add_bos(meta: dict[str, Any]) -> bool:
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))


def _types(meta: dict[str, Any]) -> list[int]:
    # Old files carry no token types: every token is then a normal one.
    return meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(meta["tokenizer.ggml.tokens"])


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a duplicate keeps its first id
    return vocab
