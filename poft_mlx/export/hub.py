"""Push a poft-mlx export to the Hugging Face Hub with a card that records how it was made.

The card states the target and aligned models, the objective and its beta/gamma, the training
data fingerprint, the final metrics that apply to the objective (each with its meaning) and the
poft-mlx version, so that a model on the Hub can be traced back to its run. Models are named as
the user gave them when that is portable (a Hub id, a pypi: alias, a GGUF file name with its
sha256), never by a path of this machine (modelref.portable_ref); the front matter carries what
the Hub reads: base_model (a Hub id only) and base_model_relation, license (only when the base
states one), datasets (Hub data sets only) and tags. The token comes from
`huggingface_hub.get_token()` (HF_TOKEN, then the `hf auth login` cache) and is handed to the
client only: it is never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from ..errors import HubError
from ..rundir import ADAPTER_CONFIG, RunDir

PROVENANCE_FILE = "poft_provenance.json"  # written by export beside every exported folder
PEFT_CONFIG = "adapter_config.json"  # a PEFT adapter folder's config (the name mlx-lm's adapters share)
CONFIG_COPY = "poft_config.yaml"  # the run's resolved config, local paths cut (export/run.portable_config)
CHECK_FILE = "poft_fuse_check.json"  # the fused-vs-adapter check report
_BEGIN = "<!-- poft-mlx:begin (generated; replaced on every push) -->"
_END = "<!-- poft-mlx:end -->"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class UploadFile:
    """One file of a push: its path inside the repository and its size in bytes."""

    path: str
    size: int


def collect_provenance(run_dir: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """What the model card states about a run, as a JSON-ready mapping, with no local path in it.

    `base` is the local base model folder (default: where adapter_config.json says); its licence
    (README front matter, config.json, or the GGUF it was converted from) is recorded when stated.
    """
    from ..models.refs import hub_cache_id, portable_ref  # lazy: loads mlx and gguf-py; keeps push light

    run = RunDir(run_dir)
    config = run.read_config()
    aligned = [a.get("model") if isinstance(a, dict) else a for a in config.get("aligned") or []]
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    fingerprint = (run.fingerprint.read_text().split() or [None])[0] if run.fingerprint.is_file() else None
    adapter = run.adapter_config()
    objective = config.get("objective")
    # Only the settings the objective uses (PoFT: beta, gamma; DPO: its dpo.beta; SFT: none).
    known = _objective(objective)
    used = known.hyperparameters(config) if known else {}
    beta, gamma = used.get("beta"), used.get("gamma")
    # What the user wrote (config.yaml), else what the trainer recorded; adapter "model" is the resolved folder.
    target = config.get("model") or (adapter.get("poft_mlx") or {}).get("target") or adapter.get("model")
    target_ref = portable_ref(str(target)) if target else None
    aligned_refs = [portable_ref(str(a)) for a in aligned if a]
    base = base or adapter.get("model")
    datasets = [d for k in ("train", "valid", "test") for d in _hub_datasets(data.get(k), hub_cache_id)]
    return {
        "poft_mlx_version": __version__,
        "target": target_ref["ref"] if target_ref else None,
        "target_ref": target_ref,
        "aligned": [r["ref"] for r in aligned_refs],
        "aligned_refs": aligned_refs,
        "objective": objective,
        "beta": beta,
        "gamma": gamma,
        "train_data": _portable_sources(data.get("train")),
        "data_fingerprint": fingerprint,
        "datasets": list(dict.fromkeys(d for d in datasets if d)),
        "license": base_license(base) if base else None,
        "final_metrics": run.last_metrics(),
        "fine_tune": {
            "type": adapter.get("fine_tune_type", "lora"),
            "num_layers": adapter.get("num_layers"),
            **(adapter.get("lora_parameters") or {}),
        }
        if adapter
        else {},
    }


def _portable_sources(spec) -> str | None:
    """data.train as the card states it: each source's file or folder name (no path of this
    machine), an hf: source as written, and weights; None when absent."""
    if not spec:
        return None
    from ..data.sources import entries  # lazy: keeps push light

    names = []
    for e in entries(spec):
        name = e.path if e.path.startswith("hf:") else (Path(e.path).name or e.path)
        names.append(name + (f" (weight {e.weight:g})" if e.weight is not None else ""))
    return " + ".join(names)


def _hub_datasets(spec, hub_cache_id) -> list[str]:
    """The Hub data set ids among the sources of `spec`: hf: ids, and local files that lie in a
    Hugging Face datasets cache."""
    if not spec:
        return []
    from ..data.sources import entries, parse_hf  # lazy: keeps push light

    out = []
    for e in entries(spec):
        ident = parse_hf(e.path).repo if e.path.startswith("hf:") else hub_cache_id(e.path, "datasets")
        if ident:
            out.append(ident)
    return out


def base_license(folder: str | Path) -> str | None:
    """The licence id a model folder states: its README front matter, config.json, or the GGUF
    metadata it was converted from (general.license); None when it states none."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    readme = folder / "README.md"
    candidates = [
        _split_front_matter(readme.read_text(errors="replace"))[0].get("license") if readme.is_file() else None,
        _read_json(folder / "config.json").get("license"),
        (_read_json(folder / "poft_conversion.json").get("general") or {}).get("general.license"),
    ]
    return next((c.strip() for c in candidates if isinstance(c, str) and c.strip()), None)


def _folder_kind(folder: Path) -> str:
    """peft, mlx (MLX-quantized or a run folder) or transformers: decides library_name and usage."""
    peft = _read_json(folder / PEFT_CONFIG)
    if peft.get("peft_type"):
        return "peft"
    config = _read_json(folder / "config.json")
    if config and "quantization" not in config and "quantization_config" not in config:
        return "transformers"
    return "mlx"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _provenance(folder: Path) -> dict[str, Any]:
    if (folder / PROVENANCE_FILE).is_file():
        return _read_json(folder / PROVENANCE_FILE)
    if RunDir(folder).config.is_file():  # a run folder pushed as is
        return collect_provenance(folder)
    return {}


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    if text.startswith("---\n") and "\n---" in text[4:]:
        head, _, body = text[4:].partition("\n---")
        try:
            meta = yaml.safe_load(head) or {}
        except yaml.YAMLError:
            meta = {}
        if isinstance(meta, dict):
            return meta, body.lstrip("-").lstrip("\n")
    return {}, text


def _model_ref(prov: dict[str, Any], key: str = "target") -> dict[str, str] | None:
    """The portable reference of `prov[key]`: as recorded, or made from an older provenance's string."""
    ref = prov.get(f"{key}_ref")
    if isinstance(ref, dict) and ref.get("ref"):
        return ref
    if prov.get(key):
        from ..models.refs import portable_ref  # lazy: loads mlx and gguf-py; keeps push light

        return portable_ref(str(prov[key]))
    return None


def _aligned_refs(prov: dict[str, Any]) -> list[dict[str, str]]:
    refs = prov.get("aligned_refs")
    if isinstance(refs, list) and all(isinstance(r, dict) and r.get("ref") for r in refs):
        return refs
    from ..models.refs import portable_ref  # lazy: loads mlx and gguf-py; keeps push light

    return [portable_ref(str(a)) for a in prov.get("aligned") or [] if a]


def _describe(ref: dict[str, str] | None) -> str:
    """A model reference in the card's words: what it is and the hash that pins it."""
    if not ref:
        return "an unrecorded base model"
    name, kind = f"`{ref['ref']}`", ref.get("kind")
    if kind == "pypi":
        what = f"a GGUF of `{ref['hub_id']}`" if ref.get("hub_id") else "a GGUF on PyPI"
        sha = f", sha256 `{ref['sha256']}`" if ref.get("sha256") else ""
        return f"{name} ({what}{sha})"
    if kind == "gguf":
        return f"the GGUF file {name}" + (f" (sha256 `{ref['sha256']}`)" if ref.get("sha256") else "")
    if kind == "local":
        if ref["ref"] == "a local model":
            return "a local model"
        return f"a local model folder {name}" + (f" (poft-mlx model identity `{ref['identity']}`)"
                                                if ref.get("identity") else "")
    return name


def _short(ref: dict[str, str] | None) -> str:
    return f"`{ref['ref']}`" if ref and ref["ref"] != "a local model" else "a local model" if ref else "its base model"


def _objective(name):
    """The objective class called `name` (training/objectives/), or None for an unknown name."""
    from ..training.objectives import REGISTRY  # lazy: loads mlx; keeps push light

    return REGISTRY.get(str(name)) if name else None


def _card_body(repo_id: str, kind: str, prov: dict[str, Any], check: dict[str, Any], base_id: str | None,
               ref: dict[str, str] | None) -> str:
    objective = prov.get("objective")
    lines = [f"# {repo_id}", ""]
    what = {"peft": "A PEFT LoRA adapter", "transformers": "A model", "mlx": "An MLX model"}[kind]
    known = _objective(objective)
    how = known.description if known else (f"objective `{objective}`" if objective else "poft-mlx")
    lines += [f"{what} fine-tuned from {_describe(ref)} with {how}, trained with poft-mlx on MLX.", ""]
    if not prov:
        lines += ["No poft-mlx provenance was found in the uploaded folder.", ""]
    else:
        lines += ["## How it was made", "", "| | |", "|---|---|", f"| target model | {_describe(ref)} |"]
        aligned = _aligned_refs(prov)
        if aligned and known and known.needs_aligned:  # the models the loss compares with; others ignore them
            lines.append("| aligned models | " + ", ".join(_describe(a) for a in aligned) + " |")
        if objective:
            params = ", ".join(f"{k}={prov[k]}" for k in ("beta", "gamma") if prov.get(k) is not None)
            lines.append(f"| objective | {objective}{f' ({params})' if params else ''} |")
        ft = prov.get("fine_tune") or {}
        if ft:
            detail = f"rank {ft.get('rank')}, scale {ft.get('scale')}, " if ft.get("type") != "full" else ""
            lines.append(f"| fine-tuning | {ft.get('type')} ({detail}last {ft.get('num_layers')} layers) |")
        if prov.get("train_data") or prov.get("data_fingerprint"):
            lines.append(f"| training data | `{prov.get('train_data')}`, sha256 `{prov.get('data_fingerprint')}` |")
        if prov.get("datasets"):
            lines.append("| Hub data sets | " + ", ".join(f"`{d}`" for d in prov["datasets"]) + " |")
        if prov.get("export"):
            lines.append(f"| export | {prov['export']} |")
        lines += [f"| poft-mlx | {prov.get('poft_mlx_version')} |", ""]
        lines += _metrics_table(prov.get("final_metrics") or {}, objective)
    if check:
        lines += [
            "## Export check",
            "",
            f"The fused weights, read back, vs base + adapter on {check.get('tokens')} tokens: mean "
            f"KL(adapter || fused) {check.get('mean_kl'):.3g} against the adapter's own effect "
            f"KL(adapter || base) {check.get('effect_kl'):.3g}; max |logit diff| {check.get('max_abs_diff'):.3g}; "
            f"top-1 agreement {check.get('top1_agreement'):.4f}.",
            "",
        ]
    lines += _usage(repo_id, kind, base_id, ref)
    lines += [
        "## Licence",
        "",
        f"These weights derive from {_short(ref)} and are governed by that model's licence and terms of use "
        "(kept in this repository when the base shipped them). poft-mlx (Apache-2.0) adds no terms.",
        "",
    ]
    return "\n".join(lines)


# What each objective's card reports, in this order, and what it means. An SFT run logs tau and win
# rate only as NaN (no aligned models) or as a side measurement: they say nothing about its training.
_CARD_METRICS = {
    "sft": ("ce", "ppl"),
    "poft": ("loss", "ce", "ppl", "tau_mean", "win_rate", "margin"),
    "dpo": ("loss", "reward_acc", "margin", "ce_chosen"),
}
_MEANINGS = {
    ("loss", "poft"): "PoFT loss: mean of -log sigmoid(beta (r_target - r_aligned) + gamma), r = token-mean "
                      "log-likelihood of the reply (lower is better)",
    ("loss", "dpo"): "DPO loss: mean of -log sigmoid(beta x margin) (lower is better)",
    ("loss", None): "the training objective (lower is better)",
    ("ce", None): "cross-entropy of the reference replies, nats per token (lower is better)",
    ("ppl", None): "perplexity, exp(ce) (lower is better)",
    ("tau_mean", None): "mean PoFT weight tau = sigmoid(-(beta (r_target - r_aligned) + gamma)): near 1 where the "
                        "aligned models rate a reply far above the target, near 0 where the target is ahead",
    ("win_rate", None): "share of samples where the target's token-mean log-likelihood is above the aligned "
                        "models' (r_target > r_aligned)",
    ("margin", "poft"): "mean r_target - r_aligned, nats per token",
    ("margin", "dpo"): "mean log-ratio margin vs the reference model: (chosen - ref) - (rejected - ref), in nats",
    ("reward_acc", None): "share of pairs where the chosen reply gets the higher implicit reward",
    ("ce_chosen", None): "cross-entropy of the chosen replies, nats per token (lower is better)",
}
_SPLITS = {"train": "train", "val": "validation"}


def _metrics_table(metrics: dict[str, dict[str, float]], objective: str | None = None) -> list[str]:
    """The final metrics that apply to `objective`, finite values only, each with its meaning."""
    keys = _CARD_METRICS.get(str(objective), ("loss", "ce", "ppl"))
    splits = sorted(metrics, key=lambda s: (list(_SPLITS).index(s) if s in _SPLITS else len(_SPLITS), s))
    shown = {s: {k: metrics[s][k] for k in keys if _finite(metrics[s].get(k))} for s in splits}
    splits = [s for s in splits if shown[s]]
    rows = [k for k in keys if any(k in shown[s] for s in splits)]
    if not rows:
        return []
    heads = [f"{_SPLITS.get(s, s)}" + (f", step {metrics[s]['step']}" if _finite(metrics[s].get("step")) else "")
             for s in splits]
    lines = ["## Final metrics", "",
             "The last training report (means over its steps) and the last validation pass of the run.", "",
             "| metric | " + " | ".join(heads) + " | meaning |", "|---" * (len(splits) + 2) + "|"]
    for k in rows:
        meaning = _MEANINGS.get((k, objective)) or _MEANINGS[(k, None)]
        cells = [f"{shown[s][k]:.4g}" if k in shown[s] else "" for s in splits]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {meaning} |")
    return lines + [""]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _usage(repo_id: str, kind: str, base_id: str | None, ref: dict[str, str] | None) -> list[str]:
    base_line = (f'base = AutoModelForCausalLM.from_pretrained("{base_id}")' if base_id else
                 f'base = AutoModelForCausalLM.from_pretrained("path/to/base")  # the base: {_short(ref)}')
    code = {
        "transformers": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "peft": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f'{base_line}\nmodel = PeftModel.from_pretrained(base, "{repo_id}")',
        "mlx": f'from mlx_lm import load\nmodel, tokenizer = load("{repo_id}")',
    }[kind]
    return ["## Use", "", "```python", code, "```", ""]


def model_card(path: str | Path, repo_id: str) -> str:
    """The README.md that `push` would write for the folder at `path`.

    An existing README keeps its own text: only the poft-mlx section (between markers) is
    replaced, and the front matter gains library_name, base_model (+ base_model_relation),
    license and datasets when known and not already stated, and the poft/poft-mlx/mlx/objective
    tags.
    """
    folder = Path(path)
    kind = _folder_kind(folder)
    prov = _provenance(folder)
    peft_base = _read_json(folder / PEFT_CONFIG).get("base_model_name_or_path") if kind == "peft" else None
    loaded_by_peft = _model_ref({"target": peft_base})
    ref = _model_ref(prov) or loaded_by_peft
    # The Hub links base_model to a repository: a Hub id only (a pypi: alias names its upstream one).
    base_id = next((r["hub_id"] for r in (loaded_by_peft, ref) if r and _is_hub_id(r.get("hub_id"))), None)
    existing = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    meta, body = _split_front_matter(existing)
    meta["library_name"] = kind
    meta.setdefault("pipeline_tag", "text-generation")
    if base_id:
        meta["base_model"] = base_id
        # An adapter (PEFT, or a run folder's mlx-lm adapters) applies to the base; a fused model replaces it.
        adapter = kind == "peft" or (RunDir(folder).adapters / ADAPTER_CONFIG).is_file()
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    if isinstance(prov.get("license"), str) and prov["license"]:
        meta.setdefault("license", prov["license"])
    if prov.get("datasets"):
        meta.setdefault("datasets", list(prov["datasets"]))
    objective = [str(prov["objective"])] if prov.get("objective") else []
    extra = ["poft", "poft-mlx", "mlx", *objective] + (["peft", "lora"] if kind == "peft" else [])
    meta["tags"] = list(dict.fromkeys(list(meta.get("tags") or []) + extra))
    section = f"{_BEGIN}\n{_card_body(repo_id, kind, prov, _read_json(folder / CHECK_FILE), base_id, ref)}{_END}"
    if _BEGIN in body and _END in body:
        head, _, rest = body.partition(_BEGIN)
        body = head + section + rest.partition(_END)[2]
    else:
        body = (body.rstrip() + "\n\n" if body.strip() else "") + section + "\n"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def _is_hub_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and not value.endswith(".gguf")


def upload_files(path: str | Path, card: str) -> list[UploadFile]:
    """Exactly what a push sends: every non-hidden file under `path`, README.md as the new card;
    of a run folder pushed as is, not its experiment trackers' local files (RUN/trackers)."""
    folder = Path(path)
    trackers = RunDir(folder).trackers
    files = [
        UploadFile(p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.relative_to(folder).as_posix() != "README.md"
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
        and trackers not in p.parents
    ]
    files.append(UploadFile("README.md", len(card.encode())))
    return sorted(files, key=lambda f: f.path)


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> list[UploadFile]:
    """Upload the folder at `path` to the Hub model repo `repo_id` with a poft-mlx model card.

    Creates the repo if needed (private when asked), writes README.md into the folder, then
    uploads exactly the files returned. With dry_run nothing is written or uploaded and no
    token is needed. Raises HubError for a missing folder, a bad repo id, a folder whose fuse
    check failed, a missing token or a refused upload.
    """
    # lazy: the Hub client loads only for a push
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, HTTPError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(path)
    if not folder.is_dir():
        raise HubError(f"nothing to push: {folder} is not a folder")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"bad repo id {repo_id!r}: expected 'owner/name' ({e})") from None
    check = _read_json(folder / CHECK_FILE)
    if check and check.get("passed") is False:
        raise HubError(f"refusing to push {folder}: its fuse check failed (see {folder / CHECK_FILE})")
    card = model_card(folder, repo_id)
    files = upload_files(folder, card)
    if dry_run:
        return files
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    (folder / "README.md").write_text(card)
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {_folder_kind(folder)} model made with poft-mlx {__version__}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # allow_patterns pins the upload to the listed files, so the dry run tells the truth.
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            commit_message=message,
            allow_patterns=[glob.escape(f.path) for f in files],
        )
    except (HfHubHTTPError, HTTPError, OSError, ValueError) as e:  # HTTPError: the client's transport errors
        raise HubError(push_failure(e, repo_id, api.endpoint, token)) from None
    return files


# What the request that failed was doing, by its URL.
_STEPS = (("/api/repos/create", "creating the repository"), ("/api/validate-yaml", "checking the model card"),
          ("/preupload/", "preparing the upload"), ("/commit/", "committing the files"),
          ("/info/lfs/", "uploading large files"), ("/api/", "talking to the Hub"))
_RETRIED = ("/preupload/", "/commit/", "/info/lfs/")  # where huggingface_hub retries (http_backoff)


def push_failure(e: Exception, repo_id: str, endpoint: str, token: str | None) -> str:
    """One line: what failed, at which step, whether it was retried, what to do; never the token."""
    from huggingface_hub.errors import HfHubHTTPError  # lazy: the Hub client loads only for a push

    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    url = ""
    with contextlib.suppress(Exception):  # httpx errors raise when they carry no request
        url = str(response.request.url if response is not None else e.request.url)
    step = next((what for key, what in _STEPS if key in url), "uploading")
    retried = " (after huggingface_hub's retries)" if any(k in url for k in _RETRIED) else ""
    again = f"run the same push again to complete {repo_id}"
    server = " ".join(str(getattr(e, "server_message", "") or "").split())[:200]
    detail = f": {server}" if server else ""
    if response is not None:
        code = response.status_code
        if code == 401:
            text = (f"the Hub at {endpoint} refused the token (401 Unauthorized) while {step}{detail}; it is "
                    "invalid or expired: set HF_TOKEN or run `hf auth login` again")
        elif code == 403:
            text = (f"the token may not write to {repo_id} (403 Forbidden) while {step}{detail}; use a token "
                    f"with write access to {repo_id.split('/')[0]}, or push to a namespace you own")
        elif code >= 500 or code in (408, 429):
            text = f"the Hub answered {code} {response.reason_phrase} while {step}{retried}{detail}; {again}"
        else:
            text = f"the Hub refused the push ({code} {response.reason_phrase}) while {step}{detail}"
    elif isinstance(e, json.JSONDecodeError):  # a proxy's error page instead of the Hub's JSON
        text = f"the Hub answered with something that is not JSON (a proxy's error page?) while {step}; {again}"
    elif isinstance(e, ValueError):  # e.g. model card metadata the Hub rejects
        text = f"the Hub refused the push while {step}: {' '.join(str(e).split())[:300]}"
    else:
        text = (f"the connection to {endpoint} failed while {step}{retried} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}); {again}")
    text = f"the push to {repo_id} failed: {text}"
    return text.replace(token, "hf_***") if token else text

