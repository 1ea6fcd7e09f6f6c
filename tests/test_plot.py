"""`poft-mlx plot`: the curves drawn are metrics.jsonl's values, for every run and split, in PNG and SVG."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from poft_mlx.cli.main import main
from poft_mlx.evaluation.plot import PANELS, figure
from tiny import write_tiny_config

pytest.importorskip("matplotlib")


def invoke(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """A PoFT run (tau, win rate logged) and an SFT run without aligned models (no tau), 6 steps each."""
    out = {}
    for objective, aligned in (("poft", None), ("sft", [])):
        root = tmp_path_factory.mktemp(objective)
        extra = {} if aligned is None else {"aligned": aligned}
        write_tiny_config(root, tiny_models, adapter={"rank": 4, "alpha": 32, "num_layers": -1},
                          train={"iters": 6, "batch_size": 4, "learning_rate": 5e-3, "steps_per_eval": 3,
                                 "steps_per_report": 2}, objective=objective, run_dir=str(root / objective), **extra)
        invoke("train", "-c", root / "cfg.yaml")
        out[objective] = root / objective
    return out


def logged(run) -> dict[tuple[str, str], tuple[list, list]]:
    """(metric, split) -> (steps, values) straight from metrics.jsonl: finite values only."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for metric, _ in PANELS:
            v = rec.get(metric)
            if isinstance(v, float | int) and math.isfinite(v):
                steps, values = out.setdefault((metric, rec["split"]), ([], []))
                steps.append(rec["step"])
                values.append(v)
    return out


def test_plotted_lines_are_the_logged_values(runs):
    fig = figure([runs["poft"], runs["sft"]])
    titles = {ax.get_title(): ax for ax in fig.axes}
    drawn = {}
    for metric, title in PANELS:
        for line in titles[title].lines:
            label, split, m = line.get_gid().split("|")
            assert m == metric
            drawn[(label, metric, split)] = (list(line.get_xdata()), list(line.get_ydata()))
    poft, sft = logged(runs["poft"]), logged(runs["sft"])
    # The SFT run has no aligned scores: tau is NaN in its log and its win rate a meaningless 0.
    assert ("tau_mean", "train") not in sft and all(v == 0.0 for v in sft[("win_rate", "train")][1])
    sft = {k: v for k, v in sft.items() if k[0] != "win_rate"}
    expected = {("poft", *k): v for k, v in poft.items()} | {("sft", *k): v for k, v in sft.items()}
    assert drawn == expected
    # every panel's metric for the PoFT run, train and validation, except the validation learning rate
    assert {(m, s) for _, m, s in drawn if _ == "poft"} == {(m, s) for m, _ in PANELS for s in ("train", "val")} - {
        ("lr", "val")}
    assert len(drawn[("poft", "loss", "train")][0]) == 3 and drawn[("poft", "loss", "val")][0] == [0, 3, 6]
    styles = {line.get_gid(): line.get_linestyle() for ax in fig.axes for line in ax.lines}
    assert styles["poft|train|ce"] == "-" and styles["poft|val|ce"] == "--"


def test_plot_command_writes_png_and_svg(runs, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    r = invoke("plot", runs["poft"], runs["sft"], "-o", out, "--svg")
    svg = out.with_suffix(".svg")
    assert f"wrote {out}, {svg}" in r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    # one SVG group per curve, named as the Figure's lines: the same curves as test_plotted_lines...
    curves = {line.get_gid() for ax in figure([runs["poft"], runs["sft"]]).axes for line in ax.lines}
    assert len(curves) == 14 and all(f'id="{gid}"' in text for gid in curves)
    invoke("plot", runs["sft"])  # one run: its own folder
    assert (runs["sft"] / "curves.png").stat().st_size > 20_000


def test_plot_of_a_folder_without_metrics_is_one_clear_line(tmp_path):
    r = invoke("plot", tmp_path, ok=False)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: {tmp_path}: no metrics to plot" in r.output
