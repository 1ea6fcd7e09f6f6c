"""Edge cases of issue 16: each test fails on the code before its fix."""

import pytest

from poft_mlx.config import ConfigError, load_config


@pytest.mark.parametrize("aligned, needle", [
    ("[{model: a, weight: 0}, {model: b, weight: 0}]", "aligned[*].weight: the weights of the 2 aligned model(s) sum to 0"),
    ("[{model: a, weight: 0}]", "aligned[*].weight"),
    ("[{model: a, weight: 2}, {model: b, weight: -1}]", "aligned[1].weight: must be at least 0, got -1.0 (model b)"),
])
def test_aligned_weights_are_bounds_checked(aligned, needle, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config([], [f"aligned={aligned}"])
    assert needle in str(e.value)
    f = tmp_path / "w.yaml"
    f.write_text(f"aligned: {aligned}\n")
    with pytest.raises(ConfigError) as e:
        load_config([f])
    assert str(f) in str(e.value) and needle in str(e.value)
    # A zero weight next to a positive one is fine: that model is simply left out of r_ref.
    assert [a.weight for a in load_config([], ["aligned=[{model: a, weight: 0}, {model: b}]"]).aligned] == [0.0, 1.0]


def test_the_compute_dtype_is_part_of_the_score_cache_key(tiny_models, tmp_path):
    from poft_mlx.config import AlignedModel, Config
    from poft_mlx.runtime.device import backend
    from poft_mlx.scoring.references import open_aligned

    def handle(dtype):
        cfg = Config(aligned=[AlignedModel(str(tiny_models["aligned_a"]))])
        cfg.system.dtype, cfg.score.cache_dir = dtype, str(tmp_path / "scores")
        return open_aligned(cfg, cfg.aligned[0])

    f32, bf16 = handle("float32"), handle("bfloat16")
    f32.cache.put([("some-sample", -12.5, 5)])
    assert bf16.cache.dir != f32.cache.dir
    assert handle("bfloat16").cache.get("some-sample") is None  # scored again in bfloat16, not reused
    assert handle("float32").cache.get("some-sample") == (-12.5, 5)
    if backend() == "cpu":  # 'auto' computes in float32 there: the same scores, the same cache
        assert handle("auto").cache.dir == f32.cache.dir


def _dataset(lengths, r_ref=None):
    import numpy as np

    from poft_mlx.data.records import Sample
    from poft_mlx.data.render import Encoded
    from poft_mlx.training.batches import EncodedData

    encs = [Encoded(np.arange(n, dtype=np.int32) % 7, np.arange(n) > 0) for n in lengths]
    samples = [Sample([{"role": "assistant", "content": str(i)}], f"f:{i + 1}") for i in range(len(lengths))]
    r = np.zeros(len(lengths), np.float32) if r_ref is None else r_ref
    return EncodedData(samples, encs, r)


class _Model:
    training = True

    def eval(self):
        self.training = False

    def train(self):
        self.training = True


def test_val_batches_takes_a_seeded_sample_not_the_shortest(monkeypatch):
    import numpy as np

    from poft_mlx.models import modeling
    from poft_mlx.training.loop import evaluate
    from poft_mlx.training.objectives import Sft

    lengths = np.array([2 + (7 * i) % 40 for i in range(40)])  # 40 distinct lengths, in no order
    data = _dataset(lengths)
    seen = []

    def fake_logprobs(model, batch, **kw):
        seen.append(batch.index.tolist())
        return -batch.n_tok, batch.n_tok

    monkeypatch.setattr(modeling, "batch_logprobs", fake_logprobs)

    def evaluated(max_batches, seed=0):
        seen.clear()
        evaluate(_Model(), data, Sft(), batch_size=4, max_batches=max_batches, seed=seed)
        return [i for b in seen for i in b]

    picked = evaluated(2)
    assert len(picked) == 8 == len(set(picked))
    shortest = np.argsort(lengths)[:8]
    assert set(picked) != set(shortest.tolist())
    assert lengths[picked].max() > lengths[shortest].max()
    assert evaluated(2) == picked  # the same sample at every evaluation: the losses compare
    assert evaluated(2, seed=1) != picked
    for b in seen:  # still length-sorted batches
        assert list(lengths[b]) == sorted(lengths[b])
    assert sorted(evaluated(-1)) == list(range(40)) == sorted(evaluated(10))


# ChatML that ignores add_generation_prompt (no assistant header after the prompt).
CHATML_NO_GENERATION_PROMPT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    from tiny import make_tokenizer

    folder = tmp_path_factory.mktemp("chatml")
    make_tokenizer(folder, 300, CHATML_NO_GENERATION_PROMPT)
    return load_tokenizer(folder)


@pytest.mark.parametrize("reply", ["is", "a", "t", "assistant"])
def test_a_reply_that_occurs_in_the_assistant_header_is_located_in_the_reply(chatml_tok, reply):
    from poft_mlx.data.records import Sample
    from poft_mlx.data.render import Renderer

    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": reply}]
    r = Renderer(chatml_tok)
    enc = r.encode(Sample(conv))
    assert r.tok.decode(enc.tokens[enc.mask].tolist()) == f"{reply}<|im_end|>{reply}<|im_end|>"
    full, turns = r.turns(conv)
    assert [full[t.content_start:t.content_end] for t in turns] == [reply, reply]
    assert all(full[:t.content_start].endswith("<|im_start|>assistant\n") for t in turns)


def test_a_template_that_is_not_prefix_consistent_is_a_clear_error(chatml_tok):
    from poft_mlx.data.records import Sample
    from poft_mlx.data.render import Renderer, TemplateError

    counted = "{{ messages | length }}" + CHATML_NO_GENERATION_PROMPT  # the count changes the start
    with pytest.raises(TemplateError, match="target m: the chat template does not render conversations "
                                            "prefix-consistently at message 1"):
        Renderer(chatml_tok, chat_template=counted, label="target m").encode(
            Sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "is"},
                    {"role": "user", "content": "and?"}, {"role": "assistant", "content": "a"}]))
    twice = CHATML_NO_GENERATION_PROMPT + "{{ messages[-1]['content'] }}"
    with pytest.raises(TemplateError, match="aligned model a: .* renders the assistant reply of message 1 2 times"):
        Renderer(chatml_tok, chat_template=twice, label="aligned model a").encode(
            Sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "is"}]))


def test_a_conversation_cut_in_a_later_prompt_keeps_its_earlier_replies(chatml_tok, tmp_path):
    from poft_mlx.config import Config
    from poft_mlx.data.records import Sample
    from poft_mlx.data.prepare import prepare
    from poft_mlx.data.render import Renderer
    from tiny import write_jsonl

    long_question = "What is two plus three? " * 20
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": long_question}, {"role": "assistant", "content": "It is 5."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": short}, {"messages": conv}])
    r = Renderer(chatml_tok)
    first = len(r.encode(Sample(conv[:2])).tokens)
    cfg = Config()
    cfg.data.max_seq_length = first + 10  # the cut falls inside the long second question
    prep = prepare(str(path), r, cfg)
    assert len(prep.samples) == 2
    kept, enc = prep.samples[1], prep.encodings[1]
    assert kept.messages == conv[:2] and not kept.meta.get("truncated")
    # The kept reply is whole: closed by its end-of-turn token.
    assert r.tok.decode(enc.tokens[enc.mask].tolist()) == "Hello there!<|im_end|>"
    assert prep.report["shortened"] == 1 and prep.report["shortened_records"] == [f"{path}:2"]
    assert prep.report["dropped"] == 0 and prep.report["ok"] == 1
    # With span 'last' the earlier replies are not supervised: nothing to keep.
    r_last = Renderer(chatml_tok, span="last")
    prep = prepare(str(path), r_last, cfg)
    assert len(prep.samples) == 1 and prep.report["dropped_records"] == [f"{path}:2"]


def test_each_epoch_draws_new_length_bucketed_groups():
    import numpy as np

    from poft_mlx.training.batches import epoch_groups, length_buckets

    lengths = np.random.default_rng(0).integers(5, 400, 200)
    sorted_groups = np.argsort(lengths).reshape(25, 8)

    def padded_tokens(groups):
        return sum(len(g) * (-(-lengths[g].max() // 16) * 16) for g in groups)
    a, again, b = (epoch_groups(lengths, 8, seed=3, epoch=e) for e in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, again))  # a function of (seed, epoch)
    assert {frozenset(g.tolist()) for g in a} != {frozenset(g.tolist()) for g in b}
    for groups in (a, b):
        assert sorted(np.concatenate(groups).tolist()) == list(range(200))
        assert [len(g) for g in groups] == [8] * 25
        # Still length-bucketed: consecutive runs of the samples in bucket order, padded
        # to within a few percent of the exact length sort.
        assert np.all(np.diff(length_buckets(lengths[np.concatenate(groups)])) >= 0)
        assert padded_tokens(groups) <= 1.1 * padded_tokens(sorted_groups)
    assert {frozenset(g.tolist()) for g in epoch_groups(lengths, 8, seed=4, epoch=0)} != {frozenset(g.tolist()) for g in a}


def test_training_epochs_do_not_repeat_the_same_groups(tmp_path, tiny_models):
    from poft_mlx.config import load_config
    from poft_mlx.training.loop import Callback
    from poft_mlx.training.run import run_train
    from tiny import write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_models, aligned=[], objective="sft", adapter={"rank": 2},
                            train={"epochs": 2, "batch_size": 4, "steps_per_eval": 1000, "steps_per_save": 1000})
    seen = []

    class Batches(Callback):
        def on_batch(self, loop, batch):
            seen.append(frozenset(int(i) for i in batch.index))

    run_train(load_config([cfg], [f"run_dir={tmp_path / 'run'}", "data.valid=null"]), callbacks=[Batches()])
    assert len(seen) == 12  # 24 samples, groups of 4, two epochs
    first, second = seen[:6], seen[6:]
    assert set().union(*first) == set().union(*second) == set(range(24))
    assert set(first) != set(second)


@pytest.mark.parametrize("n, batch_size, accum", [(9, 4, 1), (9, 2, 2), (13, 2, 3), (8, 4, 1)])
def test_an_epoch_has_as_many_steps_on_two_ranks_as_on_one(n, batch_size, accum):
    import numpy as np

    from poft_mlx.config import TrainConfig
    from poft_mlx.training.batches import epoch_groups, shares
    from poft_mlx.training.plan import plan

    lengths = np.arange(n) * 3 + 10
    args = TrainConfig(epochs=2, batch_size=batch_size, grad_accumulation_steps=accum)
    steps = {}
    for world in (1, 2):
        taken = []  # every row each rank computes, over the epoch
        groups = epoch_groups(lengths, batch_size * accum, seed=0, epoch=0)
        for g in groups:
            per_rank = [np.concatenate(shares(g, accum, r, world)) for r in range(world)]
            assert sorted(np.concatenate(per_rank).tolist()) == sorted(g.tolist())  # each row once
            taken += np.concatenate(per_rank).tolist()
        assert sorted(taken) == list(range(n))  # the last, partial group is trained on too
        steps[world] = (len(groups), plan(args, n).total_steps)
    assert steps[1] == steps[2] == (plan(args, n).steps_per_epoch, 2 * -(-n // (batch_size * accum)))


def test_a_last_group_smaller_than_the_accumulation_is_a_step_with_the_same_update(tmp_path, tiny_models):
    """The single-process face of the world-size bug: with 21 samples and groups of 4, the
    last group has one sample, fewer than accumulation 2; it used to be dropped (5 steps
    against 6 without accumulation). A micro-batch without rows adds nothing, as an empty
    share of a rank does."""
    import json

    import mlx.core as mx
    import numpy as np
    from click.testing import CliRunner

    from poft_mlx.cli.main import main
    from tiny import gsm_like, matmul_tol, write_jsonl, write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_models, aligned=[], objective="sft", adapter={"rank": 2},
                            train={"epochs": 1, "optimizer": "sgd", "learning_rate": 0.05, "steps_per_report": 1,
                                   "lr_schedule": "constant"})
    data = write_jsonl(tmp_path / "train21.jsonl", gsm_like(21))
    runs = {"acc": ["train.batch_size=2", "train.grad_accumulation_steps=2"], "big": ["train.batch_size=4"]}
    for name, extra in runs.items():
        sets = [f"run_dir={tmp_path / name}", "data.valid=null", f"data.train={data}", *extra]
        r = CliRunner().invoke(main, ["train", "-c", str(cfg), *[x for s in sets for x in ("--set", s)]],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
    steps = {n: [json.loads(x)["step"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
             for n in runs}
    assert steps["acc"] == steps["big"] == [1, 2, 3, 4, 5, 6]
    w_acc = mx.load(str(tmp_path / "acc" / "adapters" / "adapters.safetensors"))
    w_big = mx.load(str(tmp_path / "big" / "adapters" / "adapters.safetensors"))
    for k in w_big:  # float sums in another order over 6 steps; a missing step is far off
        np.testing.assert_allclose(np.array(w_acc[k]), np.array(w_big[k]), rtol=matmul_tol(1e-3), atol=matmul_tol(1e-5))


@pytest.mark.distributed
def test_two_ranks_take_the_last_one_sample_group_like_one_process(tmp_path, tiny_models):
    """21 samples in groups of 4: the last group has one sample, so rank 1's share of it is
    empty; both ranks still take that step (6 steps, as one process) and the update agrees."""
    import json

    import mlx.core as mx
    import numpy as np
    from click.testing import CliRunner

    from poft_mlx.cli.main import main
    from test_distributed import BIN, LOSS_RTOL, finish, start_ranks
    from tiny import gsm_like, write_jsonl, write_tiny_config

    cfg = write_tiny_config(tmp_path, tiny_models, aligned=[], objective="sft", adapter={"rank": 4, "alpha": 8},
                            train={"epochs": 1, "batch_size": 4, "optimizer": "sgd", "learning_rate": 0.1,
                                   "steps_per_report": 1, "steps_per_eval": 1000, "lr_schedule": "constant"})
    data = write_jsonl(tmp_path / "train21.jsonl", gsm_like(21))
    sets = ["--set", "data.valid=null", "--set", f"data.train={data}"]
    r = CliRunner().invoke(main, ["train", "-c", str(cfg), "--set", f"run_dir={tmp_path / 'one'}", *sets],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = finish(start_ranks(tmp_path, [BIN / "poft-mlx", "train", "-c", cfg, "--set", f"run_dir={tmp_path / 'two'}",
                                        *sets]))
    for rank, (rc, o, e) in enumerate(out):
        assert rc == 0, f"rank {rank}:\n{o}\n{e}"
    one, two = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                for n in ("one", "two"))
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
    w1 = mx.load(str(tmp_path / "one" / "adapters" / "adapters.safetensors"))
    w2 = mx.load(str(tmp_path / "two" / "adapters" / "adapters.safetensors"))
    # Float noise from the per-rank batch shapes: up to 1.9e-4 measured with OpenBLAS's Haswell
    # sgemm kernel (OPENBLAS_CORETYPE=Haswell; SkylakeX agrees to ~1e-5), against 0.24 between a
    # 5-step and a 6-step run of this config: 2e-3 is ~10x the noise and ~100x below a step.
    for k in w1:
        np.testing.assert_allclose(np.array(w2[k]), np.array(w1[k]), atol=2e-3)
