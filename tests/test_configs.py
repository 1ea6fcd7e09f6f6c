"""The shipped configs load and say what README says they say."""

from pathlib import Path

import pytest

from poft_mlx.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart", "hub", "paper"])
def test_shipped_configs_load(name):
    cfg = load_config([ROOT / "configs" / f"{name}.yaml"])
    assert cfg.model and cfg.aligned and cfg.objective == "poft"


def test_paper_config_is_the_papers_setting():
    cfg = load_config([ROOT / "configs" / "paper.yaml"])
    assert len(cfg.aligned) == 3 and cfg.beta == 1.0 and cfg.gamma == 0.0
    assert "Mistral-7B" in cfg.model


def test_quickstart_config_is_the_packaged_one():
    from poft_mlx.recipes.quickstart import QUICKSTART_CONFIG

    assert QUICKSTART_CONFIG.read_text() == (ROOT / "configs" / "quickstart.yaml").read_text()


def test_the_package_version_is_pyprojects():
    import tomllib

    from poft_mlx import __version__

    assert __version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
