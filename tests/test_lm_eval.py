"""lm-evaluation-harness on poft-mlx models (`eval --lm-eval`), offline, on tasks defined from local files.

The harness's numbers are checked against the tiny models' own forward passes (mlx_lm.load,
log_softmax of model(x), greedy decoding without a KV cache), not against poft-mlx's scoring.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip("lm_eval")

import mlx.core as mx  # noqa: E402

from poft_mlx.cli.main import main  # noqa: E402
from tiny import write_jsonl, write_tiny_config  # noqa: E402

QUESTIONS = [
    ("What is two plus three?", ["five", "six", "dog", "Hello"]),
    ("The quick brown fox jumps over the lazy", ["dog", "cat", "fox"]),
    ("Natalia sold clips to 48 of her", ["friends", "dogs", "clips"]),
    ("Hello! How can I help you", ["today?", "tomorrow", "now"]),
    ("Weng earns $12 an hour for", ["babysitting.", "jumping", "help"]),
    ("I am a helpful", ["assistant.", "fox", "system", "model"]),
    ("user assistant system", ["model", "user", "brown"]),
    ("Two plus three is", ["five.", "three", "lazy"]),
]
PROMPTS = ["What is two plus", "The quick brown", "Hello! How can", "Natalia sold", "Weng earns $12", "I am a"]
MAX_GEN = 6


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No hub: datasets and huggingface_hub offline, their caches in tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


# ------------------------------------------------------------------ the models' own forward passes


def hand_model(target: Path, adapters: Path | None = None):
    from mlx_lm import load

    model, tok = load(str(target), adapter_path=str(adapters) if adapters else None)
    model.eval()
    return model, tok._tokenizer


def hand_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is greedy: log_softmax(model(x)) at its tokens."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    assert whole[:len(ctx)] == ctx, "the tiny tokenizer splits these strings at the context's end"
    n = len(whole) - len(ctx)
    logits = model(mx.array([whole[:-1]]))[0].astype(mx.float32)
    lsm = np.asarray(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    rows = np.arange(len(whole) - 1 - n, len(whole) - 1)
    targets = np.array(whole[len(ctx):])
    return float(lsm[rows, targets].sum()), bool((lsm[rows].argmax(-1) == targets).all())


def greedy_text(model, tok, context: str, n: int) -> tuple[str, str] | None:
    """(context, its n greedy tokens as text) when that text tokenizes back to them after the context."""
    ids = tok.encode(context)
    k = len(ids)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    text = tok.decode(ids[k:])
    return (context, text) if "\ufffd" not in text and tok.encode(context + text) == ids else None


def hand_greedy(model, tok, prompt: str, until: list[str], max_new: int) -> str:
    """Greedy decoding one full forward pass per token (no cache), cut at the first `until` string."""
    ids, out = tok.encode(prompt), []
    for _ in range(max_new):
        t = int(mx.argmax(model(mx.array([ids + out]))[0, -1]))
        if t == tok.eos_token_id:
            break
        out.append(t)
        text = tok.decode(out)
        if any(u in text for u in until):
            break
    text = tok.decode(out)
    for u in until:
        text = text.split(u)[0]
    return text


# ------------------------------------------------------------------ local task files


def write_mc_task(folder: Path, docs: list[dict], name: str = "tiny_mc") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "q", "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }))


def write_gen_task(folder: Path, docs: list[dict], until: list[str], name: str = "tiny_gen") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{name}.jsonl", docs)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "q", "doc_to_target": "target",
        "generation_kwargs": {"until": until, "max_gen_toks": MAX_GEN, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))


def mc_docs(lps: list[list[float]], n_right: int) -> list[dict]:
    """Labels chosen from the hand scores: the model's best choice for the first n_right questions,
    its worst for the rest, so the expected accuracy is n_right / n (neither 0 nor 1)."""
    return [{"q": q, "choices": c, "label": int(np.argmax(lp) if i < n_right else np.argmin(lp))}
            for i, ((q, c), lp) in enumerate(zip(QUESTIONS, lps))]


def hand_acc_norm(lps, docs) -> float:
    return float(np.mean([np.argmax(np.array(lp) / [len(c) for c in d["choices"]]) == d["label"]
                          for lp, d in zip(lps, docs)]))


@pytest.fixture
def tiny_base(tmp_path, tiny_models):
    from poft_mlx.config import load_config

    cfg = load_config([str(write_tiny_config(tmp_path, tiny_models))])
    return cfg


# ------------------------------------------------------------------ tests


def test_multiple_choice_accuracy_equals_the_hand_computed_forward_pass(tmp_path, tiny_models, tiny_base):
    from poft_mlx.evaluation.lm_eval import run_lm_eval

    model, tok = hand_model(tiny_models["target"])
    lps = [[hand_logprob(model, tok, q, " " + c)[0] for c in choices] for q, choices in QUESTIONS]
    assert all(len(set(np.round(lp, 4))) == len(lp) for lp in lps), "no ties between choices"
    docs = mc_docs(lps, n_right=5)
    write_mc_task(tmp_path / "tasks", docs)
    raw = {}
    out = run_lm_eval({"base": (tiny_base, None)}, ["tiny_mc"], include_path=str(tmp_path / "tasks"), raw=raw)
    m = out["base"]["tiny_mc"]
    print(f"harness acc {m['acc']} (hand 5/8 = {5 / 8}), acc_norm {m['acc_norm']} "
          f"(hand {hand_acc_norm(lps, docs)})")
    assert m["acc"] == 5 / 8
    assert m["acc_norm"] == hand_acc_norm(lps, docs)
    assert m["samples"] == len(QUESTIONS)
    assert m["acc_stderr"] == pytest.approx(np.std([1] * 5 + [0] * 3, ddof=1) / np.sqrt(8))


def test_loglikelihood_rolling_and_greedy_match_the_forward_pass(tiny_models, tiny_base):
    from poft_mlx.models.generation import open_generator
    from poft_mlx.evaluation.lm_eval import PoftLM

    from lm_eval.api.instance import Instance

    model, tok = hand_model(tiny_models["target"])
    lm = PoftLM(open_generator(tiny_base.model, cfg=tiny_base), batch_size=3)
    # a continuation made of the model's own greedy tokens (is_greedy) and others (not): the first
    # context whose greedy tokens decode to text that tokenizes back to the same tokens
    contexts = PROMPTS + [q for q, _ in QUESTIONS]
    ctx, greedy_cont = next(f for f in (greedy_text(model, tok, c, n) for c in contexts for n in (3, 2, 1)) if f)
    pairs = [(ctx, greedy_cont), (ctx, " five"), ("The quick brown fox", " jumps over the lazy dog."),
             ("Hello!", " How"), ("Two", " plus three is five.")]

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs])
    for (c, x), (lp, greedy) in zip(pairs, got):
        hand_lp, hand_greedy_flag = hand_logprob(model, tok, c, x)
        assert lp == pytest.approx(hand_lp, rel=1e-5, abs=1e-4), (c, x)
        assert greedy == hand_greedy_flag, (c, x)
    assert got[0][1] is True and got[1][1] is False

    # rolling: every token of the text after the prefix (BOS) token
    text = "The quick brown fox jumps over the lazy dog."
    (rolled,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    toks = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    logits = model(mx.array([toks[:-1]]))[0].astype(mx.float32)
    lsm = np.asarray(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    hand = float(lsm[np.arange(len(toks) - 1), toks[1:]].sum())
    assert rolled == pytest.approx(hand, rel=1e-5, abs=1e-4)
    # windows shorter than the text: each token is still predicted once (a different, finite sum)
    lm.max_length = 4
    (windowed,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    assert np.isfinite(windowed) and windowed != pytest.approx(rolled)


@pytest.fixture
def tiny_run(tmp_path, tiny_models):
    """A short SFT run on the tiny target (as in test_generation)."""
    write_tiny_config(tmp_path, tiny_models, adapter={"rank": 4, "alpha": 32, "num_layers": -1},
                      train={"iters": 6, "batch_size": 4, "learning_rate": 5e-3, "steps_per_eval": 100},
                      objective="sft", run_dir=str(tmp_path / "run"))
    invoke("train", "-c", tmp_path / "cfg.yaml")
    return tmp_path / "run"


def test_eval_command_runs_harness_tasks_on_base_and_adapters(tmp_path, tiny_models, tiny_run):
    """`eval --lm-eval` on the base and a run: exact_match of generate_until and multiple-choice
    accuracy equal the counts from each model's own greedy decoding / forward pass."""
    base = hand_model(tiny_models["target"])
    run = hand_model(tiny_models["target"], tiny_run / "adapters")
    # `until`: the tail of a word in one of the base's free-running replies (these random models
    # never write a '.'), so the harness must stop and cut that reply there
    free = [hand_greedy(*base, p, [], MAX_GEN) for p in PROMPTS]
    i, word = next((i, w) for i, f in enumerate(free) for w in re.findall(r"[A-Za-z]{3,}", re.sub(r"<[^>]*>", " ", f)))
    until = [word[1:], "never there"]
    base_text = [hand_greedy(*base, p, until, MAX_GEN) for p in PROMPTS]
    run_text = [hand_greedy(*run, p, until, MAX_GEN) for p in PROMPTS]
    assert base_text[i] != free[i] and free[i].startswith(base_text[i] + word[1:]), "a reply is cut at `until`"
    assert base_text != run_text, "the adapters change what is generated"
    # targets: the base's reply for the first three prompts, the run's for the next two, neither for the last
    targets = base_text[:3] + run_text[3:5] + ["no such reply"]
    write_gen_task(tmp_path / "tasks", [{"q": p, "target": t} for p, t in zip(PROMPTS, targets)], until)
    lps = [[hand_logprob(*base, q, " " + c)[0] for c in choices] for q, choices in QUESTIONS]
    docs = mc_docs(lps, n_right=3)
    write_mc_task(tmp_path / "tasks", docs)
    run_lps = [[hand_logprob(*run, q, " " + c)[0] for c in choices] for q, choices in QUESTIONS]

    out = invoke("eval", "--lm-eval", "tiny_gen,tiny_mc", "--lm-eval-include", tmp_path / "tasks",
                 "--json-out", tmp_path / "eval.json", tiny_run)
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert list(rows) == ["base", str(tiny_run)]
    want = {"base": base_text, str(tiny_run): run_text}
    want_mc = {"base": lps, str(tiny_run): run_lps}
    for name, row in rows.items():
        em = row["lm_eval"]["tiny_gen"]["exact_match"]
        hand_em = float(np.mean([a == b for a, b in zip(want[name], targets)]))
        acc = row["lm_eval"]["tiny_mc"]["acc"]
        hand_acc = float(np.mean([np.argmax(lp) == d["label"] for lp, d in zip(want_mc[name], docs)]))
        print(f"{name}: exact_match harness {em} hand {hand_em}; acc harness {acc} hand {hand_acc}")
        assert em == hand_em
        assert acc == hand_acc
    assert rows["base"]["lm_eval"]["tiny_gen"]["exact_match"] >= 3 / 6
    # the table on stdout (progress bars and logs on stderr): one column per model
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("task "))
    assert header.split() == ["task", "metric", "base", str(tiny_run)]
    em = {n: r["lm_eval"]["tiny_gen"]["exact_match"] for n, r in rows.items()}
    assert any(line.split()[:3] == ["tiny_gen", "exact_match", f"{em['base']:.4f}"] for line in lines)


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path, tiny_models):
    import builtins

    import poft_mlx.evaluation.lm_eval as h

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    h.lm_class.cache_clear()
    cfg = write_tiny_config(tmp_path, tiny_models)
    r = CliRunner().invoke(main, ["eval", "-c", str(cfg), "--lm-eval", "x"])
    h.lm_class.cache_clear()
    assert r.exit_code != 0
    assert "pip install 'poft-mlx[lm-eval]'" in r.output
