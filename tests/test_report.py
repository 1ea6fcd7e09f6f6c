"""`poft-mlx report` on tiny models: numbers from the cache, noise marks, tau, --keep-top."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from poft_mlx.cli.main import main
from poft_mlx.config import load_config
from poft_mlx.data.records import read_jsonl
from poft_mlx.scoring.references import open_aligned, reference_scores
from tiny import gsm_like, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import inject_noise  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def scored(tmp_path, tiny_models):
    clean = write_jsonl(tmp_path / "clean.jsonl", gsm_like(24))
    counts = inject_noise.inject_file(clean, tmp_path / "train.jsonl", share=0.25, seed=0)
    cfg = {"model": str(tiny_models["target"]), "chat_template": "gemma",
           "aligned": [str(tiny_models["aligned_a"]), str(tiny_models["aligned_b"])],
           "data": {"train": str(tmp_path / "train.jsonl"), "max_seq_length": 96},
           "adapter": {"rank": 4, "alpha": 8},
           "train": {"iters": 4, "batch_size": 4, "learning_rate": 1e-2, "lr_schedule": "constant"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path, counts


def invoke(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def _r_ref(tmp):
    """r_ref and the samples straight from the cache, without the report."""
    cfg = load_config([tmp / "cfg.yaml"])
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.models.modeling import resolve
    from poft_mlx.data.prepare import prepare, target_renderer
    prep = prepare(cfg.data.train, target_renderer(load_tokenizer(resolve(cfg.model)), cfg), cfg)
    r_ref, per_model = reference_scores([open_aligned(cfg, a) for a in cfg.aligned], prep.samples)
    return prep.samples, r_ref, per_model


def test_refuses_without_scores(scored):
    tmp, _ = scored
    r = invoke("report", "-c", tmp / "cfg.yaml", "-o", tmp / "rep", ok=False)
    assert r.exit_code == 1
    assert "the report needs an aligned score" in r.output and "poft-mlx score" in r.output
    assert not (tmp / "rep" / "report.json").exists()


def test_report_numbers_noise_and_keep_top(scored):
    tmp, counts = scored
    invoke("score", "-c", tmp / "cfg.yaml")
    out = invoke("report", "-c", tmp / "cfg.yaml", "-o", tmp / "rep", "--least", "5",
               "--keep-top", "0.4", "--out", tmp / "top.jsonl")
    rep = json.loads((tmp / "rep" / "report.json").read_text())
    samples, r_ref, per_model = _r_ref(tmp)
    assert rep["samples"] == 24
    s = rep["scores"]["r_ref"]
    assert s["mean"] == pytest.approx(r_ref.mean()) and s["std"] == pytest.approx(r_ref.std())
    assert s["q50"] == pytest.approx(np.median(r_ref)) and s["q05"] == pytest.approx(np.quantile(r_ref, 0.05))
    for name, r in per_model.items():
        assert rep["scores"][name]["mean"] == pytest.approx(r.mean())
    assert s["mean"] == pytest.approx(np.mean([rep["scores"][k]["mean"] for k in per_model]))  # equal weights
    # The least likely samples, lowest first.
    low = rep["least_likely"]
    assert [x["source"] for x in low] == [samples[i].source for i in np.argsort(r_ref, kind="stable")[:5]]
    assert [x["r_ref"] for x in low] == sorted(x["r_ref"] for x in low)
    assert low[0]["source"] in out.output
    # Noise marks: counts per kind and the AUROC against a direct pairwise count.
    nb = rep["noise"]
    assert {k: v["n"] for k, v in nb["kinds"].items()} == {"clean": 18, "mismatch": counts["mismatch"],
                                                          "chars": counts["chars"], "noisy": 6}
    noisy = np.array([bool(x.meta.get("noise")) for x in samples])
    pos, neg = r_ref[noisy], r_ref[~noisy]
    assert nb["auroc"] == pytest.approx(((pos[:, None] < neg[None, :]).mean()))
    assert nb["kinds"]["noisy"]["mean"] == pytest.approx(pos.mean())
    bottom = nb["bottom"]["20%"]
    k = int(np.ceil(0.2 * 24))
    assert bottom["n"] == k and bottom["noisy_share"] == pytest.approx(noisy[np.argsort(r_ref, kind="stable")[:k]].mean())
    assert (tmp / "rep" / "scores.png").read_bytes()[:8] == PNG
    # --keep-top 0.4: the 10 best records by r_ref, verbatim, in file order.
    src = (tmp / "train.jsonl").read_text().splitlines()
    kept = (tmp / "top.jsonl").read_text().splitlines()
    assert rep["keep_top"]["kept"] == len(kept) == round(0.4 * 24)
    lines = [int(x.source.rsplit(":", 1)[1]) for x in samples]
    by_line = dict(zip(lines, r_ref))
    kept_lines = [src.index(x) + 1 for x in kept]
    assert kept_lines == sorted(kept_lines)
    assert min(by_line[n] for n in kept_lines) >= max(v for n, v in by_line.items() if n not in kept_lines)
    assert len(read_jsonl(tmp / "top.jsonl")) == len(kept)


def test_report_with_a_run_gives_the_trainers_tau(scored):
    tmp, _ = scored
    invoke("train", "-c", tmp / "cfg.yaml", "--set", f"run_dir={tmp / 'run'}")
    invoke("report", "--run", tmp / "run")
    rep = json.loads((tmp / "run" / "report" / "report.json").read_text())
    invoke("eval", "--no-base", "--data", tmp / "train.jsonl", tmp / "run", "--json-out", tmp / "ev.json")
    ev = json.loads((tmp / "ev.json").read_text())[str(tmp / "run")]
    # tau = sigmoid(r_ref - r_theta) under the run's adapters: the same as eval's tau.
    assert rep["run"]["tau"]["mean"] == pytest.approx(ev["tau_mean"], rel=1e-5)
    assert rep["run"]["win_rate"] == pytest.approx(ev["win_rate"])
    w = np.load(tmp / "run" / "report" / "weights.npz")
    np.testing.assert_allclose(w["tau"], 1 / (1 + np.exp(w["r_theta"] - w["r_ref"])), rtol=1e-12)
    assert rep["run"]["tau_noise"]["kinds"]["noisy"]["n"] == 6
    assert (tmp / "run" / "report" / "tau.png").read_bytes()[:8] == PNG


def test_keep_top_needs_out(scored):
    tmp, _ = scored
    r = invoke("report", "-c", tmp / "cfg.yaml", "--keep-top", "0.4", ok=False)
    assert r.exit_code == 2 and "--out" in r.output
