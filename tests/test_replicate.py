"""scripts/replicate.py --tiny on tiny models: every run, every curve, the plot, and a rerun that skips."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import replicate  # noqa: E402


def test_replicate_tiny(tmp_path, tiny_models):
    pytest.importorskip("matplotlib")
    argv = ["--tiny", "--out", str(tmp_path / "out"), "--target", str(tiny_models["target"]),
            "--chat-template", "gemma", "--aligned", str(tiny_models["aligned_a"]),
            "--aligned", str(tiny_models["aligned_b"])]
    res = replicate.main(argv)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(res["runs"]))
    epochs = replicate.TINY["epochs"]
    names = {f"{c}-{o}-s{s}" for c in ("clean", "noisy") for o in ("sft", "poft") for s in (0, 1)}
    assert set(saved["runs"]) == names
    for name, run in saved["runs"].items():
        assert run["epochs"] == list(range(epochs + 1))
        for key in ("heldout_ce", "accuracy", "format_rate"):
            assert len(run[key]) == epochs + 1 and all(np.isfinite(run[key])), (name, key)
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
        # Every run starts from the same model on the same held-out set; training lowers its CE.
        assert run["heldout_ce"][0] == saved["runs"]["clean-sft-s0"]["heldout_ce"][0]
        assert run["heldout_ce"][-1] < run["heldout_ce"][0]
        steps = (out / "runs" / name / "checkpoints").glob("step-*")
        assert len(list(steps)) == epochs  # one checkpoint per epoch, all kept for the accuracy curve
    # SFT and PoFT differ in the loss only, yet end at different points; two seeds differ too.
    r = saved["runs"]
    assert r["clean-sft-s0"]["heldout_ce"][-1] != r["clean-poft-s0"]["heldout_ce"][-1]
    assert r["clean-poft-s0"]["heldout_ce"][-1] != r["clean-poft-s1"]["heldout_ce"][-1]
    # Means over seeds per epoch.
    ce = saved["summary"]["noisy"]["poft"]["heldout_ce"]
    expect = np.mean([r["noisy-poft-s0"]["heldout_ce"], r["noisy-poft-s1"]["heldout_ce"]], axis=0)
    np.testing.assert_allclose(ce["mean"], expect)
    # 30 % of the 8 train records were made noisy, and the noisy PoFT runs report their tau.
    noisy = [json.loads(x) for x in (out / "data" / "train_noisy.jsonl").read_text().splitlines()]
    assert sum("noise" in x for x in noisy) == round(0.3 * replicate.TINY["train"])
    assert r["noisy-poft-s0"]["tau_noise"]["kinds"]["noisy"]["n"] == 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report_noisy" / "scores.png").exists()
    # A rerun finds everything done and returns the same curves.
    again = replicate.main(argv)
    assert again["runs"] == res["runs"]
