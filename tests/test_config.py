import pytest

from poft_mlx.config import Config, ConfigError, load_config, save_config


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("model: m\ntrain:\n  learning_rate: 1e-5\n  batch_size: 2\naligned: [x, {model: y, weight: 2}]\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  batch_size: 8\n")
    cfg = load_config([a, b], ["train.epochs=3", "data.span=last"])
    assert cfg.train.learning_rate == 1e-5  # PyYAML's string '1e-5' cast through the field type
    assert cfg.train.batch_size == 8 and cfg.train.epochs == 3 and cfg.data.span == "last"
    assert [(m.model, m.weight) for m in cfg.aligned] == [("x", 1.0), ("y", 2.0)]
    assert cfg.objective == "poft" and cfg.beta == 1.0 and cfg.gamma == 0.0


@pytest.mark.parametrize("override, needle", [
    ("train.lr=1", "unknown key 'train.lr'; valid keys here: optimizer, learning_rate"),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer"),
    ("beta=yes", "beta: expected a number"),
    ("train.grad_checkpoint=maybe", "train.grad_checkpoint: expected true or false"),
    ("aligned=[{weight: 1}]", "aligned[0]: missing required key(s) model"),
    ("nokey", "expected key=value"),
    ("data=3", "data: expected a mapping"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config([], [override])
    assert needle in str(e.value)


def test_an_unknown_objective_names_the_key_and_the_choices():
    """Objectives live in training/objectives/ (the config layer below cannot list them): the
    name is checked when a run builds its objective, before anything is loaded."""
    from poft_mlx.training import objectives

    cfg = load_config([], ["objective=foo"])
    with pytest.raises(ConfigError) as e:
        objectives.build(cfg)
    assert "objective: 'foo' is not one of 'dpo', 'poft', 'sft'" in str(e.value)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: m\ntrain: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config([f])
    assert "bad.yaml" in str(e.value) and "line" in str(e.value)
    g = tmp_path / "unknown.yaml"
    g.write_text("modle: m\n")
    with pytest.raises(ConfigError) as e:
        load_config([g])
    assert "unknown.yaml" in str(e.value) and "unknown key 'modle'" in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["model=m", "aligned=[a, b]", "adapter.alpha=16", "train.iters=5"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config([tmp_path / "c.yaml"])
    assert again == cfg and isinstance(again, Config)
    assert again.adapter.effective_scale() == 16 / 8
