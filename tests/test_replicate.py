"""scripts/replicate.py --tiny on tiny models: every stage, every table with intervals, the plots,
and a rerun that redoes only the units whose results were deleted (a lost likelihood unit, and a
training run cut off after its first epoch, which resumes from that checkpoint)."""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import replicate  # noqa: E402


def _interval(iv: dict, key: str = "mean") -> None:
    v = iv[key] if key in iv else iv["diff"]
    assert v is not None and np.isfinite(v), iv
    assert iv["lo"] is not None and iv["hi"] is not None, iv
    assert iv["lo"] <= v + 1e-9 and v <= iv["hi"] + 1e-9, iv


def _cell(c: dict) -> None:
    """A describe() cell: bootstrap over prompts and a seed-level interval."""
    _interval(c["prompts"])
    _interval(c["seeds"])


def _diff(c: dict) -> None:
    """A compare() difference: paired bootstrap over prompts and a seed-level interval."""
    _interval(c["prompts"], "diff")
    _interval(c["seeds"])
    assert len(c["per_seed"]) == replicate.SCALES["tiny"]["seeds"]


def test_detectable_difference_by_hand():
    """80 % power at two-sided 5 %: (1.96 + 0.8416) standard errors, each SE = 95 % width / 3.92;
    the wider interval decides; an interval that is missing gives none."""
    assert replicate.detectable({"lo": -0.196, "hi": 0.196}) == pytest.approx(0.28016)
    assert replicate.detectable({"lo": 0.0, "hi": 0.196}, {"lo": -0.196, "hi": 0.196}) == pytest.approx(0.28016)
    assert replicate.detectable({"lo": None, "hi": 1.0}) is None


def test_replicate_tiny(tmp_path, tiny_models):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    argv = ["--tiny", "--out", str(out), "--target", str(tiny_models["target"]), "--chat-template", "gemma",
            "--aligned", str(tiny_models["aligned_a"]), "--aligned", str(tiny_models["aligned_b"])]
    res = replicate.main(argv)
    S = replicate.SCALES["tiny"]
    E, Esg, seeds = S["gsm8k"]["epochs"], S["sharegpt"]["epochs"], range(S["seeds"])
    tags = ["n00", "n30", "n50"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["complete"] and saved["tables"].keys() == res["tables"].keys()
    units = sorted(str(p.relative_to(out / "units"))[:-5] for p in (out / "units").rglob("*.json"))
    assert sorted(res["invocation"]["executed"]) == units  # everything ran, each unit once
    T = saved["tables"]

    # The noise ablation: noise x method x epoch x seed, each cell with its bootstrap interval;
    # every epoch's checkpoint was evaluated (epoch 0 = the base model, shared by all runs).
    rows = T["gsm8k_ce_by_seed"]["rows"]
    assert {(r["noise"], r["method"], r["epoch"], r["seed"]) for r in rows} == {
        (t, m, e, s) for t in tags for m in ("sft", "poft") for e in range(E + 1) for s in seeds}
    for r in rows:
        _interval(r["ce"])
    for r in T["gsm8k_ce"]["rows"]:
        _cell(r["ce"])
    assert {(r["noise"], r["epoch"]) for r in T["gsm8k_ce_diff"]["rows"]} == {(t, e) for t in tags for e in range(1, E + 1)}
    for r in T["gsm8k_ce_diff"]["rows"]:
        _diff(r["poft_minus_sft"])
    assert [r["noise"] for r in T["primary"]["rows"]] == tags and all(r["epoch"] == E for r in T["primary"]["rows"])
    # Paired by seed and prompt: the primary difference is the mean of the per-seed differences.
    for r in T["primary"]["rows"]:
        assert r["poft_minus_sft"]["detectable"] > 0
        d = r["poft_minus_sft"]
        assert d["diff"] == pytest.approx(np.mean(list(d["per_seed"].values())))
        assert isinstance(d["detected"], bool)
    ce = {(r["noise"], r["method"], r["epoch"], r["seed"]): r["ce"]["mean"] for r in rows}
    for t in tags:  # training lowers the held-out CE of every run; SFT and PoFT end apart
        for s in seeds:
            assert ce[t, "sft", E, s] < ce[t, "sft", 0, s] and ce[t, "poft", E, s] < ce[t, "poft", 0, s]
            assert ce[t, "sft", E, s] != ce[t, "poft", E, s]
    assert {(r["noise"], r["method"]) for r in T["gsm8k_noise_degradation"]["rows"]} == {
        (t, m) for t in ("n30", "n50") for m in ("sft", "poft", "poft_minus_sft")}
    for r in T["gsm8k_noise_degradation"]["rows"]:
        _diff(r["ce_noisy_minus_clean"])
    for r in T["gsm8k_epoch_stability"]["rows"]:
        _interval(r["last_minus_best_epoch"])
    # tau vs noise: the base and the PoFT runs, per noise kind, with the noisy - clean gap.
    tau = {(r["noise"], r["method"], r["kind"]) for r in T["tau_vs_noise"]["rows"]}
    for t in ("n30", "n50"):
        assert {(t, m, k) for m in ("base", "poft") for k in ("clean", "mismatch", "chars", "gap noisy - clean")} <= tau
    for r in T["tau_vs_noise"]["rows"]:
        if r["method"] == "poft":
            _interval(r["tau"]["seeds"])
    assert {r["noise"] for r in T["r_ref_noise"]["rows"]} == {"n30", "n50"}
    # Generations (GSM8K: accuracy and the aligned models' likelihood of the reply).
    gen = {(r["noise"], r["method"]) for r in T["gsm8k_generation"]["rows"]}
    assert gen == {("-", "base")} | {(replicate.ntag(x), m) for x in S["gsm8k"]["gen_noise"] for m in ("sft", "poft")}
    for r in T["gsm8k_generation_diff"]["rows"]:
        for m in ("correct", "aligned_lp", "reply_tokens", "stopped"):
            _diff(r[m])

    # Compositions: filtering by preference score, and DPO after SFT / PoFT.
    assert len(T["composition_filter"]["rows"]) == 4
    for r in T["composition_filter"]["rows"]:
        _cell(r["ce"])
    assert {r["comparison"] for r in T["composition_filter_diff"]["rows"]} == {
        "SFT: filtered minus all", "PoFT: filtered minus all", "filtered: PoFT minus SFT",
        "PoFT on filtered minus SFT on all"}
    for r in T["composition_filter_diff"]["rows"]:
        _diff(r["ce"])
    filtered = (out / "data" / "gsm8k" / "train_n30_top40.jsonl").read_text().splitlines()
    assert len(filtered) == round(0.4 * S["gsm8k"]["train"])
    assert [r["model"] for r in T["composition_dpo"]["rows"]] == ["SFT (n00)", "SFT -> DPO", "PoFT (n00)", "PoFT -> DPO"]
    for r in T["composition_dpo"]["rows"]:
        for k in ("ce", "pair_accuracy", "aligned_lp"):
            _cell(r[k])
    dpo = {r["comparison"]: r for r in T["composition_dpo_diff"]["rows"]}
    assert set(dpo) == {"SFT -> DPO minus SFT", "PoFT -> DPO minus PoFT", "PoFT -> DPO minus SFT -> DPO"}
    for r in dpo.values():
        for k in ("ce", "pair_accuracy", "aligned_lp", "correct"):
            _diff(r[k])
    pairs = [json.loads(x) for x in (out / "data" / "gsm8k" / "dpo_train.jsonl").read_text().splitlines()]
    assert len(pairs) == S["dpo"]["pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)
    cfg = (out / "runs" / "dpo-poft-s0" / "config.yaml").read_text()
    assert "objective: dpo" in cfg and str(out / "runs" / "gsm8k-n00-poft-s0" / "adapters") in cfg

    # ShareGPT: salvaged multi-turn chats, likelihood per epoch and generations (no accuracy).
    chats = [json.loads(x) for x in (out / "data" / "sharegpt" / "train.jsonl").read_text().splitlines()]
    assert len(chats) == S["sharegpt"]["train"]
    assert all(sum(m["role"] == "assistant" for m in c["messages"]) >= 2 for c in chats)
    assert {(r["method"], r["epoch"]) for r in T["sharegpt_ce"]["rows"]} == {
        (m, e) for m in ("sft", "poft") for e in range(Esg + 1)}
    assert {(r["method"], r["epoch"], r["seed"]) for r in T["sharegpt_ce_by_seed"]["rows"]} == {
        (m, e, s) for m in ("sft", "poft") for e in range(1, Esg + 1) for s in seeds}
    for r in T["sharegpt_ce_diff"]["rows"]:
        _diff(r["poft_minus_sft"])
    assert {r["method"] for r in T["sharegpt_generation"]["rows"]} == {"base", "sft", "poft"}
    (d,) = T["sharegpt_generation_diff"]["rows"]
    assert "correct" not in d
    for m in ("aligned_lp", "reply_tokens", "stopped"):
        _diff(d[m])

    # Outputs: Markdown tables, PNG plots, the raw units.
    md = (out / "tables.md").read_text()
    assert "PRIMARY" in md and "Composition" in md and "ShareGPT" in md
    for name in ("learning_curves_gsm8k", "tau_vs_noise", "differences", "sharegpt_curves"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "gen" / "gsm8k-n00-poft-s1" / "eval.html").exists()

    # Resumable: lose one likelihood unit's result, and cut a training run back to its first
    # epoch (its result and its last checkpoint gone); a rerun redoes exactly those two units,
    # the run resuming from its epoch-1 checkpoint, and reproduces their results.
    lost = out / "units" / "lik" / "gsm8k-n30-poft-s1" / "e1.json"
    before_lik = json.loads(lost.read_text())
    lost.unlink()
    run = out / "runs" / "gsm8k-n50-sft-s0"
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == E
    final = {k: np.array(v) for k, v in mx.load(str(ckpts[-1] / "adapters.safetensors")).items()}
    shutil.rmtree(ckpts[-1])
    (out / "units" / "train" / "gsm8k-n50-sft-s0.json").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "units").rglob("*.json")}
    # --report runs nothing and summarizes what is there: incomplete, the lost epoch-1 CE gone from its table
    partial = replicate.main(argv + ["--report"])
    assert partial["invocation"]["executed"] == [] and not partial["complete"]
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    assert "Incomplete" in (out / "tables.md").read_text()
    assert ("n30", "poft", 1, 1) not in {(r["noise"], r["method"], r["epoch"], r["seed"])
                                          for r in partial["tables"]["gsm8k_ce_by_seed"]["rows"]}
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    again = replicate.main(argv)
    assert again["invocation"]["executed"] == ["train/gsm8k-n50-sft-s0", "lik/gsm8k-n30-poft-s1/e1"]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # nothing else was rewritten
    train_unit = json.loads((out / "units" / "train" / "gsm8k-n50-sft-s0.json").read_text())
    assert train_unit["resumed_from"] == int(ckpts[0].name.split("-")[1])
    resumed = mx.load(str(ckpts[-1] / "adapters.safetensors"))
    for k, v in final.items():
        np.testing.assert_allclose(np.array(resumed[k]), v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(json.loads(lost.read_text())["files"]["gsm8k_heldout"]["ce"],
                               before_lik["files"]["gsm8k_heldout"]["ce"], rtol=1e-6)
    np.testing.assert_allclose([r["poft_minus_sft"]["diff"] for r in again["tables"]["primary"]["rows"]],
                               [r["poft_minus_sft"]["diff"] for r in res["tables"]["primary"]["rows"]], rtol=1e-5)
