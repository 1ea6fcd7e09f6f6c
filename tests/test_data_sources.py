"""Data sources (issue 14): JSONL files and folders, Parquet, Arrow, save_to_disk folders, Hub ids
loaded offline from the `datasets` cache, mixtures with weights, column mapping, and training
end to end from an hf: source and from a mixture.

Loading by id offline: `cache_hub_dataset` writes a data set into a temporary HF_DATASETS_CACHE
exactly where `datasets` keeps a Hub data set it has prepared once (OWNER___NAME/CONFIG/VERSION/
COMMIT/, Arrow files and dataset_info.json), and HF_HUB_OFFLINE makes load_dataset("OWNER/NAME")
read it from there, as it does for a user who loaded it online before.
"""

import glob
import hashlib
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from poft_mlx.config import DataConfig, load_config
from poft_mlx.data import sources
from poft_mlx.data.records import read_jsonl
from poft_mlx.errors import ConfigError, DataError, InputMissing
from tiny import gsm_like, write_jsonl, write_tiny_config

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}], "id": i} for i in range(10)]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
# A chat with tool calls and a plain one in one table: Arrow gives each row the other's keys, null.
MIXED = [
    {"messages": [{"role": "user", "content": "Add 2 and 3."},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                  {"role": "tool", "content": "5", "name": "add"},
                  {"role": "assistant", "content": "2 plus 3 is 5."}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """A private, offline `datasets` cache: nothing reaches the Hub or ~/.cache/huggingface."""
    cache = tmp_path / "hf" / "datasets"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def cache_hub_dataset(cache: Path, repo: str, splits: dict, *, config: str = "default", scratch: Path) -> None:
    """Put `splits` ({split: records}) into `cache` as datasets keeps a prepared Hub data set."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo.split("/")
    files = {split: str(write_jsonl(scratch / f"{name}-{config}-{split}.jsonl", recs)) for split, recs in splits.items()}
    staging = scratch / f"staging-{name}-{config}"
    builder = Json(cache_dir=str(staging), dataset_name=name, config_name=config, hash="0" * 40, data_files=files)
    builder.download_and_prepare()
    (built,) = glob.glob(str(staging / name / f"{config}-*"))  # config id + a hash of the local files
    target = cache / f"{owner}___{name}" / config
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(built, target)
    (info,) = glob.glob(str(target / "*" / "*" / "dataset_info.json"))
    assert json.loads(Path(info).read_text())["config_name"] == config


@pytest.fixture
def hub(hf_cache, tmp_path):
    cache_hub_dataset(hf_cache, "poft-test/chats", {"train": CHATS, "validation": CHATS[:3]}, scratch=tmp_path)
    cache_hub_dataset(hf_cache, "poft-test/tools", {"test": MIXED}, scratch=tmp_path)  # splits share one schema
    for config, recs in (("small", CHATS[:2]), ("large", CHATS)):
        cache_hub_dataset(hf_cache, "poft-test/configs", {"train": recs}, config=config, scratch=tmp_path)
    return tmp_path


def load(spec, data=None, **kw):
    return sources.load_records(spec, data or DataConfig(), **kw)


# ---------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize("spec, key, want", [
    ("hf:HuggingFaceH4/ultrachat_200k:train_sft[:2000]", "data.train",
     ("HuggingFaceH4/ultrachat_200k", None, "train_sft", "[:2000]")),
    ("hf:org/set", "data.train", ("org/set", None, "train", "")),
    ("hf:org/set", "data.valid", ("org/set", None, "validation", "")),
    ("hf:org/set[10%:20%]", "data.test", ("org/set", None, "test", "[10%:20%]")),
    ("hf:org/set:main:test[-5:]", "data.train", ("org/set", "main", "test", "[-5:]")),
    ("hf:org/set:main:", "data.valid", ("org/set", "main", "validation", "")),
    ("hf:gsm8k:train", "data.train", ("gsm8k", None, "train", "")),
])
def test_hf_grammar(spec, key, want):
    s = sources.parse_hf(spec, key)
    assert (s.repo, s.config, s.split, s.slice) == want


@pytest.mark.parametrize("spec, needle", [
    ("hf:a/b:c:d:e", "too many"), ("hf:not an id", "not a data set id"), ("hf:a/b:tr ain", "not a split"),
    ("hf:a/b:train[1:2:3]", "not a slice"), ("hf:", "not a data set id"),
])
def test_hf_grammar_errors_name_the_key_and_the_grammar(spec, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        sources.check(spec, None, "data.valid")
    assert str(e.value).startswith("data.valid: ") and "hf:ID[[:CONFIG]:SPLIT][SLICE]" in str(e.value)


def test_missing_local_sources_are_named(tmp_path):
    with pytest.raises(InputMissing, match=r"data.train: org/set does not exist \(a Hugging Face data set\? write hf:org/set\)"):
        sources.check("org/set")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputMissing, match="is a folder without .jsonl, .parquet or .arrow files"):
        sources.check(str(tmp_path / "empty"), None, "data.valid")


def test_config_takes_lists_mappings_and_column_names(tmp_path):
    cfg = load_config([], ["data.train=[a.jsonl, {path: 'hf:o/s:train', weight: 0.5, messages_field: conv}]",
                           "data.prompt_field=question", "data.test=hf:o/s"])
    assert cfg.data.train == ["a.jsonl", {"path": "hf:o/s:train", "weight": 0.5, "messages_field": "conv"}]
    (a, b) = sources.entries(cfg.data.train, cfg.data)
    assert a == sources.Entry("a.jsonl", None, {"prompt": "question"})
    assert b == sources.Entry("hf:o/s:train", 0.5, {"prompt": "question", "messages": "conv"})
    # The resolved config round-trips through YAML (RUN_DIR/config.yaml).
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": cfg.data.__dict__}))
    assert load_config([path]).data == cfg.data


@pytest.mark.parametrize("value, needle", [
    ("[]", "data.train: an empty list"),
    ("[{path: a, wieght: 2}]", "unknown key 'data.train[0].wieght'; valid keys here: path, weight, messages_field"),
    ("[{weight: 2}]", "data.train[0]: missing required key path"),
    ("[{path: a, weight: -1}]", "data.train[0].weight: must be at least 0"),
    ("[{path: a, weight: 0}, {path: b, weight: 0}]", "every source has weight 0"),
    ("{path: a, weight: x}", "data.train.weight: expected a number"),
])
def test_bad_source_lists_are_config_errors_naming_the_key(value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config([], [f"data.train={value}"])


# ---------------------------------------------------------------------------- loading by Hub id


def test_a_hub_id_loads_offline_from_the_datasets_cache_with_split_and_slice(hub):
    recs = load("hf:poft-test/chats:train[2:5]").records
    assert [s.source for s in recs] == [f"hf:poft-test/chats:train:{i}" for i in (2, 3, 4)]  # indices of the split
    same = read_jsonl(write_jsonl(hub / "same.jsonl", CHATS))
    assert [s.uid for s in recs] == [s.uid for s in same[2:5]]  # the same record, the same uid (and cached scores)
    assert recs[0].meta == {"id": 2}
    assert len(load("hf:poft-test/chats:train[:30%]").records) == 3
    assert [s.source for s in load("hf:poft-test/chats:train[-2:]").records][-1] == "hf:poft-test/chats:train:9"
    # The split left out is the key's: validation for data.valid.
    valid = load("hf:poft-test/chats", key="data.valid").records
    assert [s.source for s in valid] == [f"hf:poft-test/chats:validation:{i}" for i in range(3)]


def test_a_hub_config_is_chosen_by_name(hub):
    assert len(load("hf:poft-test/configs:small:train").records) == 2
    assert len(load("hf:poft-test/configs:large:train").records) == 10
    assert load("hf:poft-test/configs:large:train").records[0].source == "hf:poft-test/configs:large:train:0"


def test_tool_chats_from_a_table_equal_their_jsonl(hub):
    """Arrow fills each row with the other rows' keys (null); the records still equal the JSONL ones."""
    recs = load("hf:poft-test/tools", key="data.test").records
    jsonl = read_jsonl(write_jsonl(hub / "mixed.jsonl", MIXED))
    assert [s.uid for s in recs] == [s.uid for s in jsonl]
    assert recs[0].tools == TOOLS and recs[0].messages == jsonl[0].messages and recs[1].tools is None


def test_hub_errors_are_one_clear_line(hub):
    with pytest.raises(InputMissing, match=r"hf:poft-test/nothere:train: cannot load it .*offline, only data sets in the cache"):
        load("hf:poft-test/nothere")
    with pytest.raises(InputMissing, match=r"hf:poft-test/chats:dev: cannot load it .*Unknown split \"dev\". Should be one of"):
        load("hf:poft-test/chats:dev")
    with pytest.raises(InputMissing, match=r"Available configs in the cache: \['large', 'small'\]"):
        load("hf:poft-test/configs:medium:train")


def test_bad_hub_records_are_named_by_split_and_index(hf_cache, tmp_path):
    bad = CHATS[:3] + [{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}]
    cache_hub_dataset(hf_cache, "poft-test/bad", {"train": bad}, scratch=tmp_path)
    with pytest.raises(DataError) as e:
        load("hf:poft-test/bad:train")
    assert "hf:poft-test/bad:train:3: messages[1].role: unknown role 'robot'" in str(e.value)


def test_streaming_reads_the_same_records(hub):
    data = DataConfig(streaming=True)
    streamed = load("hf:poft-test/chats:train[3:6]", data).records
    assert [(s.source, s.uid) for s in streamed] == [(s.source, s.uid) for s in load("hf:poft-test/chats:train[3:6]").records]
    with pytest.raises(ConfigError, match="with data.streaming a slice takes record numbers"):
        load("hf:poft-test/chats:train[:50%]", data)


# ---------------------------------------------------------------------------- local tables and folders


def test_parquet_arrow_and_save_to_disk_give_the_jsonl_records(tmp_path):
    jsonl = read_jsonl(write_jsonl(tmp_path / "chats.jsonl", CHATS))
    ds = datasets.Dataset.from_list(CHATS)
    ds.to_parquet(str(tmp_path / "chats.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    (arrow,) = glob.glob(str(tmp_path / "saved" / "*.arrow"))
    uids = [s.uid for s in jsonl]
    cases = {str(tmp_path / "chats.parquet"): f"{tmp_path}/chats.parquet:",
             arrow: f"{arrow}:", str(tmp_path / "saved"): f"{tmp_path}/saved:",
             str(tmp_path / "dict"): f"{tmp_path}/dict:train:"}
    for spec, prefix in cases.items():
        recs = load(spec).records
        assert [s.uid for s in recs] == uids, spec
        assert [s.source for s in recs] == [f"{prefix}{i}" for i in range(10)], spec  # rows from 0
    test = load(f"{tmp_path}/dict:test").records
    assert [s.source for s in test] == [f"{tmp_path}/dict:test:{i}" for i in range(4)]
    assert len(load(str(tmp_path / "dict"), key="data.test").records) == 4  # the key's split
    with pytest.raises(InputMissing, match=r"has no split 'valid' or 'validation' .*its splits: train, test"):
        load(str(tmp_path / "dict"), key="data.valid")
    streamed = load(str(tmp_path / "chats.parquet"), DataConfig(streaming=True)).records
    assert [s.uid for s in streamed] == uids


def test_a_folder_reads_its_data_files_by_name(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", CHATS[5:])
    datasets.Dataset.from_list(CHATS[:5]).to_parquet(str(folder / "a.parquet"))
    (folder / "notes.txt").write_text("not data")
    recs = load(str(folder)).records
    assert [s.meta["id"] for s in recs] == list(range(10))
    assert recs[0].source == f"{folder}/a.parquet:0" and recs[5].source == f"{folder}/b.jsonl:1"


def test_a_folder_of_split_files_reads_the_keys_split(tmp_path):
    """mlx-lm's data folder (train.jsonl, valid.jsonl, test.jsonl), or Hub-style shards."""
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    for name, recs in (("train", CHATS[:6]), ("valid", CHATS[6:8]), ("test", CHATS[8:])):
        write_jsonl(mlx / f"{name}.jsonl", recs)
    assert [s.meta["id"] for s in load(str(mlx)).records] == list(range(6))  # not valid and test too
    assert [s.meta["id"] for s in load(str(mlx), key="data.valid").records] == [6, 7]
    assert [s.meta["id"] for s in load(str(mlx), key="data.test").records] == [8, 9]
    assert [s.meta["id"] for s in load(f"{mlx}:test").records] == [8, 9]
    shards = tmp_path / "shards"
    shards.mkdir()
    datasets.Dataset.from_list(CHATS[:3]).to_parquet(str(shards / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(CHATS[3:5]).to_parquet(str(shards / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(CHATS[5:]).to_parquet(str(shards / "validation-00000-of-00001.parquet"))
    assert [s.meta["id"] for s in load(str(shards)).records] == list(range(5))
    assert [s.meta["id"] for s in load(str(shards), key="data.valid").records] == list(range(5, 10))
    with pytest.raises(InputMissing, match=r"holds split files \(train-00000-of-00002.parquet, .*\) but no test\.\*"):
        sources.check(str(shards), None, "data.test")


def test_problems_of_every_file_and_source_come_at_once(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [CHATS[0], {"prompt": "q"}])
    datasets.Dataset.from_list([{"prompt": "q", "completion": ""}, {"prompt": "q", "completion": "a"}]).to_parquet(
        str(tmp_path / "b.parquet"))
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError) as e:
        load([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")])
    assert {str(p) for p in e.value.problems} == {f"{tmp_path}/a.jsonl:2: completion: missing or not a string",
                                                  f"{tmp_path}/b.parquet:0: completion: empty"}
    with pytest.raises(DataError, match=r"c.parquet:0: <file>: cannot be read as Parquet"):
        load(str(tmp_path / "c.parquet"))


# ---------------------------------------------------------------------------- column mapping


def test_column_mapping_for_every_field(tmp_path):
    rows = [{"conversations": c["messages"], "functions": None} for c in CHATS[:2]] + [
        {"conversations": MIXED[0]["messages"], "functions": json.dumps(TOOLS)}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "conv.parquet"))
    data = DataConfig(messages_field="conversations", tools_field="functions")
    recs = load(str(tmp_path / "conv.parquet"), data).records
    assert recs[2].tools == TOOLS and [s.uid for s in recs] == [s.uid for s in read_jsonl(
        write_jsonl(tmp_path / "same.jsonl", [CHATS[0], CHATS[1], MIXED[0]]))]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "instruction": "be brief"}])
    (s,) = load(str(qa), DataConfig(prompt_field="question", completion_field="answer", system_field="instruction")).records
    assert s.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]
    doc = write_jsonl(tmp_path / "doc.jsonl", [{"body": "Some text."}])
    assert load(str(doc), DataConfig(text_field="body")).records[0].text == "Some text."
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"q": "x", "good": "g", "bad": "b"}])
    (pair,) = load(str(prefs), DataConfig(prompt_field="q", chosen_field="good", rejected_field="bad"),
                   preference=True).records
    assert pair.chosen.messages[-1]["content"] == "g" and pair.rejected.messages[-1]["content"] == "b"
    # Per-source names win over data.*_field; problems name the data set's own column.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conv": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: conv\[1\].role: unknown role 'bot'"):
        load([{"path": str(bad), "messages_field": "conv"}], DataConfig(messages_field="conversations"))
    with pytest.raises(DataError, match=r"needs 'conversations', 'prompt'/'completion' or 'text' \(found keys: conv\)"):
        load(str(bad), DataConfig(messages_field="conversations"))


# ---------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("n, weight, want", [
    (10, None, (1, 0)), (10, 1.0, (1, 0)), (10, 0.5, (0, 5)), (5, 0.5, (0, 3)), (5, 0.3, (0, 2)),
    (6, 2.0, (2, 0)), (6, 1.5, (1, 3)), (4, 2.6, (2, 2)), (10, 0.0, (0, 0)), (3, 0.1, (0, 0)),
])
def test_weights_turn_into_counts(n, weight, want):
    """round(w * n) records, halves up: every record (w * n + 1/2) // n times, the rest sampled."""
    assert sources.counts(n, weight) == want


def test_a_two_source_mixture_draws_the_counts_from_the_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", gsm_like(10))
    b = write_jsonl(tmp_path / "b.jsonl", gsm_like(6, offset=50))
    spec = [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 1.5}]
    got = load(spec, seed=3)
    assert got.report == [{"source": str(a), "records": 10, "weight": 0.5, "drawn": 5},
                          {"source": str(b), "records": 6, "weight": 1.5, "drawn": 9}]
    from_a = [s.source for s in got.records if s.source.startswith(str(a))]
    from_b = [s.source for s in got.records if s.source.startswith(str(b))]
    assert len(from_a) == len(set(from_a)) == 5 and from_a == sorted(from_a, key=lambda x: int(x.rsplit(":", 1)[1]))
    assert sorted(set(from_b)) == sorted(f"{b}:{i}" for i in range(1, 7)) and len(from_b) == 9
    # Deterministic: the same seed draws the same records; another seed (almost surely) others.
    rng = np.random.default_rng([3, 0])
    assert from_a == [f"{a}:{i + 1}" for i in np.sort(rng.choice(10, 5, replace=False))]
    assert [s.source for s in load(spec, seed=3).records] == [s.source for s in got.records]
    assert {tuple(s.source for s in load(spec, seed=k).records) for k in range(5)} != {tuple(from_a + from_b)}
    # Strings and unweighted entries mean weight 1; a mixture of kinds (JSONL + hf:) works the same.
    assert len(load([str(a), str(b)]).records) == 16


def test_a_mixture_of_a_hub_set_and_a_jsonl_file(hub):
    spec = ["hf:poft-test/chats:train[:4]", {"path": str(write_jsonl(hub / "x.jsonl", gsm_like(3))), "weight": 2}]
    got = load(spec)
    assert [r["drawn"] for r in got.report] == [4, 6]
    assert got.records[0].source == "hf:poft-test/chats:train:0"


# ---------------------------------------------------------------------------- fingerprints


def test_fingerprints(hub):
    a = write_jsonl(hub / "fa.jsonl", gsm_like(4))
    assert sources.fingerprint(str(a)) == hashlib.sha256(a.read_bytes()).hexdigest()  # sha256sum, as before
    hf = sources.fingerprint("hf:poft-test/chats:train[:4]")
    assert hf == sources.fingerprint("hf:poft-test/chats:train[:4]")  # stable
    assert hf != sources.fingerprint("hf:poft-test/chats:train[:5]")
    mix = [str(a), {"path": "hf:poft-test/chats:train", "weight": 0.5}]
    assert sources.fingerprint(mix, seed=0) == sources.fingerprint(mix, seed=0) != sources.fingerprint(mix, seed=1)
    assert sources.fingerprint(str(a), DataConfig(prompt_field="q")) != sources.fingerprint(str(a))
    folder = hub / "fold"
    folder.mkdir()
    write_jsonl(folder / "x.jsonl", gsm_like(2))
    before = sources.fingerprint(str(folder))
    write_jsonl(folder / "x.jsonl", gsm_like(3))
    assert sources.fingerprint(str(folder)) != before


# ---------------------------------------------------------------------------- end to end


def _train(cfg_path, tmp_path, run, *overrides):
    from poft_mlx.training.run import run_train

    cfg = load_config([cfg_path], [f"run_dir={tmp_path / run}", *overrides])
    return Path(run_train(cfg))


@pytest.fixture
def tiny_cfg(tmp_path, tiny_models):
    return write_tiny_config(tmp_path, tiny_models, adapter={"rank": 4, "num_layers": -1},
                             train={"iters": 3, "batch_size": 4, "learning_rate": 1e-2, "steps_per_report": 1,
                                    "steps_per_eval": 3, "steps_per_save": 3}, score={"batch_size": 4})


def test_training_from_an_hf_source_then_its_jsonl_is_already_scored(tmp_path, tiny_cfg, hf_cache, capsys):
    train, valid = gsm_like(24), gsm_like(8, offset=100)
    cache_hub_dataset(hf_cache, "poft-test/gsm-like", {"train": train, "validation": valid}, scratch=tmp_path)
    run = _train(tiny_cfg, tmp_path, "hf", "data.train=hf:poft-test/gsm-like", "data.valid=hf:poft-test/gsm-like")
    assert (run / "adapters" / "adapters.safetensors").exists()
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["records"] == 24 and report["valid"]["records"] == 8
    assert report["train"]["sources"] == [{"source": "hf:poft-test/gsm-like", "records": 24, "weight": 1.0, "drawn": 24}]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train"] == "hf:poft-test/gsm-like"
    assert len((run / "data_fingerprint.txt").read_text().strip()) == 64
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val and all(np.isfinite(m["loss"]) for m in val)
    # The same records from JSONL have the same uids: every aligned score comes from the cache.
    from poft_mlx.scoring.run import run_score

    capsys.readouterr()
    run_score(load_config([tiny_cfg]))
    err = capsys.readouterr().err
    assert "scoring" not in err and err.count("all 24 samples already scored") == 2, err


def test_training_from_a_weighted_mixture_with_text_records(tmp_path, tiny_cfg):
    chats = write_jsonl(tmp_path / "chats.jsonl", gsm_like(12))
    docs = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog {i} times."} for i in range(8)]
    datasets.Dataset.from_list(docs).to_parquet(str(tmp_path / "docs.parquet"))
    mixture = yaml.safe_dump([{"path": str(chats), "weight": 1.5}, {"path": str(tmp_path / "docs.parquet"), "weight": 0.5}],
                             default_flow_style=True).strip()
    run = _train(tiny_cfg, tmp_path, "mix", f"data.train={mixture}")
    report = json.loads((run / "data_report.json").read_text())["train"]
    assert [r["drawn"] for r in report["sources"]] == [18, 4] and report["records"] == 22
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [m["step"] for m in train] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in train)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train"][1]["weight"] == 0.5


def test_dpo_pairs_from_a_parquet_source_with_mapped_columns(tmp_path, tiny_models):
    from mlx_lm.utils import load_tokenizer

    from poft_mlx.data.prepare import target_renderer
    from poft_mlx.training.dpo import prepare_pairs

    rows = [{"question": f"What is {i} plus 1?", "good": f"It is {i + 1}.", "bad": "No idea."} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "prefs.parquet"))
    cfg = load_config([], [f"model={tiny_models['target']}", "chat_template=gemma", "objective=dpo",
                           f"data.train={tmp_path / 'prefs.parquet'}", "data.prompt_field=question",
                           "data.chosen_field=good", "data.rejected_field=bad"])
    pairs = prepare_pairs(cfg.data.train, target_renderer(load_tokenizer(tiny_models["target"]), cfg), cfg,
                          log=lambda m: None)
    assert len(pairs) == 5 and pairs.samples[0].source == f"{tmp_path}/prefs.parquet:0"
    assert pairs.samples[2].chosen.messages[-1]["content"] == "It is 3."
