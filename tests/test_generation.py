"""Generation and the generation evaluation: answers checked, intervals, templates, fused == adapters."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from poft_mlx.cli.main import main
from poft_mlx.evaluation.answers import bootstrap_diff, bootstrap_mean, gsm8k_answer, gsm8k_answer_end, regex_answer
from tiny import write_tiny_config


def invoke(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


# ------------------------------------------------------------------ answers


def test_gsm8k_extractor_on_the_real_test_split():
    """Every real GSM8K reference answer: the extractor returns the number after '####'."""
    from poft_mlx.data.builtin import gsm8k_records

    records = gsm8k_records()
    assert len(records) == 1319
    for r in records:
        ref = r["messages"][-1]["content"]
        tail = ref.rsplit("####", 1)[1].strip().replace(",", "")
        assert gsm8k_answer(ref) == str(int(float(tail))), ref[-80:]
    # a handful of real records, by hand (first of the split: Janet's ducks, 18 dollars)
    assert gsm8k_answer(records[0]["messages"][-1]["content"]) == "18"


def test_data_gsm8k_keeps_the_short_problems_without_calculator_notes(tmp_path):
    """`poft-mlx data gsm8k --strip-calculator --max-answer-chars 200` (the quickstart's data): every
    record written is a real GSM8K problem whose worked answer, notes removed, is at most 200
    characters; the count matches the raw package file read here with its own regex; asking for more
    problems than that names the cap."""
    from poft_mlx.data.builtin import gsm8k_path

    raw = [json.loads(x) for x in open(gsm8k_path(), encoding="utf-8")]
    short = {r["question"]: re.sub(r"<<[^>]*>>", "", r["answer"]) for r in raw
             if len(re.sub(r"<<[^>]*>>", "", r["answer"])) <= 200}
    assert 400 < len(short) < 700  # 531: about 40 % of the 1,319
    invoke("data", "gsm8k", tmp_path / "d", "--train", 20, "--valid", 5, "--test", 5, "--strip-calculator",
           "--max-answer-chars", 200)
    for split in ("train", "valid", "test"):
        for line in (tmp_path / "d" / f"{split}.jsonl").read_text().splitlines():
            user, reply = (m["content"] for m in json.loads(line)["messages"])
            assert short[user] == reply and len(reply) <= 200 and "<<" not in reply
    r = invoke("data", "gsm8k", tmp_path / "e", "--train", len(short), "--valid", 1, "--test", 0,
               "--strip-calculator", "--max-answer-chars", 200, ok=False)
    assert r.exit_code != 0 and f"the package has {len(short)} with answers of at most 200 characters" in r.output


@pytest.mark.parametrize("reply, answer", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The total is $1,200.", "1200"),
    ("So the answer is 5.50 dollars.", "5.5"),
    ("It costs $18.00", "18"),
    ("First 3 eggs, then 4, so 7 in all. The answer is 7.", "7"),
    ("I don't know.", None),
    ("#### -3", "-3"),
])
def test_gsm8k_extractor_on_replies(reply, answer):
    assert gsm8k_answer(reply) == answer


def test_gsm8k_answer_end_on_the_real_test_split():
    """A reply that is a real reference followed by what a small model loops on ends right after
    the reference's '#### N' line, and grades as the reference; no reply ends before its number
    is complete (no newline yet) or mid-way through the reasoning."""
    from poft_mlx.data.builtin import gsm8k_records

    for r in gsm8k_records():
        ref = r["messages"][-1]["content"].rstrip()
        assert gsm8k_answer_end(ref) is None  # the number may still go on
        looped = ref + "\n#### 7\nQuestion: and then?\n"
        end = gsm8k_answer_end(looped)
        assert looped[:end] == ref, ref[-60:]
        assert gsm8k_answer(looped[:end]) == gsm8k_answer(ref)
        body = ref.rsplit("####", 1)[0]
        assert gsm8k_answer_end(body) is None
    assert gsm8k_answer_end("so 36 - 5 = 31.\n####   $1,000.50 \nmore") == len("so 36 - 5 = 31.\n####   $1,000.50")
    assert gsm8k_answer_end("#### \n#### 12\n") == len("#### \n#### 12")  # the first line has no number
    # what the quickstart's trained models wrote: the answer, then a loop on the same line
    assert gsm8k_answer_end("The model is 12. #### 30 balloons per pack #### 30") == len("The model is 12. #### 30")
    assert gsm8k_answer_end("#### 1,000, so") == len("#### 1,000")
    assert gsm8k_answer_end("#### 5.") is None and gsm8k_answer_end("#### 5. Done") == len("#### 5")
    assert gsm8k_answer_end("#### 1,0") is None and gsm8k_answer_end("#### 12<end") == len("#### 12")


def test_regex_extractor_takes_the_last_match_and_its_group():
    ex = regex_answer(r"answer: (\w+)")
    assert ex("answer: no ... answer: yes") == "yes"
    assert ex("nothing here") is None
    with pytest.raises(ValueError, match="not a valid regular expression"):
        regex_answer("(")


# ------------------------------------------------------------------ intervals


def test_bootstrap_interval_on_hand_computed_cases():
    # Two pairs with differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probability
    # 1/4, 1/2, 1/4, so the 2.5th percentile is 0 and the 97.5th is 1 (each end has 25 % mass).
    r = bootstrap_diff([0.0, 0.0], [0.0, 1.0], n_resamples=4000)
    assert r == {"diff": 0.5, "lo": 0.0, "hi": 1.0, "n": 2}
    # A constant difference has a zero-width interval.
    r = bootstrap_diff(np.zeros(50), np.full(50, 0.25))
    assert r["diff"] == r["lo"] == r["hi"] == 0.25
    # NaN pairs are left out.
    assert bootstrap_diff([1.0, np.nan, 0.0], [2.0, 5.0, 0.0])["n"] == 2


def test_bootstrap_interval_matches_the_normal_approximation():
    """For n = 400 the percentile interval is close to mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, 400)
    r = bootstrap_mean(d, n_resamples=20000)
    half = 1.96 * d.std() / np.sqrt(len(d))
    assert abs(r["mean"] - d.mean()) < 1e-12
    assert abs((r["hi"] - r["lo"]) / 2 - half) < 0.05 * half
    assert abs((r["hi"] + r["lo"]) / 2 - d.mean()) < 0.1 * half


# ------------------------------------------------------------------ tiny runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models):
    """A short SFT run on the tiny gemma-style target (its config names the gemma template)."""
    root = tmp_path_factory.mktemp("gen")
    write_tiny_config(root, tiny_models, adapter={"rank": 4, "alpha": 32, "num_layers": -1},
                      train={"iters": 6, "batch_size": 4, "learning_rate": 5e-3, "steps_per_eval": 100},
                      objective="sft", run_dir=str(root / "run"))
    invoke("train", "-c", root / "cfg.yaml")
    return root


def test_a_run_generates_with_the_template_it_trained_with(tiny_run, tiny_models):
    from poft_mlx.models.generation import open_generator
    from poft_mlx.data.render import resolve_template

    gen = open_generator(str(tiny_run / "run"))
    gemma = resolve_template("gemma")
    assert gen.renderer.template == gemma
    # the tiny target's tokenizer has no template of its own: only the run's config supplies one
    assert "chat_template" not in json.loads((tiny_models["target"] / "tokenizer_config.json").read_text())
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    text = gen.tokenizer._tokenizer.decode(gen.prompt_tokens(msgs))
    assert text.endswith("<start_of_turn>user\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"), text
    # the template's end-of-turn token stops a reply, besides eos
    assert gen.tokenizer._tokenizer.convert_tokens_to_ids("<end_of_turn>") in gen.stop_ids


def test_fused_folder_and_base_plus_adapters_generate_the_same_greedy_tokens(tiny_run, tiny_models, tmp_path):
    from poft_mlx.models.generation import generate, open_generator
    from poft_mlx.data.render import resolve_template

    out = tmp_path / "fused"
    invoke("fuse", tiny_run / "run", out)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == resolve_template("gemma")
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in ((2, 3), (4, 1), (6, 6))]
    run = generate(open_generator(str(tiny_run / "run")), convs, max_tokens=12, batch_size=2)
    fused = generate(open_generator(str(out)), convs, max_tokens=12, batch_size=2)
    base = generate(open_generator(str(tiny_models["target"]), chat_template="gemma"), convs, max_tokens=12)
    assert [r.tokens for r in run] == [r.tokens for r in fused]
    assert sum(len(r.tokens) for r in run) > 0
    assert [r.tokens for r in run] != [r.tokens for r in base], "the adapter must change what is generated"


def test_batched_generation_equals_one_prompt_at_a_time(tiny_run):
    from poft_mlx.models.generation import generate, open_generator

    gen = open_generator(str(tiny_run / "run"))
    convs = [[{"role": "user", "content": p}] for p in ("Hello!", "What is 7 plus 2? Tell me now.", "Say hello 3.")]
    batched = generate(gen, convs, max_tokens=10, batch_size=3)
    single = [generate(gen, [c], max_tokens=10, batch_size=1)[0] for c in convs]
    assert [r.tokens for r in batched] == [r.tokens for r in single]


def test_generate_command_streams_one_prompt_and_batches_several(tiny_run):
    batch = invoke("generate", tiny_run / "run", "-p", "Hello!", "-p", "What is 1 plus 1?", "--max-tokens", "8")
    assert batch.output.count("### ") == 2
    first = batch.output.split("### Hello!\n", 1)[1].split("\n\n### ", 1)[0]
    assert first.strip(), "this prompt gets a non-empty reply from the tiny run"
    streamed = invoke("generate", tiny_run / "run", "-p", "Hello!", "--max-tokens", "8")
    assert streamed.output == first + "\n"


def test_one_prompt_with_an_answer_end_prints_the_cut_reply_not_its_tokens(tiny_run, monkeypatch):
    """`generate --answer gsm8k` with one prompt prints the reply as cut where its answer ends, not
    the tokens that showed the answer complete (a streamed "#### 16" printed "#### 16x")."""
    import poft_mlx.evaluation.answers as answers

    free = invoke("generate", tiny_run / "run", "-p", "Hello!", "--max-tokens", "8").output[:-1]
    k = len(free) // 2
    assert k >= 2, free

    def answer_end(text):  # "complete" once the first k characters are there; cut one character short
        return k - 1 if text.startswith(free[:k]) else None

    monkeypatch.setattr(answers, "gsm8k_answer_end", answer_end)
    cut = invoke("generate", tiny_run / "run", "-p", "Hello!", "--max-tokens", "8", "--answer", "gsm8k").output
    assert cut == free[:k - 1] + "\n"


def test_eval_generate_writes_tables_json_and_html(tiny_run, tmp_path):
    data = tmp_path / "test.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}. answer: {a + b}"}]}
            for a, b in ((1, 2), (3, 4), (2, 2), (5, 1))]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "ev"
    r = invoke("eval", "--data", data, "--generate", "--out", out, "--max-tokens", "12",
               "--answer", r"re:answer: (\d+)", tiny_run / "run")
    assert "accuracy" in r.output and "aligned log-lik" in r.output and "paired" in r.output
    res = json.loads((out / "eval.json").read_text())
    names = ["base", str(tiny_run / "run")]
    assert list(res["models"]) == names
    for name in names:
        row = res["models"][name]
        assert {"correct", "aligned_lp", "reply_tokens", "ce", "ppl", "win_rate"} <= set(row)
        assert 0 <= row["correct"]["mean"] <= 1 and row["aligned_lp"]["mean"] < 0
    assert list(res["differences"]) == [f"{names[1]} - base"]
    assert len(res["samples"]) == 4 and res["samples"][0]["reference_answer"] == "3"
    s = res["samples"][0][names[1]]
    assert {"reply", "reply_tokens", "stopped", "answer", "correct", "aligned_lp"} <= set(s)
    page = (out / "eval.html").read_text()
    assert page.count("<section>") == 4 and "What is 1 plus 2?" in page and "<table>" in page
    md = (out / "eval.md").read_text()
    assert re.search(r"\| base \| [-\d.]+", md)
    # The replies of all models are scored in one pass; each model's share is its own replies' scores.
    from poft_mlx.cli.common import run_config
    from poft_mlx.config import load_config
    from poft_mlx.data.records import Sample
    from poft_mlx.evaluation.answers import aligned_scores, prompts_of

    cfg = load_config([], [], base=run_config(tiny_run / "run"))
    prompts = prompts_of([Sample(rec["messages"], f"r{i}") for i, rec in enumerate(recs)])
    for name in names:
        alone = aligned_scores(cfg, prompts, [x[name]["reply"] for x in res["samples"]], log=lambda m: None)
        np.testing.assert_allclose([x[name]["aligned_lp"] for x in res["samples"]], alone, rtol=1e-5)


def test_stop_strings_end_a_reply_where_the_text_first_contains_one(tiny_models):
    """generate_tokens(stop_strings=...): the reply stops at the token that completes a string and its
    text is cut before it; other prompts in the batch are unaffected."""
    from poft_mlx.models.generation import generate_tokens, open_generator

    gen = open_generator(str(tiny_models["target"]), chat_template="gemma")
    prompts = [gen.prompt_tokens([{"role": "user", "content": p}]) for p in ("Hello!", "What is 7 plus 2?")]
    free = generate_tokens(gen.model, gen.tokenizer, prompts, gen.stop_ids, max_tokens=12)
    assert len(free[0].tokens) == 12 and len(free[0].text) > 4
    # a string from the middle of the first reply's text (after its 4th token), absent from its start
    k = len(gen.tokenizer.decode(free[0].tokens[:4]))
    stop = free[0].text[k:k + 2]
    cut = free[0].text.index(stop)
    got = generate_tokens(gen.model, gen.tokenizer, prompts, gen.stop_ids, max_tokens=12,
                          stop_strings=[[stop, "never there"], []])
    assert got[0].text == free[0].text[:cut] and got[0].finish == "stop"
    n = next(i for i in range(1, 13) if stop in gen.tokenizer.decode(free[0].tokens[:i]))
    assert got[0].tokens == free[0].tokens[:n] and n < 12
    assert got[1].tokens == free[1].tokens and got[1].text == free[1].text


def test_answer_end_ends_each_reply_where_its_answer_is_complete(tiny_models):
    """generate(answer_end=...): every reply stops at the first token after which answer_end finds
    the answer complete, its text cut at the index it gives; a reply where it never does runs on."""
    from poft_mlx.models.generation import generate, open_generator

    gen = open_generator(str(tiny_models["target"]), chat_template="gemma")
    convs = [[{"role": "user", "content": p}] for p in ("Hello!", "What is 7 plus 2?")]
    free = generate(gen, convs, max_tokens=12)
    k = len(gen.tokenizer.decode(free[0].tokens[:5]))
    mark = free[0].text[:k]
    assert k >= 2 and len(free[0].tokens) == 12

    def answer_end(text):  # "complete" once the first reply's first 5 tokens are there; cut one char short
        return k - 1 if text.startswith(mark) else None

    got = generate(gen, convs, max_tokens=12, answer_end=answer_end)
    n = next(i for i in range(1, 13) if gen.tokenizer.decode(free[0].tokens[:i]).startswith(mark))
    assert n <= 5 and got[0].tokens == free[0].tokens[:n] and got[0].finish == "stop"
    assert got[0].text == mark[:k - 1]
    if not free[1].text.startswith(mark):
        assert got[1].tokens == free[1].tokens and got[1].text == free[1].text


def test_quickstart_runs_end_to_end_and_reports_generation(tmp_path, tiny_models):
    """The quickstart's steps on the tiny models (the real ones take minutes): noisy data, PoFT
    and SFT, then the generation evaluation with GSM8K answers checked and one example."""
    from poft_mlx.evaluation.answers import markdown
    from poft_mlx.recipes.quickstart import example_answers, run_quickstart

    sets = [f"model={tiny_models['target']}", f"aligned=[{{model: {tiny_models['aligned_a']}}}]",
            "data.max_seq_length=512", "train.epochs=1", "score.batch_size=4"]
    res = run_quickstart(tmp_path / "qs", sets, sizes={"train": 8, "valid": 4, "test": 3},
                         generate={"max_tokens": 6, "batch_size": 3})
    train = [json.loads(x) for x in (res["out"] / "data" / "train.jsonl").read_text().splitlines()]
    assert sum("noise" in r for r in train) == 2  # round(0.3 * 8)
    ev = res["eval"]
    assert list(ev["models"]) == ["base", "poft", "sft"] and ev["settings"]["answer"] == "gsm8k"
    assert all("correct" in ev["models"][m] and "aligned_lp" in ev["models"][m] for m in ev["models"])
    assert (res["eval_dir"] / "eval.html").is_file()
    assert res["plot"] == res["out"] / "curves.png" and res["plot"].read_bytes()[:4] == b"\x89PNG"
    md, ex = markdown(ev), example_answers(ev)
    assert "| poft |" in md and "sft - poft" in md
    assert ex.startswith("Q: ") and all(f"\n{m}" in ex for m in ("base", "poft", "sft"))


def test_quickstart_command_prints_a_hint_that_runs(tmp_path, tiny_models, monkeypatch):
    """`poft-mlx quickstart` (tiny models, tiny sizes) ends with a `poft-mlx generate` command; run as
    printed, it loads the PoFT run with the template it trained with and prints a reply."""
    import shlex

    import poft_mlx.recipes.quickstart as qs

    monkeypatch.setattr(qs, "SIZES", {"train": 8, "valid": 4, "test": 3})
    monkeypatch.setattr(qs, "GENERATE", {"max_tokens": 6, "batch_size": 3})
    out = invoke("quickstart", "--out", tmp_path / "qs", "--set", f"model={tiny_models['target']}",
                 "--set", f"aligned=[{{model: {tiny_models['aligned_a']}}}]", "--set", "data.max_seq_length=512",
                 "--set", "train.epochs=1", "--set", "score.batch_size=4").output
    hint = next(line for line in out.splitlines() if line.startswith("try it:"))
    argv = shlex.split(hint.removeprefix("try it:"))
    assert argv[:2] == ["poft-mlx", "generate"] and argv[2] == str(tmp_path / "qs" / "poft")
    assert "--answer" in argv and argv[argv.index("-p") + 1] == qs.HINT["question"]
    # the quickstart asked the same question itself and printed the reply with its verdict
    said = out.splitlines()[out.splitlines().index(hint) + 1]
    assert said.startswith("  in this run it answered: ")
    assert argv[argv.index("--max-tokens") + 1] == "6"  # the quickstart's own reply length (GENERATE)
    reply = invoke(*argv[1:]).output.strip()  # the command exactly as printed
    assert reply and " ".join(reply.split()) in said
    given = gsm8k_answer(reply) or "no number"
    assert said.endswith(f"[{given}: right]" if given == "16" else f"[{given}: wrong: the answer is 16]")


def test_api_generate_can_end_replies_at_the_gsm8k_answer(tiny_run, monkeypatch):
    """pm.generate(answer="gsm8k") ends replies as `poft-mlx generate --answer gsm8k` does (the
    notebook's hint); another value is refused by name."""
    import poft_mlx as pm
    import poft_mlx.api as api
    from poft_mlx.errors import ConfigError

    seen = []
    real = api.generate_replies
    monkeypatch.setattr(api, "generate_replies", lambda gen, convs, **kw: seen.append(kw) or real(gen, convs, **kw))
    plain = pm.generate(tiny_run / "run", ["What is 1 plus 1?"], max_tokens=5)
    stopped = pm.generate(tiny_run / "run", ["What is 1 plus 1?"], max_tokens=5, answer="gsm8k")
    assert seen[0]["answer_end"] is None and seen[1]["answer_end"] is gsm8k_answer_end
    assert stopped == plain  # the tiny model never writes '####': nothing to cut
    with pytest.raises(ConfigError, match="'gsm9k'"):
        pm.generate(tiny_run / "run", ["Hi"], answer="gsm9k")


def test_chat_keeps_the_history_and_resets(tiny_run, monkeypatch):
    """Two turns, /reset, one more turn: the second prompt holds the first exchange, the third does not."""
    import poft_mlx.models.generation as generation

    seen = []
    real = generation.generate

    def spy(gen, conversations, **kw):
        seen.append([dict(m) for m in conversations[0]])
        return real(gen, conversations, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    r = CliRunner().invoke(main, ["chat", str(tiny_run / "run"), "--max-tokens", "4"],
                           input="Hello!\nWhat is 1 plus 1?\n/reset\nSay hello 3.\n/exit\n", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("model> ") == 3 and "(history cleared)" in r.output
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"] and seen[1][0]["content"] == "Hello!"
    assert seen[2] == [{"role": "user", "content": "Say hello 3."}]
