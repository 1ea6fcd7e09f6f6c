"""mlx_lm.server serving a poft-mlx model (docs/gguf.md, "Serving with mlx_lm.server").

A run on a tiny llama trained with a template of its own (MARKED: not the base's ChatML) is
served twice over HTTP on a free local port: as the fused folder (`poft-mlx fuse` writes the
run's template into it) and as the base with `--adapter-path RUN/adapters --chat-template`.
One OpenAI-style /v1/chat/completions request each; the reply must have the OpenAI shape, the
prompt the server built must be the run's (its token count equals our Renderer's rendering of
the same messages with the run's template, which differs from the base template's), and the
greedy answer must be what mlx-lm generates locally from that rendering. A third server, the
base with the adapters but no --chat-template, shows the pitfall the docs warn about: it
formats with the base's template.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import poft_mlx  # noqa: F401  (BLAS before mlx)

import pytest

from poft_mlx.data.render import Renderer
from poft_mlx.export.fuse import fuse_run
from test_gguf_export import make_run
from tiny import CHATML, make_model

MARKED = (
    "{% for m in messages %}[poft {{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[poft assistant] {% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is two plus three?"}]
MAX_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mlx_lm.server ARGS` on a free port, until stop()."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlx_lm.server did not answer within 120 s:\n{log.read_text()[-2000:]}")

    def chat(self, messages: list[dict]) -> dict:
        body = json.dumps({"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = make_model(root / "base", template=CHATML)
    run = make_run(root / "run", base, template=MARKED)
    fuse_run(run, root / "fused")
    return base, run, root / "fused", root


def expected(folder: Path, template: str) -> tuple[list[int], str]:
    """The prompt ids our Renderer makes with `template`, and mlx-lm's greedy answer to them."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(folder))
    prompt = Renderer(tokenizer, chat_template=template).apply(MESSAGES, True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return ids, generate(model, tokenizer, ids, max_tokens=MAX_TOKENS)


def check_shape(reply: dict) -> None:
    assert reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS


def served_reply(args: list[str], log: Path) -> dict:
    """One chat request to an mlx_lm.server started with `args`, the reply's shape checked."""
    server = Server(args, log)
    try:
        reply = server.chat(MESSAGES)
    finally:
        server.stop()
    check_shape(reply)
    return reply


def test_fused_folder_is_served_with_the_runs_template(served):
    base, run, fused, root = served
    ids, answer = expected(fused, MARKED)
    base_ids, _ = expected(base, CHATML)
    assert len(ids) != len(base_ids), "the two templates must differ in length for the check to mean anything"
    reply = served_reply(["--model", str(fused)], root / "fused.log")
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == answer


def test_adapters_are_served_with_the_runs_template_when_given(served):
    base, run, fused, root = served
    ids, answer = expected(fused, MARKED)
    reply = served_reply(["--model", str(base), "--adapter-path", str(run / "adapters"), "--chat-template", MARKED],
                         root / "adapters.log")
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == answer  # base + adapter == fused


def test_adapters_without_chat_template_use_the_bases(served):
    base, run, _, root = served
    base_ids, _ = expected(base, CHATML)
    reply = served_reply(["--model", str(base), "--adapter-path", str(run / "adapters")], root / "plain.log")
    assert reply["usage"]["prompt_tokens"] == len(base_ids)
