"""The supervised span: assistant content + its end-of-turn token, on each template."""

import pytest
from mlx_lm.utils import load_tokenizer

from poft_mlx.data.records import Sample
from poft_mlx.data.render import Renderer, TemplateError, fit_length
from tiny import CHATML, QWEN, make_tokenizer

CONV = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5."},
]
CASES = {  # template, builtin override, end-of-turn token
    "chatml": (CHATML, None, "<|im_end|>"),
    "qwen": (QWEN, None, "<|im_end|>"),
    "gemma": (None, "gemma", "<end_of_turn>"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    template, override, eot = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    make_tokenizer(folder, 300, template, "gemma" if request.param == "gemma" else "chatml")
    return load_tokenizer(folder), override, eot


def _supervised_text(tok, enc):
    t = getattr(tok, "_tokenizer", tok)
    return t.decode(enc.tokens[enc.mask].tolist())


def test_span_is_every_assistant_turn_with_its_end_token(case):
    tok, override, eot = case
    enc = Renderer(tok, chat_template=override).encode(Sample(CONV))
    assert _supervised_text(tok, enc) == f"Hello there!{eot}It is 5.{eot}"
    assert not enc.mask[0]


def test_span_last_only(case):
    tok, override, eot = case
    enc = Renderer(tok, chat_template=override, span="last").encode(Sample(CONV))
    assert _supervised_text(tok, enc) == f"It is 5.{eot}"


def test_prompt_tokens_are_never_supervised(case):
    tok, override, _ = case
    r = Renderer(tok, chat_template=override)
    enc = r.encode(Sample(CONV))
    full = r.apply(CONV, False)
    offsets = r.tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for t, (a, b) in enumerate(offsets):
        if enc.mask[t]:
            assert "Hi" != full[a:b] and "Be nice" not in full[a:b] and "What" not in full[a:b]


def test_truncation_cuts_the_reply_tail_and_drops_the_end_token(case):
    tok, override, eot = case
    r = Renderer(tok, chat_template=override)
    enc = r.encode(Sample(CONV))
    new, enc2, status = fit_length(Sample(CONV), r, len(enc.tokens) - 3, "truncate")
    assert status == "truncated" and len(enc2.tokens) <= len(enc.tokens) - 3
    assert new.meta["truncated"] and new.uid != Sample(CONV).uid
    text = _supervised_text(tok, enc2)
    assert text.startswith(f"Hello there!{eot}") and not text.endswith(eot)
    assert fit_length(Sample(CONV), r, len(enc.tokens) - 3, "drop")[2] == "dropped"
    assert fit_length(Sample(CONV), r, 4, "truncate")[2] == "dropped"  # the prompt alone is too long


def test_missing_template_is_a_clear_error(tmp_path):
    make_tokenizer(tmp_path, 300, None)
    with pytest.raises(TemplateError, match="no chat template"):
        Renderer(load_tokenizer(tmp_path), label="target t")
    with pytest.raises(TemplateError, match="not a builtin"):
        Renderer(load_tokenizer(tmp_path), chat_template="nonexistent-name")
