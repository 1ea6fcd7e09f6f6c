import os
import re

import pytest

import poft_mlx  # noqa: F401  (BLAS before mlx)

from tiny import CHATML, QWEN, make_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """fuzz_scale runs only when asked for (-m fuzz_scale, or POFT_FUZZ_SCALE=N): not in `pytest -q -ra`."""
    if re.search(r"(?<!not )\bfuzz_scale\b", config.getoption("-m") or "") or os.environ.get("POFT_FUZZ_SCALE"):
        return
    skip = pytest.mark.skip(reason="fuzz_scale: run with -m fuzz_scale or POFT_FUZZ_SCALE=N")
    for item in items:
        if "fuzz_scale" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own poft-mlx cache (scores, converted models)."""
    if not os.environ.get("POFT_MLX_TEST_SHARED_HOME"):
        monkeypatch.setenv("POFT_MLX_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A target and two aligned models, each with its own tokenizer and template."""
    root = tmp_path_factory.mktemp("models")
    return {
        "target": make_model(root / "target", vocab_size=320, seed=0, template=None, style="gemma", arch="gemma3_text"),
        "aligned_a": make_model(root / "aligned_a", vocab_size=300, seed=1, template=CHATML),
        "aligned_b": make_model(root / "aligned_b", vocab_size=400, seed=2, template=QWEN, arch="qwen2"),
    }
