"""The flag-first command line (cli/flags.py): mlx-lm's flag names on the one typed config.

`poft-mlx train --model M --aligned A --data D ...` resolves to the same Config as the
equivalent YAML; the precedence is defaults < a run's config < -c files < flags < --set;
--print-config prints what would run and runs nothing; a bad value is one line naming the
flag; and a flag-first tiny run trains end to end.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poft_mlx.cli import main
from poft_mlx.cli.flags import COMMANDS, TABLE, Mapped, field_of
from poft_mlx.config import Config, DataConfig, TrainConfig, build, load_config
from tiny import gsm_like, write_jsonl, write_tiny_config

HAS_TEST = "test" in {f.name for f in dataclasses.fields(DataConfig)}  # data.test: where the config has it


def invoke(*argv: str):
    return CliRunner().invoke(main, list(argv))


def resolved(*argv: str) -> Config:
    """The Config that `poft-mlx ARGV --print-config` prints."""
    r = invoke(*argv, "--print-config")
    assert r.exit_code == 0, (argv, r.output, r.exception)
    return build(Config, yaml.safe_load(r.output))


@pytest.fixture
def data_dir(tmp_path):
    """mlx-lm's --data layout: a folder with train.jsonl, valid.jsonl and test.jsonl."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, n in (("train", 6), ("valid", 2), ("test", 2)):
        write_jsonl(folder / f"{name}.jsonl", gsm_like(n))
    return folder


def test_the_flag_first_command_is_the_equivalent_yaml(tmp_path, data_dir):
    flags = resolved("train", "--model", "m", "--aligned", "a1", "--aligned", "a2", "--data", str(data_dir),
                     "--objective", "sft", "--fine-tune-type", "dora", "--num-layers", "4", "--batch-size", "2",
                     "--learning-rate", "2e-5", "--optimizer", "adam", "--iters", "30", "--max-seq-length", "512",
                     "--grad-accumulation-steps", "2", "--seed", "3", "--val-batches", "5", "--steps-per-report", "7",
                     "--steps-per-eval", "9", "--save-every", "11", "--grad-checkpoint", "--chat-template", "gemma",
                     "--adapter-path", str(tmp_path / "runs" / "x" / "adapters"), "--report-to", "tensorboard",
                     "--project-name", "p", "--trust-remote-code")
    equivalent = tmp_path / "same.yaml"
    equivalent.write_text(f"""
model: m
aligned: [a1, a2]
objective: sft
chat_template: gemma
trust_remote_code: true
run_dir: {tmp_path / "runs" / "x"}
data: {{train: {data_dir / "train.jsonl"}, valid: {data_dir / "valid.jsonl"}, max_seq_length: 512,
        {f"test: {data_dir / 'test.jsonl'}" if HAS_TEST else ""}}}
adapter: {{type: dora, num_layers: 4}}
train: {{batch_size: 2, learning_rate: 2e-5, optimizer: adam, iters: 30, grad_accumulation_steps: 2, seed: 3,
         val_batches: 5, steps_per_report: 7, steps_per_eval: 9, steps_per_save: 11, grad_checkpoint: true,
         report_to: [tensorboard], project_name: p}}
""")
    assert flags == load_config([equivalent])  # the dataclasses, field by field
    assert flags == resolved("train", "-c", str(equivalent))


def test_precedence_defaults_run_config_files_flags_set(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("model: from-a\ntrain: {learning_rate: 1e-3, warmup_steps: 5}\n")
    second = tmp_path / "b.yaml"
    second.write_text("train: {learning_rate: 2e-3}\n")
    assert resolved("train", "-c", str(first), "-c", str(second)).train.learning_rate == 2e-3
    cfg = resolved("train", "-c", str(first), "-c", str(second), "--learning-rate", "3e-3")
    assert (cfg.model, cfg.train.learning_rate, cfg.train.warmup_steps) == ("from-a", 3e-3, 5)
    cfg = resolved("train", "-c", str(first), "--learning-rate", "3e-3", "--set", "train.learning_rate=4e-3",
                   "--model", "from-flag")
    assert (cfg.model, cfg.train.learning_rate) == ("from-flag", 4e-3)
    assert resolved("train").train.learning_rate == TrainConfig().learning_rate  # the dataclass default
    # A run's config (train --resume) is below the files and the flags.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: from-run\ntrain: {iters: 10, seed: 7, learning_rate: 5e-3}\n")
    cfg = resolved("train", "--resume", str(run), "-c", str(first), "--iters", "20")
    assert (cfg.model, cfg.train.iters, cfg.train.seed, cfg.train.learning_rate, cfg.run_dir) == \
        ("from-a", 20, 7, 1e-3, str(run))


def test_flags_that_set_more_than_one_key(tmp_path, data_dir):
    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{train: t.jsonl, valid: v.jsonl}}\ntrain: {{iters: 100}}\n")
    # a data file: data.train alone; the config's data.valid stays
    cfg = resolved("train", "-c", str(base), "--data", str(data_dir / "train.jsonl"))
    assert (cfg.data.train, cfg.data.valid) == (str(data_dir / "train.jsonl"), "v.jsonl")
    # an mlx-lm folder without valid.jsonl: no validation (the folder is the data)
    (data_dir / "valid.jsonl").unlink()
    cfg = resolved("train", "-c", str(base), "--data", str(data_dir))
    assert (cfg.data.train, cfg.data.valid) == (str(data_dir / "train.jsonl"), None)
    assert not HAS_TEST or cfg.data.test == str(data_dir / "test.jsonl")
    # any other source goes to data.train as given (a folder of data files, a Hub set)
    other = tmp_path / "shards"
    other.mkdir()
    assert resolved("train", "--data", str(other)).data.train == str(other)
    assert resolved("train", "--data", "hf:org/set:train[:100]").data.train == "hf:org/set:train[:100]"
    # --epochs clears the iters that would win over it
    cfg = resolved("train", "-c", str(base), "--epochs", "3")
    assert (cfg.train.epochs, cfg.train.iters) == (3, None)
    # --adapter-path names the run folder's adapters, or the run folder
    assert resolved("train", "--adapter-path", "runs/x/adapters").run_dir == "runs/x"
    assert resolved("train", "--adapter-path", "runs/x").run_dir == "runs/x"
    assert resolved("train", "--adapter-path", "adapters").run_dir == "adapters"  # not the working folder
    assert resolved("train", "--report-to", "wandb", "--report-to", "trackio,tensorboard").train.report_to == \
        ["wandb", "trackio", "tensorboard"]
    assert resolved("train", "--set", "train.report_to=[wandb]", "--report-to", "none").train.report_to == \
        ["wandb"]  # --set wins over the flag
    assert resolved("train", "--report-to", "none").train.report_to == []
    assert resolved("train", "--no-grad-checkpoint", "--set", "train.grad_checkpoint=true").train.grad_checkpoint


def test_print_config_runs_nothing(tmp_path, data_dir):
    run = tmp_path / "run"
    r = invoke("train", "--model", str(tmp_path / "no-such-model"), "--data", str(data_dir),
               "--adapter-path", str(run), "--print-config")
    assert r.exit_code == 0 and not run.exists(), r.output
    printed = yaml.safe_load(r.output)
    assert list(printed) == [f.name for f in dataclasses.fields(Config)]  # the whole config, in its order


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "Error: --batch-size: train.batch_size: must be at least 1, got 0"),
    (["--batch-size", "four"], "Error: --batch-size: train.batch_size: expected an integer, got 'four'"),
    (["--learning-rate", "1e999"], "Error: --learning-rate: train.learning_rate: expected a finite number"),
    (["--fine-tune-type", "qlora"], "Error: --fine-tune-type: adapter.type: 'qlora' is not one of 'lora', 'dora'"),
    (["--optimizer", "muon"], "Error: --optimizer: train.optimizer: 'muon' is not one of"),
    (["--objective", "ppo"], "Error: --objective: 'ppo' is not one of 'dpo', 'poft', 'sft'"),
    (["--report-to", "swanlab"], "Error: --report-to: train.report_to[0]: 'swanlab' is not one of 'wandb'"),
    (["--max-seq-length", "-5"], "Error: --max-seq-length: data.max_seq_length: must be at least 1"),
])
def test_a_bad_value_is_one_line_naming_the_flag(argv, message):
    r = invoke("train", *argv, "--print-config")
    assert r.exit_code == 1 and r.output.startswith(message) and r.output.count("\n") == 1, r.output


def test_an_unknown_flag_or_two_conflicting_ones_are_usage_errors_naming_them():
    r = invoke("train", "--batchsize", "4")
    assert r.exit_code == 2 and "Error: No such option '--batchsize'" in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "--batch-size" in errors[0]  # click's "Did you mean"
    r = invoke("train", "--iters", "3", "--epochs", "2")
    assert r.exit_code == 2 and "Error: --iters and --epochs: give one" in r.output
    r = invoke("score", "--iters", "3")  # a train flag is not a score flag
    assert r.exit_code == 2 and "No such option '--iters'" in r.output


def test_score_and_eval_take_the_flags_that_apply_to_them(tmp_path, data_dir, tiny_models):
    cfg = resolved("score", "--model", "m", "--aligned", "a", "--data", str(data_dir), "--batch-size", "3",
                   "--max-seq-length", "64")
    assert (cfg.aligned[0].model, cfg.data.train, cfg.score.batch_size, cfg.data.max_seq_length) == \
        ("a", str(data_dir / "train.jsonl"), 3, 64)
    # eval: each model's config (the base from the first run's) under the same flags
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    (run / "config.yaml").write_text("model: trained-on\ntrain: {seed: 5}\n")
    (run / "adapters" / "adapter_config.json").write_text("{}")
    r = invoke("eval", "--adapter-path", str(run / "adapters"), "--batch-size", "2", "--aligned", "a",
               "--print-config")
    assert r.exit_code == 0, r.output
    docs = list(yaml.safe_load_all(r.output))
    assert [d["train"]["seed"] for d in docs] == [5, 5] and {d["score"]["batch_size"] for d in docs} == {2}
    assert r.output.startswith("# base\n") and f"# {run}\n" in r.output
    r = invoke("eval", "--adapter-path", str(tmp_path), "--print-config")
    assert r.exit_code == 2 and "--adapter-path" in r.output and "is not a run" in r.output
    # eval --data: a file, or mlx-lm's folder (its test.jsonl)
    r = invoke("eval", "--model", str(tiny_models["target"]), "--chat-template", "gemma", "--data", str(data_dir),
               "--max-seq-length", "96")
    assert r.exit_code == 0 and "base" in r.output and "ce" in r.output, (r.output, r.exception)
    (data_dir / "test.jsonl").unlink()
    r = invoke("eval", "--model", "m", "--data", str(data_dir))
    assert r.exit_code == 1 and r.output == f"Error: --data: {data_dir} is a folder without test.jsonl " \
                                            "(mlx-lm's test split)\n"


def test_the_table_names_real_keys_and_mlx_lm_names_and_help_shows_the_dataclass_default():
    from mlx_lm.lora import build_parser

    mlx_lm = {s for a in build_parser()._actions for s in a.option_strings}
    ours = {"--aligned", "--chat-template", "--objective", "--epochs"}  # poft-mlx's own
    assert set(TABLE) - ours <= mlx_lm, set(TABLE) - ours - mlx_lm
    for flag, specs in TABLE.items():
        assert len(specs) == len(COMMANDS)
        for spec in specs:
            for key in (spec.sets if isinstance(spec, Mapped) else [spec] if spec else []):
                if key != "data.test" or HAS_TEST:
                    field_of(key)  # a key of the dataclasses
    r = invoke("train", "--help")
    assert f"[train.batch_size, default {TrainConfig().batch_size}]" in " ".join(r.output.split())


@settings(max_examples=120, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(sorted(TABLE)),
                          st.sampled_from(["0", "-1", "2", "1e-5", "nan", "x", "", "none", "lora", "a,b", "\udcff",
                                           "true", "[1]", "{a: 1}", "-", "."])), max_size=4),
       st.sampled_from(COMMANDS))
def test_random_flag_values_print_a_config_or_one_error(items, command):
    argv = [command] + [w for flag, value in items for w in ((flag, value) if "--grad-" not in flag and
                                                             "--trust" not in flag else (flag,))]
    r = invoke(*argv, "--print-config")
    assert r.exit_code in (0, 1, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), \
        (argv, r.output, r.exception)
    if r.exit_code == 0:
        build(Config, yaml.safe_load(r.output))  # eval without runs: the base model's config alone
    else:
        assert len([ln for ln in r.output.splitlines() if ln.startswith("Error:")]) == 1, (argv, r.output)


def test_a_flag_first_tiny_run_trains_end_to_end(tmp_path, tiny_models):
    """No YAML file: the tiny target, two aligned models and mlx-lm's data folder, all as flags."""
    write_tiny_config(tmp_path, tiny_models)  # only for its train.jsonl / valid.jsonl
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text((tmp_path / f"{name}.jsonl").read_text())
    run = tmp_path / "runs" / "tiny"
    argv = ["train", "--model", str(tiny_models["target"]), "--chat-template", "gemma",
            "--aligned", str(tiny_models["aligned_a"]), "--aligned", str(tiny_models["aligned_b"]),
            "--data", str(data), "--iters", "3", "--batch-size", "4", "--learning-rate", "1e-2",
            "--max-seq-length", "96", "--steps-per-report", "1", "--steps-per-eval", "2",
            "--adapter-path", str(run / "adapters")]
    planned = resolved(*argv)
    r = invoke(*argv)
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"adapters: {run / 'adapters'}" in r.output and (run / "adapters" / "adapters.safetensors").is_file()
    assert load_config([run / "config.yaml"]) == planned  # what ran is what --print-config said
    train = [rec for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if rec["split"] == "train"]
    assert [rec["step"] for rec in train] == [1, 2, 3] and "tau_mean" in train[0]  # PoFT, with the aligned models
