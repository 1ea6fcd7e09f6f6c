"""`poft-mlx quickstart`: PoFT vs SFT on noisy GSM8K, offline, in minutes on a CPU.

The setting PoFT was made for: a base target (gemma-3-270m, no chat tuning) below an
aligned model that is stronger on the data (Qwen2.5-Coder-0.5B-Instruct), and training
data with a share of noisy pairs (30 %: mismatched replies and character edits, as in the
paper's noise ablation). It makes the data, scores it with the aligned model, trains the
same target with PoFT and with SFT, then evaluates base, PoFT and SFT on clean held-out
questions by likelihood and by generation (GSM8K accuracy, the aligned model's likelihood
of each reply, paired bootstrap intervals) and writes the side-by-side answers as HTML.
Whatever the numbers say is what it prints.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from ..config import Config, load_config
from ..data.builtin import split_gsm8k
from ..evaluation.answers import run_generation_eval
from ..evaluation.plot import plot_if_possible
from ..rundir import RunDir
from ..scoring.run import run_score
from ..training.run import run_train

QUICKSTART_CONFIG = Path(__file__).parent / "quickstart.yaml"
SIZES = {"train": 32, "valid": 8, "test": 12}
NOISE = 0.3
# GSM8K's shorter problems, calculator notes stripped: worked answers of at most 200 characters
# (531 of the 1,319; median 58 target tokens against 117 for all) train and generate in half the
# time, so the run fits in minutes on a CPU; they are also the ones a few LoRA steps have a chance at.
GSM8K = {"strip_calculator": True, "max_answer_chars": 200}
GENERATE = {"max_tokens": 128, "batch_size": 12}
# The closing hint: an easy GSM8K-style question, asked of the trained PoFT model at the end of the
# run; the quickstart prints the command and what the model answered in this run, right or wrong.
# After 16 LoRA steps the 270M base target has learnt GSM8K's format, not its arithmetic: of 10
# one-step multiplication questions, this run's PoFT model got 2 and its SFT model 3 right on our
# machine (README); this question is one the PoFT model answered there ("4x4 = 16. #### 16").
HINT = {"question": "There are 4 cars with 4 wheels each. How many wheels are there?", "answer": "16"}


def _fresh(out: Path) -> Path:
    """`out`, or `out-2`, `out-3`... so an earlier quickstart is never overwritten."""
    cand, n = out, 1
    while cand.exists():
        n += 1
        cand = out.with_name(f"{out.name}-{n}")
    return cand


def run_quickstart(out: str | Path = "runs/quickstart", overrides: list[str] = (), sizes: dict | None = None,
                   noise: float = NOISE, generate: dict | None = None) -> dict:
    t0 = time.perf_counter()
    out = _fresh(Path(out))
    say = lambda m: print(f"[quickstart {time.perf_counter() - t0:5.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    sizes = dict(sizes or SIZES)
    say(f"1/5 data: GSM8K {sizes} (answers <= {GSM8K['max_answer_chars']} characters, no calculator notes), "
        f"{noise:.0%} of the training pairs noisy -> {out / 'data'}")
    paths = split_gsm8k(out / "data", sizes, noise=noise, **GSM8K)
    cfg: Config = load_config([QUICKSTART_CONFIG], [f"data.train={paths['train']}", f"data.valid={paths['valid']}",
                                                     *overrides])
    say(f"2/5 score the data with {', '.join(a.model for a in cfg.aligned)} (converted from GGUF on first use)")
    run_score(cfg)
    runs = {}
    for step, objective in ((3, "poft"), (4, "sft")):
        say(f"{step}/5 train {cfg.model} with {objective.upper()}")
        runs[objective] = run_train(replace(cfg, objective=objective, run_dir=str(out / objective)))
    plot = plot_if_possible([runs["poft"], runs["sft"]], out / "curves.png", log=say)
    say(f"5/5 evaluate base, PoFT and SFT on {sizes['test']} clean held-out questions: likelihood, then generation")
    models = {"base": (cfg, None), **{name: (cfg, str(RunDir(run).adapters)) for name, run in runs.items()}}
    result = run_generation_eval(models, str(paths["test"]), out / "eval", answer="gsm8k",
                                 **(generate or GENERATE), log=say)
    say(f"the closing hint's question, asked of the PoFT model: {HINT['question']}")
    hint = ask(runs["poft"], HINT, max_tokens=(generate or GENERATE)["max_tokens"])
    say("done")
    return {"out": out, "runs": runs, "eval": result, "eval_dir": out / "eval", "config": cfg, "plot": plot,
            "hint": hint, "seconds": time.perf_counter() - t0}


def ask(run: str | Path, question: dict, *, max_tokens: int) -> dict:
    """`question` ({"question", "answer"}) asked of a run as `poft-mlx generate RUN --answer gsm8k`
    asks it (greedy, the run's template, the reply ends at its '#### N'), and the verdict."""
    from ..evaluation.answers import gsm8k_answer, gsm8k_answer_end
    from ..models.generation import generate, open_generator

    gen = open_generator(str(run))
    reply = generate(gen, [[{"role": "user", "content": question["question"]}]], max_tokens=max_tokens,
                     answer_end=gsm8k_answer_end)[0].text
    given = gsm8k_answer(reply)
    return {**question, "max_tokens": max_tokens, "reply": reply, "given": given, "correct": given == question["answer"]}


def example_answers(result: dict, width: int = 400) -> str:
    """The first held-out question, its reference answer, and each model's reply."""
    s = result["samples"][0]
    question = s["prompt"][-1]["content"]
    lines = [f"Q: {question}", f"reference answer: {s['reference_answer']}"]
    for name in result["models"]:
        r = s[name]
        reply = " ".join(r["reply"].split())
        reply = reply if len(reply) <= width else reply[:width] + " ..."
        verdict = "" if "correct" not in r else (" [correct]" if r["correct"] == 1.0 else f" [answer: {r['answer']}]")
        lines.append(f"{name}{verdict}: {reply or '(empty reply)'}")
    return "\n".join(lines)
