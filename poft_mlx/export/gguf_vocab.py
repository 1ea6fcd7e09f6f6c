"""A Hugging Face tokenizer folder as llama.cpp's GGUF tokenizer metadata (the reverse of
models/gguf_tokenizer.py, which rebuilds tokenizer.json from a GGUF).

llama.cpp knows two tokenizer models that cover our architectures:

- `gpt2`: byte-level BPE (SmolLM2, Qwen2, Llama 3, the tests' tiny models). The merges are
  written as they are; the split regex is not stored but named (`tokenizer.ggml.pre`), so the
  pre-tokenizer of tokenizer.json must be one whose llama.cpp name we know (see _PRE).
- `llama`: SentencePiece (Gemma 3, Llama 2). tokenizer.json holds a BPE with byte fallback
  and merges, while llama.cpp merges the adjacent pair whose joined token scores highest; a
  token scored by minus the rank of the first merge that makes it gives the same merge order
  (models/gguf_tokenizer.sentencepiece_merges builds the merges from scores the same way).

Token types follow convert_hf_to_gguf.py: added special tokens are CONTROL, other added
tokens USER_DEFINED (SentencePiece ones with the meta-space replaced by a space, as llama.cpp
matches them in raw text), <0xNN> pieces of a SentencePiece vocabulary BYTE, missing ids
`[PADn]` UNUSED up to the embedding's row count (llama.cpp requires one token per row).
add_bos / add_eos are what transformers' AutoTokenizer does for the folder (so llama.cpp
tokenizes a prompt as mlx-lm does), always written because llama.cpp's defaults differ per
tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import ExportError
from ..models.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

TT = gguf.TokenType
# The split regexes of the byte-level tokenizers llama.cpp names (its llama-vocab.cpp) are the
# ones the GGUF reader rebuilds tokenizers with: one copy, in models/gguf_tokenizer.py.
# The pre-tokenizer steps of tokenizer.json (see _steps) -> llama.cpp's tokenizer.ggml.pre.
_PRE = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """What add_vocab writes: one entry per embedding row."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)  # gpt2 only
    scores: list[float] = field(default_factory=list)  # llama only
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None


def read_vocab(folder: str | Path, n_rows: int) -> Vocab:
    """The GGUF tokenizer of model folder `folder` whose embedding has `n_rows` rows."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    spec = read_json_object(path,
                            "GGUF export needs the fast tokenizer file (tokenizer.json)")
    config = read_json_object(folder / "tokenizer_config.json")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: model.type {model.get('type')!r} is not supported; supported: BPE "
                          "(byte-level, or SentencePiece-style with byte_fallback)")
    vocab: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab.update({i: a["content"] for i, a in added.items()})
    if vocab and max(vocab) >= n_rows:
        raise ExportError(f"{path}: token id {max(vocab)} does not fit the embedding's {n_rows} rows")
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if byte_level:
        out = Vocab("gpt2", _pre_name(path, spec), *_tokens(vocab, added, n_rows, spm=False))
        out.merges = _merges(path, model.get("merges", []))
    elif model.get("byte_fallback"):
        out = Vocab("llama", "default", *_tokens(vocab, added, n_rows, spm=True, unk=model.get("unk_token")))
        out.scores = _scores(out.tokens, model.get("merges", []), path)
        out.add_space_prefix = _space_prefix(spec)
    else:
        raise ExportError(f"{path}: a BPE with neither a ByteLevel pre_tokenizer nor byte_fallback; "
                          "llama.cpp has no tokenizer for it")
    out.special = _special_ids(folder, config, out.tokens)
    out.add_bos, out.add_eos = _adds_specials(folder, out.special)
    out.chat_template = chat_template(folder, config)
    return out


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind, token_id in vocab.special.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def chat_template(folder: Path, config: dict[str, Any] | None = None) -> str | None:
    """The folder's template: tokenizer_config.json's (where fuse writes the run's), else chat_template.jinja."""
    config = read_json_object(folder / "tokenizer_config.json") if config is None else config
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise ExportError(f"{folder / 'tokenizer_config.json'}: chat_template is a list of named templates; "
                          "GGUF export takes one template (set chat_template to a string)")
    return template


def _tokens(vocab: dict[int, str], added: dict[int, dict], n_rows: int, *, spm: bool,
            unk: str | None = None) -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for i in range(n_rows):
        token = vocab.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            special = added[i].get("special", False)
            tokens.append(token if special or not spm else token.replace("\u2581", " "))
            types.append(TT.CONTROL if special else TT.USER_DEFINED)
        else:
            tokens.append(token)
            kind = TT.NORMAL
            if spm and token == unk:
                kind = TT.UNKNOWN
            elif spm and _BYTE_PIECE.fullmatch(token):
                kind = TT.BYTE
            types.append(kind)
    return tokens, [int(t) for t in types]


def _steps(node: dict | None) -> tuple:
    """A pre_tokenizer as comparable steps: (type, what matters for llama.cpp's choice)."""
    if not node:
        return ()
    if node.get("type") == "Sequence":
        return tuple(s for child in node.get("pretokenizers", []) for s in _steps(child))
    kind = node.get("type")
    if kind == "ByteLevel":
        return ((kind, node.get("use_regex", True)),)
    if kind == "Digits":
        return ((kind, node.get("individual_digits", False)),)
    if kind == "Split":
        pattern = node.get("pattern", {})
        return ((kind, pattern.get("Regex", pattern.get("String"))),)
    return ((kind, None),)


def _pre_name(path: Path, spec: dict[str, Any]) -> str:
    steps = _steps(spec.get("pre_tokenizer"))
    for node in [spec.get("pre_tokenizer") or {}, *(spec.get("pre_tokenizer") or {}).get("pretokenizers", [])]:
        if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            raise ExportError(f"{path}: pre_tokenizer ByteLevel has add_prefix_space true, which llama.cpp "
                              "does not do")
    name = _PRE.get(steps)
    if name is None:
        known = "; ".join(f"{n}: {' + '.join(k for k, _ in s)}" for s, n in _PRE.items())
        raise ExportError(f"{path}: pre_tokenizer {[k for k, _ in steps]} is not one llama.cpp names "
                          f"(tokenizer.ggml.pre); supported: {known}")
    return name


def _merges(path: Path, merges: list) -> list[str]:
    if merges and isinstance(merges[0], list):
        # transformers >= 4.45 writes pairs so that pieces may hold spaces; llama.cpp's merges are
        # "a b" strings, with a space inside a piece spelt U+0120 + its offset (convert_hf_to_gguf).
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    if merges and not isinstance(merges[0], str):
        raise ExportError(f"{path}: model.merges has entries of type {type(merges[0]).__name__}")
    return list(merges)


def _scores(tokens: list[str], merges: list, path: Path) -> list[float]:
    """Minus the rank of the first merge making each token; tokens no merge makes score lowest."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        pair = merge if isinstance(merge, list) else merge.split(" ", 1)
        if len(pair) != 2:
            raise ExportError(f"{path}: model.merges[{rank}] {merge!r} is not a pair")
        first.setdefault(pair[0] + pair[1], rank)
    floor = -float(len(merges) + 1)
    return [-float(first[t]) if t in first else (0.0 if len(t) == 1 else floor) for t in tokens]


def _space_prefix(spec: dict[str, Any]) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    prepend = '"type": "Prepend"' in text
    metaspace = re.search(r'"prepend_scheme": "(first|always)"', text) is not None
    return prepend or metaspace


def _special_ids(folder: Path, config: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    """bos / eos / unk / pad ids: tokenizer_config.json's tokens, else config.json's ids."""
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    model_config = read_json_object(folder / "config.json")
    out = {}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unk"), ("pad", "pad")):
        entry = config.get(f"{key}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text in ids:
            out[kind] = ids[text]
            continue
        value = model_config.get(f"{key}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < len(tokens):
            out[kind] = value
    return out


def _adds_specials(folder: Path, special: dict[str, int]) -> tuple[bool, bool]:
    """Whether AutoTokenizer (what mlx-lm uses) adds BOS / EOS to a plain text."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a folder it cannot read
        raise ExportError(f"{folder}: transformers cannot load the tokenizer ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None
    with_specials, plain = tok("a").input_ids, tok("a", add_special_tokens=False).input_ids
    extra = len(with_specials) - len(plain)
    add_bos = extra > 0 and with_specials[0] == special.get("bos") and with_specials[1:len(plain) + 1] == plain
    add_eos = extra > 0 and with_specials[-1] == special.get("eos") and with_specials[-len(plain) - 1:-1] == plain
    return bool(add_bos), bool(add_eos)


def read_json_object(path: Path, missing: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`, ExportError naming the file when it is not one; a missing file is
    {} when `missing` is None, else an ExportError saying what the file is (`missing`)."""
    if not path.is_file():
        if missing is None:
            return {}
        raise ExportError(f"{path} is missing: {missing}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
