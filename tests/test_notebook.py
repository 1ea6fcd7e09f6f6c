"""examples/quickstart.ipynb, executed top to bottom by a Jupyter kernel (nbclient), on the tiny
models: the notebook's API calls work as a notebook user runs them, and each step leaves what
it says (a scored cache, two runs, an eval table, replies, a fused folder, a push plan)."""

import json
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, tiny_models, monkeypatch):
    out = tmp_path / "nb"
    monkeypatch.setenv("POFT_NB_TARGET", str(tiny_models["target"]))
    monkeypatch.setenv("POFT_NB_ALIGNED", str(tiny_models["aligned_a"]))
    monkeypatch.setenv("POFT_NB_ITERS", "4")
    monkeypatch.setenv("POFT_NB_MAX_TOKENS", "12")
    monkeypatch.setenv("POFT_NB_OUT", str(out))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = ["".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in c.get("outputs", []))
               for c in nb.cells if c.cell_type == "code"]
    assert not any('"output_type": "error"' in json.dumps(c.get("outputs", [])) for c in nb.cells)
    for run in ("poft", "sft"):
        assert (out / run / "adapters" / "adapters.safetensors").is_file()
        assert [json.loads(x)["step"] for x in (out / run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["split"] == "train"][-1] == 4
    assert json.loads((out / "poft" / "adapters" / "adapter_config.json").read_text())["poft_mlx"]["objective"] == "poft"
    assert json.loads((out / "sft" / "adapters" / "adapter_config.json").read_text())["poft_mlx"]["objective"] == "sft"
    summary = json.loads((out / "eval" / "eval.json").read_text())
    assert set(summary["models"]) == {"base", str(out / "poft"), str(out / "sft")}
    assert (out / "eval" / "eval.html").is_file()
    assert any("accuracy" in o for o in outputs)  # pm.table printed the comparison
    assert (out / "fused" / "config.json").is_file() and (out / "fused" / "tokenizer_config.json").is_file()
    assert any("README.md" in o and "model.safetensors" in o for o in outputs)  # the push plan
