"""Push a poft-mlx export to the Hugging Face Hub with a card that records how it was made.

The card states the target and aligned models, the objective and its beta/gamma, the training
data fingerprint, the final metrics and the poft-mlx version, so that a model on the Hub can be
traced back to its run. The token comes from `huggingface_hub.get_token()` (HF_TOKEN, then the
`hf auth login` cache) and is handed to the client only: it is never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import __version__

PROVENANCE_FILE = "poft_provenance.json"  # written by export beside every exported folder
CONFIG_COPY = "poft_config.yaml"  # the run's resolved config, copied verbatim
CHECK_FILE = "poft_fuse_check.json"  # the fused-vs-adapter check report
_BEGIN = "<!-- poft-mlx:begin (generated; replaced on every push) -->"
_END = "<!-- poft-mlx:end -->"
_OBJECTIVES = {
    "poft": "Preference-Oriented Supervised Fine-Tuning (PoFT, arXiv 2412.12865)",
    "sft": "supervised fine-tuning (cross-entropy)",
    "dpo": "Direct Preference Optimization (DPO, arXiv 2305.18290)",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(Exception):
    """A push that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class UploadFile:
    """One file of a push: its path inside the repository and its size in bytes."""

    path: str
    size: int


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's resolved poft-mlx config (RUN_DIR/config.yaml), or {} when absent or unreadable."""
    path = Path(run_dir) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def final_metrics(metrics_path: Path) -> dict[str, dict[str, float]]:
    """The last record of each split in metrics.jsonl, numbers only.

    A run killed mid-write leaves a truncated last line: unreadable lines are skipped, since a
    card must not fail on a log.
    """
    last: dict[str, dict[str, float]] = {}
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("split"), str):
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            last[record["split"]] = numbers
    return last


def collect_provenance(run_dir: str | Path) -> dict[str, Any]:
    """What the model card states about a run, as a JSON-ready mapping."""
    run = Path(run_dir)
    config = read_run_config(run)
    aligned = [a.get("model") if isinstance(a, dict) else a for a in config.get("aligned") or []]
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    fp_path = run / "data_fingerprint.txt"
    fingerprint = (fp_path.read_text().split() or [None])[0] if fp_path.is_file() else None
    try:
        adapter = json.loads((run / "adapters" / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        adapter = {}
    objective = config.get("objective")
    # beta/gamma are PoFT's; DPO has its own beta (config dpo.beta); SFT has neither.
    beta, gamma = (config.get("beta"), config.get("gamma")) if objective == "poft" else (None, None)
    if objective == "dpo" and isinstance(config.get("dpo"), dict):
        beta = config["dpo"].get("beta")
    return {
        "poft_mlx_version": __version__,
        "target": config.get("model", adapter.get("model")),
        "aligned": [str(a) for a in aligned if a],
        "objective": objective,
        "beta": beta,
        "gamma": gamma,
        "train_data": Path(str(data["train"])).name if data.get("train") else None,
        "data_fingerprint": fingerprint,
        "final_metrics": final_metrics(run / "metrics.jsonl"),
        "fine_tune": {
            "type": adapter.get("fine_tune_type", "lora"),
            "num_layers": adapter.get("num_layers"),
            **(adapter.get("lora_parameters") or {}),
        }
        if adapter
        else {},
    }


def _folder_kind(folder: Path) -> str:
    """peft, mlx (MLX-quantized or a run folder) or transformers: decides library_name and usage."""
    peft = _read_json(folder / "adapter_config.json")
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
    if (folder / "config.yaml").is_file():  # a run folder pushed as is
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


def _card_body(repo_id: str, kind: str, prov: dict[str, Any], check: dict[str, Any], base: str | None) -> str:
    target = prov.get("target") or base or "an unrecorded base model"
    objective = prov.get("objective")
    lines = [f"# {repo_id}", ""]
    what = {"peft": "A PEFT LoRA adapter", "transformers": "A model", "mlx": "An MLX model"}[kind]
    how = _OBJECTIVES.get(str(objective), f"objective `{objective}`") if objective else "poft-mlx"
    lines += [f"{what} fine-tuned from `{target}` with {how}, trained with poft-mlx on MLX.", ""]
    if not prov:
        lines += ["No poft-mlx provenance was found in the uploaded folder.", ""]
    else:
        lines += ["## How it was made", "", "| | |", "|---|---|", f"| target model | `{target}` |"]
        if prov.get("aligned"):
            lines.append("| aligned models | " + ", ".join(f"`{a}`" for a in prov["aligned"]) + " |")
        if objective:
            params = ", ".join(f"{k}={prov[k]}" for k in ("beta", "gamma") if prov.get(k) is not None)
            lines.append(f"| objective | {objective}{f' ({params})' if params else ''} |")
        ft = prov.get("fine_tune") or {}
        if ft:
            detail = f"rank {ft.get('rank')}, scale {ft.get('scale')}, " if ft.get("type") != "full" else ""
            lines.append(f"| fine-tuning | {ft.get('type')} ({detail}last {ft.get('num_layers')} layers) |")
        if prov.get("train_data") or prov.get("data_fingerprint"):
            lines.append(f"| training data | `{prov.get('train_data')}`, sha256 `{prov.get('data_fingerprint')}` |")
        if prov.get("export"):
            lines.append(f"| export | {prov['export']} |")
        lines += [f"| poft-mlx | {prov.get('poft_mlx_version')} |", ""]
        lines += _metrics_table(prov.get("final_metrics") or {})
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
    lines += _usage(repo_id, kind, base)
    lines += [
        "## Licence",
        "",
        f"These weights derive from `{target}` and are governed by that model's licence and terms of use "
        "(kept in this repository when the base shipped them). poft-mlx (Apache-2.0) adds no terms.",
        "",
    ]
    return "\n".join(lines)


def _metrics_table(metrics: dict[str, dict[str, float]]) -> list[str]:
    if not metrics:
        return []
    cols = sorted({k for m in metrics.values() for k in m if k != "step"})
    lines = ["## Final metrics", "", "| split | step | " + " | ".join(cols) + " |"]
    lines.append("|---" * (len(cols) + 2) + "|")
    for split, m in metrics.items():
        cells = [f"{m[c]:.4g}" if c in m else "" for c in cols]
        lines.append(f"| {split} | {m.get('step', '')} | " + " | ".join(cells) + " |")
    return lines + [""]


def _usage(repo_id: str, kind: str, base: str | None) -> list[str]:
    code = {
        "transformers": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "peft": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        "mlx": f'from mlx_lm import load\nmodel, tokenizer = load("{repo_id}")',
    }[kind]
    return ["## Use", "", "```python", code, "```", ""]


def model_card(path: str | Path, repo_id: str) -> str:
    """The README.md that `push` would write for the folder at `path`.

    An existing README keeps its own text: only the poft-mlx section (between markers) is
    replaced, and the front matter gains library_name, base_model and the poft/mlx tags.
    """
    folder = Path(path)
    kind = _folder_kind(folder)
    prov = _provenance(folder)
    base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path") if kind == "peft" else None
    base = base or prov.get("target")
    existing = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    meta, body = _split_front_matter(existing)
    meta["library_name"] = kind
    meta.setdefault("pipeline_tag", "text-generation")
    # The Hub rejects a base_model that is not a repo id; a local path stays in the text only.
    if base and _REPO_ID.match(str(base)) and not str(base).endswith(".gguf") and not Path(str(base)).exists():
        meta["base_model"] = str(base)
    extra = ["poft", "mlx"] + (["peft", "lora"] if kind == "peft" else [])
    meta["tags"] = list(dict.fromkeys(list(meta.get("tags") or []) + extra))
    section = f"{_BEGIN}\n{_card_body(repo_id, kind, prov, _read_json(folder / CHECK_FILE), base)}{_END}"
    if _BEGIN in body and _END in body:
        head, _, rest = body.partition(_BEGIN)
        body = head + section + rest.partition(_END)[2]
    else:
        body = (body.rstrip() + "\n\n" if body.strip() else "") + section + "\n"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def upload_files(path: str | Path, card: str) -> list[UploadFile]:
    """Exactly what a push sends: every non-hidden file under `path`, README.md as the new card."""
    folder = Path(path)
    files = [
        UploadFile(p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.relative_to(folder).as_posix() != "README.md"
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)
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
    from huggingface_hub.errors import HfHubHTTPError

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

