"""Every architecture of the installed mlx-lm: poft-mlx's log-likelihoods are the model's own.

For each module of mlx_lm/models (enumerated, so an mlx-lm upgrade's new architecture is
picked up), a tiny random float32 instance is built from small ModelArgs: a generic filler
(`_fill`: small sizes by field name, a guess by type for fields without a default) plus
OVERRIDES where an architecture needs consistent extra fields; tied and untied where its
ModelArgs has tie_word_embeddings. Each instance's per-sample log-likelihoods from
modeling.batch_logprobs must equal log_softmax(model(x)) of every row run alone, unpadded,
summed over its supervised positions (rows of different lengths padded into one batch): in
evaluation and in training mode, in one chunk of the output layer and in several; and in
training mode with a frozen output layer (its gradient formed in the forward pass), the
gradients must equal those of the model's own forward.

Every module is accounted for: checked, a helper (no Model or no ModelArgs), or listed in
NOT_INSTANTIABLE / NOT_APPLICABLE with the reason. A module that is none of these fails
test_every_module_is_accounted_for; a listed one that builds and runs now fails
test_not_instantiable_still_is. Departures from the full check name mlx-lm's reason:
PADDED_REFERENCE (a model whose logits depend on right padding), NO_GRADIENT (a forward
autodiff cannot go through), ONE_WAY (a model that supports tied or untied only).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import re
import typing

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import poft_mlx  # noqa: F401
from poft_mlx.models import modeling
from tiny import Enc, matmul_tol

VOCAB = 128
TOKENS = 96  # token ids drawn below this: ids above it stay free for phi3small's masked ids
MAX_PARAMS = 3_000_000  # refuse a filler result that would build a full-size model

# Field sizes by name, applied whether or not the field has a default (defaults are full size).
SIZES = dict(
    hidden_size=64, d_model=64, n_embd=64, dim=64, model_dim=64, hidden_dim=64, block_dim=64,
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2, num_transformer_layers=2,
    intermediate_size=128, ffn_hidden_size=128, n_inner=128, mlp_hidden_size=128, ff_intermediate_size=128,
    intermediate_size_mlp=128, block_ff_dim=128, block_multiple_of=16,
    moe_intermediate_size=32, expert_ffn_hidden_size=32, shared_expert_intermediate_size=32,
    shared_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4,
    num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2, n_shared_head=2,
    head_dim=16, kv_channels=16, global_head_dim=16, rotary_dim=8,
    vocab_size=VOCAB, embedding_size=VOCAB, num_vocab=VOCAB, vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16,
    max_position_embeddings=256, n_positions=256, n_ctx=256, model_max_length=256,
    num_experts=4, n_routed_experts=4, num_local_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, moe_topk=2, moe_top_k=2, num_experts_per_token=2, top_k_experts=2,
    n_shared_experts=1, num_shared_experts=1, num_shared_expert=1,
    n_group=1, topk_group=1, num_expert_group=1,
    first_k_dense_replace=1, num_dense_layers=1, moe_layer_freq=1, decoder_sparse_step=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    sliding_window=8, sliding_window_size=8, attention_window_size=8, sliding_window_pattern=2,
    full_attention_interval=2,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, state_size=16, n_groups=1,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, conv_kernel=4,
    index_head_dim=16, index_n_heads=2, index_topk=8, num_kv_reuse_layers=1, num_kv_shared_layers=0,
    # Output-layer factors away from 1 (and caps that bite on small logits), so that a path
    # that leaves them out shows.
    final_logit_softcapping=2.0, logits_soft_cap=2.0, lm_head_multiplier=0.5, output_multiplier=1.5,
    logit_scale=0.25, mup_width_multiplier=3.0, logits_scaling=4.0, dim_model_base=16, embedding_multiplier=2.0,
)
# Values for fields without a default (or None where the model needs one), by name.
NAMED = dict(
    rope_theta=10000.0, scale_emb=2.0, scale_depth=1.4, residual_multiplier=0.5, attention_multiplier=0.25,
    layer_types=["sliding_attention", "full_attention"], mlp_only_layers=[],
    time_step_limit=(0.0, float("inf")), time_step_rank="auto",
)

_LINEAR_ATTN = {"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2, "head_dim": 16, "short_conv_kernel_size": 4}
_MLA = dict(mla_scale_q_lora=True, mla_scale_kv_lora=True, zero_expert_type="identity", zero_expert_num=1)
_LLAMA4_ROPE = {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
                "original_max_position_embeddings": 256}

# Per-architecture fields on top of the filler ("text_config": the nested text model's).
OVERRIDES: dict[str, dict] = {
    "dbrx": dict(ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
                 attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0}),
    "deepseek_v2": dict(rope_scaling={"factor": 1.0}),
    "exaone_moe": dict(is_moe_layer=[False, True]),
    "gemma3n": dict(text_config=dict(activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2, altup_active_idx=0,
                                     laurel_rank=8, altup_coef_clip=120.0)),
    "glm_moe_dsa": dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, topk_method="noaux_tc"),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                             mamba_proj_bias=False, mamba_n_groups=1, mamba_conv_bias=True),
    "hunyuan": dict(rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"}, cla_share_factor=2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "kimi_k3": dict(text_config=dict(linear_attn_config=_LINEAR_ATTN)),
    "kimi_linear": dict(linear_attn_config=_LINEAR_ATTN),
    # Every fourth layer is a global-attention one, which the forward looks up.
    "llama4": dict(text_config=dict(num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=16,
                                    num_hidden_layers=4)),
    "llama4_text": dict(no_rope_layers=[1, 0]),
    "longcat_flash": _MLA,
    "longcat_flash_ngram": _MLA,
    "mellum": dict(rope_parameters={"sliding_attention": {"rope_theta": 10000.0},
                                    "full_attention": {"rope_theta": 10000.0}}),
    "mimo_v2_flash": dict(hybrid_layer_pattern=[1, 0], moe_layer_freq=[0, 1], topk_method="noaux_tc",
                          swa_num_attention_heads=4,
                          swa_num_key_value_heads=2, swa_head_dim=16, swa_v_head_dim=16, partial_rotary_factor=1),
    "minicpm3": dict(rope_scaling={"original_max_position_embeddings": 256}),
    "ministral3": dict(rope_parameters=_LLAMA4_ROPE),
    "mistral4": dict(rope_parameters=_LLAMA4_ROPE),
    "muse_spark": dict(text_config=dict(num_shared_experts=0, rope_parameters={"rope_theta": 10000.0},
                                        layer_rope_theta=[10000.0, 0.0], moe_hidden_size=32)),
    "nemotron-nas": dict(block_configs=[{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}}] * 2),
    "nemotron_h": dict(hybrid_override_pattern=["M", "*"], num_hidden_layers=2),
    "openelm": dict(num_query_heads=[4, 4], num_kv_heads=[2, 2], ffn_multipliers=[2.0, 2.0], ffn_dim_divisor=16),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "spark2_5": dict(rope_parameters={"sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
                                      "full_attention": {"rope_theta": 10000.0, "rope_type": "default"}}),
}
# Where a wrapper's text_config dataclass is not named in its annotation or source.
TEXT_ARGS = {"qwen3_5_moe": ("qwen3_5", "TextModelArgs")}


# Hooks run on a built model (before the check): fix what random weights or tiny sizes break.
def _phi3small(model):
    model._dummy_tokenizer_ids = mx.arange(TOKENS, VOCAB)  # the real ids are past a tiny vocabulary


def _recurrent_gemma(model):
    # mlx-lm's Model.__init__ skips nn.Module.__init__: without this, freeze() and
    # trainable_parameters() fail, so the model cannot be fine-tuned as mlx-lm ships it.
    model._no_grad = set()


AFTER_BUILD = {"phi3small": _phi3small, "recurrent_gemma": _recurrent_gemma}

# Modules with a Model and a ModelArgs that cannot be built and run here, and why.
NOT_INSTANTIABLE: dict[str, str] = {
    "prism_hadamard_qwen35": "a 2-bit Hadamard-rotated quantized pack: its layers exist only as the packed "
                             "uint32 weights and module manifest of a checkpoint (no float weights to draw)",
}
if importlib.util.find_spec("hf_olmo") is None:
    NOT_INSTANTIABLE["olmo"] = "needs the ai2-olmo package (hf_olmo): the module exits the interpreter without it"
if not mx.metal.is_available():
    NOT_INSTANTIABLE["bitnet"] = "BitLinear's forward is a Metal kernel (mx.fast.metal_kernel), no CPU or CUDA path"
    NOT_INSTANTIABLE["muse_spark"] = "its attention's qk-norm + RoPE is a Metal kernel, no CPU or CUDA path"

# Modules with a Model that are not causal language models poft-mlx can score (none so far).
NOT_APPLICABLE: dict[str, str] = {}

# Architectures checked against the forward of the padded batch instead of each row alone.
PADDED_REFERENCE = {
    "phi3small": "mlx-lm's block-sparse attention layers add the boolean causal mask to the scores "
                 "(+1 where allowed) instead of masking, so later tokens, padding included, change "
                 "earlier positions' logits: no batch layout gives each row's own values",
}
# Architectures whose own forward cannot be differentiated: the gradient check expects that to fail.
NO_GRADIENT = {
    "deepseek_v41": "mlx-lm's sparse-attention indexer gathers keys at argpartition indices without "
                    "stop_gradient: autodiff through the forward fails (VJP with respect to indices)",
}
# Architectures whose ModelArgs has tie_word_embeddings but whose Model supports one way only.
ONE_WAY = {
    "baichuan_m1": (False, "Model.__call__ always calls lm_head, which it creates only untied"),
}


def modules() -> list[str]:
    return sorted(i.name for i in pkgutil.iter_modules(mlx_lm.models.__path__))


def _import(name):
    # Some modules exit the interpreter when an optional dependency is missing (olmo).
    try:
        return importlib.import_module(f"mlx_lm.models.{name}"), None
    except BaseException as e:  # noqa: BLE001
        return None, f"import fails: {type(e).__name__}: {e}"


def is_helper(name) -> bool:
    mod, _ = _import(name)
    return mod is not None and not (hasattr(mod, "Model") and hasattr(mod, "ModelArgs"))


def _hints(cls):
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (annotations naming what the module does not import)
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _allows(tp, value) -> bool:
    """Whether `value` fits annotation `tp` well enough (ints where ints go, not into str fields)."""
    options = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    kinds = {typing.get_origin(o) or o for o in options}
    if isinstance(value, bool):
        return bool in kinds or typing.Any in kinds
    if isinstance(value, int):
        return bool(kinds & {int, float, typing.Any}) or not all(isinstance(k, type) for k in kinds)
    return True


def _guess(name, tp, model_type):
    if name == "model_type":
        return model_type
    if "dropout" in name:
        return 0.0
    if "eps" in name or "epsilon" in name:
        return 1e-5
    if "theta" in name or name == "rotary_emb_base":
        return 10000.0
    origin = typing.get_origin(tp)
    if origin is typing.Union and type(None) in typing.get_args(tp):
        return None
    if tp is bool:
        return False
    if tp is float:
        return 0.5
    if tp is int:
        return 2
    if tp is str:
        return ""
    if tp is dict or origin is dict:
        return {}
    if tp is list or origin is list:
        return []
    return None


def _text_args(mod, cls, tp):
    """The dataclass a wrapper's text_config dict becomes: from its annotation, a Text* dataclass
    of the module, or the `X.from_dict(args.text_config)` its source calls."""
    name = mod.__name__.rsplit(".", 1)[-1]
    if name in TEXT_ARGS:
        other, attr = TEXT_ARGS[name]
        return getattr(importlib.import_module(f"mlx_lm.models.{other}"), attr)
    for option in typing.get_args(tp):
        if dataclasses.is_dataclass(option):
            return option
    text = [v for k, v in vars(mod).items() if dataclasses.is_dataclass(v) and v is not cls and "Text" in k
            and getattr(v, "__module__", None) == mod.__name__]
    if len(text) == 1:
        return text[0]
    called = re.search(r"([\w.]+)\.from_dict\(\s*args\.text_config", inspect.getsource(mod))
    if called:
        obj = mod
        for part in called.group(1).split("."):
            obj = getattr(obj, part)
        return obj
    return None


def _fill(mod, cls, model_type, overrides):
    cfg = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if missing else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if f.name in SIZES and _allows(tp, SIZES[f.name]):
            cfg[f.name] = SIZES[f.name]
        elif "dropout" in f.name:
            cfg[f.name] = 0.0
        elif f.name in NAMED and (missing or default is None):
            cfg[f.name] = NAMED[f.name]
        elif f.name == "text_config":
            inner = _text_args(mod, cls, tp)
            sub = overrides.get("text_config", {})
            cfg[f.name] = _fill(mod, inner, model_type, {}) | sub if inner is not None else dict(sub)
        elif missing:
            cfg[f.name] = _guess(f.name, tp, model_type)
    cfg.update({k: v for k, v in overrides.items() if k != "text_config"})
    return cfg


def build(name, tied=None):
    """A tiny random float32 instance of architecture `name`, in evaluation mode.

    tied: set tie_word_embeddings (None: the filler's value)."""
    mod, err = _import(name)
    if err:
        raise RuntimeError(err)
    cfg = _fill(mod, mod.ModelArgs, name, OVERRIDES.get(name, {}))
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    args = mod.ModelArgs.from_dict(cfg) if hasattr(mod.ModelArgs, "from_dict") else mod.ModelArgs(**cfg)
    mx.random.seed(0)
    model = mod.Model(args)  # parameters are lazy until evaluated: count them first
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    if n > MAX_PARAMS:
        raise RuntimeError(f"{n} parameters: the filler left a full-size field")
    model.set_dtype(mx.float32)
    # Random, not initial, values everywhere (some layers start at zeros or ones), small
    # enough for the logits to stay in range.
    model.update(tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape).astype(p.dtype)
                                   if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    if name in AFTER_BUILD:
        AFTER_BUILD[name](model)
    mx.eval(model.parameters())
    model.eval()
    return model


def encodings(seed=0):
    # 56 + 45 + 36 supervised positions: three 64-position chunks under a small budget.
    rng = np.random.default_rng(seed)
    return [Enc(rng.integers(0, TOKENS, n), n // 5) for n in (70, 57, 45)]


def reference(model, encs):
    """Each row alone through model(x): log_softmax summed over its supervised predictions, [rows]."""
    out = []
    for e in encs:
        logits = model(mx.array(e.tokens[None]))[0].astype(mx.float32)
        t = np.nonzero(e.mask[1:])[0]
        lp = logits[mx.array(t)] - mx.logsumexp(logits[mx.array(t)], axis=-1, keepdims=True)
        out.append(mx.take_along_axis(lp, mx.array(e.tokens[t + 1])[:, None], axis=-1).sum())
    return mx.stack(out)


def padded_reference(model, batch):
    """model(x) of the padded batch itself, gathered as batch_logprobs gathers (PADDED_REFERENCE)."""
    logits = model(batch.tokens[:, :-1]).astype(mx.float32)
    flat = logits.reshape(-1, logits.shape[-1])[batch.pos]
    lp = (mx.take_along_axis(flat, batch.targets[:, None], axis=-1)[:, 0] - mx.logsumexp(flat, axis=-1)) * batch.valid
    return ((batch.row[None, :] == mx.arange(batch.size)[:, None]) * batch.valid[None, :]) @ lp


SMALL_BUDGET = 64 * VOCAB * 4  # 64 positions per chunk


def _output_module(model):
    parts = modeling.split_head(model)
    if parts is None:  # the forward path: the output layer is whatever the model calls
        return None
    layer = parts[1]
    return getattr(layer, "__self__", layer)  # the embedding, for a tied head's bound as_linear


def check(model, padded=False, gradient=True):
    """Largest relative differences from the reference: log-likelihoods over modes and chunkings, then
    gradients (training mode, frozen output layer, several chunks; None where not `gradient`)."""
    encs = encodings()
    batch = modeling.make_batch(encs, range(len(encs)))
    ref_fn = (lambda m: padded_reference(m, batch)) if padded else (lambda m: reference(m, encs))  # noqa: E731
    tol = matmul_tol(1e-5)
    worst = 0.0
    for training in (False, True):
        model.train(training)
        ref = np.asarray(ref_fn(model), np.float64)
        assert np.all(np.isfinite(ref)), ref
        for budget in (modeling.LOGITS_BUDGET_BYTES, SMALL_BUDGET):
            got = np.asarray(modeling.batch_logprobs(model, batch, budget=budget)[0], np.float64)
            diff = float(np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref))))
            assert diff <= tol, (training, budget, got, ref)
            worst = max(worst, diff)
    # The output layer frozen, as LoRA leaves it: its gradient is then formed in the forward pass.
    head = _output_module(model)
    if head is not None:
        head.freeze()
    for _, m in model.named_modules():  # integer tables (deepseek_v41's hash routing) take no gradient
        ints = [k for k, v in tree_flatten(m.parameters()) if "." not in k and not mx.issubdtype(v.dtype, mx.floating)]
        if ints:
            m.freeze(keys=ints, recurse=False)
    w = mx.array([1.0, -0.5, 0.25])
    ours = nn.value_and_grad(model, lambda m: (modeling.batch_logprobs(m, batch, budget=SMALL_BUDGET)[0] * w).sum())
    theirs = nn.value_and_grad(model, lambda m: (ref_fn(m) * w).sum())
    if not gradient:
        with pytest.raises(ValueError):
            mx.eval(theirs(model))
        model.unfreeze()
        model.eval()
        return worst, None
    (v_ours, g_ours), (v_theirs, g_theirs) = ours(model), theirs(model)
    assert abs(v_ours.item() - v_theirs.item()) <= tol * max(1.0, abs(v_theirs.item()))
    g_ours, g_theirs = dict(tree_flatten(g_ours)), dict(tree_flatten(g_theirs))
    assert g_ours.keys() == g_theirs.keys() and g_ours
    scale = max(float(mx.abs(g).max()) for g in g_theirs.values())
    gdiff = max(float(mx.abs(g_ours[k] - g_theirs[k]).max()) for k in g_ours) / max(scale, 1e-6)
    assert gdiff <= matmul_tol(1e-4), gdiff
    model.unfreeze()
    model.eval()
    return worst, gdiff


def _classify():
    checked, helpers, unknown = [], [], []
    for name in modules():
        if name in NOT_INSTANTIABLE or name in NOT_APPLICABLE:
            continue
        mod, err = _import(name)
        if err:
            unknown.append(name)
        elif not (hasattr(mod, "Model") and hasattr(mod, "ModelArgs")):
            helpers.append(name)
        else:
            checked.append(name)
    return checked, helpers, unknown


def _cases(names):
    """(name, tied) for each architecture: both ways where its ModelArgs has tie_word_embeddings,
    since the output layer is then the lm_head or the input embeddings."""
    out = []
    for name in names:
        fields = {f.name for f in dataclasses.fields(_import(name)[0].ModelArgs)}
        if name in ONE_WAY:
            out.append((name, ONE_WAY[name][0]))
        elif "tie_word_embeddings" in fields:
            out += [(name, True), (name, False)]
        else:
            out.append((name, None))
    return out


CHECKED, HELPERS, UNKNOWN = _classify()
CASES = _cases(CHECKED)
RESULTS: dict[str, list] = {}


@pytest.mark.parametrize("name,tied", CASES,
                         ids=[n if t is None else f"{n}-{'tied' if t else 'untied'}" for n, t in CASES])
def test_architecture_gives_the_models_own_logprobs(name, tied):
    try:
        model = build(name, tied)
    except Exception as e:  # noqa: BLE001
        RESULTS.setdefault(name, []).append(f"does not build: {type(e).__name__}: {e}")
        pytest.fail(f"{name} does not build ({type(e).__name__}: {e}): add OVERRIDES, or NOT_INSTANTIABLE "
                    "with the reason")
    path = "fast" if modeling.split_head(model) is not None else "forward"
    worst, gdiff = check(model, padded=name in PADDED_REFERENCE, gradient=name not in NO_GRADIENT)
    label = "" if tied is None else ("tied " if tied else "untied ")
    grad = "no gradient" if gdiff is None else f"grad {gdiff:.1e}"
    RESULTS.setdefault(name, []).append(f"{label}{path} path, rel diff {worst:.1e}, {grad}")


def _runs(name):
    model = build(name)
    mx.eval(model(mx.array([[1, 2, 3, 4]])))


@pytest.mark.parametrize("name", sorted(NOT_INSTANTIABLE))
def test_not_instantiable_still_is(name):
    try:
        _runs(name)
    except Exception:  # noqa: BLE001
        return
    pytest.fail(f"{name} builds now: remove it from NOT_INSTANTIABLE so it is checked")


def test_every_module_is_accounted_for():
    names = set(modules())
    assert not UNKNOWN, f"modules that fail to import and are not listed in NOT_INSTANTIABLE: {UNKNOWN}"
    stale = (set(NOT_INSTANTIABLE) | set(NOT_APPLICABLE)) - names
    assert not stale, f"listed but no longer in mlx_lm/models: {sorted(stale)}"
    assert names == set(CHECKED) | set(HELPERS) | set(NOT_INSTANTIABLE) | set(NOT_APPLICABLE)
    rows = [(n, "helper (no Model or no ModelArgs)") for n in HELPERS]
    rows += [(n, "checked: " + "; ".join(RESULTS.get(n, ["not run in this session"]))) for n in CHECKED]
    rows += [(n, f"not instantiable: {r}") for n, r in NOT_INSTANTIABLE.items()]
    rows += [(n, f"not applicable: {r}") for n, r in NOT_APPLICABLE.items()]
    notes = {n: f" [padded reference: {r}]" for n, r in PADDED_REFERENCE.items()}
    notes.update({n: f" [{'tied' if t else 'untied'} only: {r}]" for n, (t, r) in ONE_WAY.items()})
    notes.update({n: f" [no gradient: {r}]" for n, r in NO_GRADIENT.items()})
    rows = [(n, r + notes.get(n, "")) for n, r in rows]
    print(f"\n{len(CHECKED)} checked, {len(NOT_INSTANTIABLE)} not instantiable, {len(NOT_APPLICABLE)} not applicable, "
          f"{len(HELPERS)} helpers")
    for n, r in sorted(rows):
        print(f"  {n:26s} {r}")


# ------------------------------------------------------------------ the output layer's own changes


@pytest.mark.parametrize("name", ["granite", "cohere"])
def test_scaled_logits_are_the_forwards(name):
    """granite divides its logits by logits_scaling, cohere multiplies them by logit_scale: the
    fast path (backbone + chunked output layer) applies the same factor."""
    model = build(name)
    backbone, layer, _ = modeling.split_head(model)  # the fast path, not the forward fallback
    encs = encodings()
    batch = modeling.make_batch(encs, range(len(encs)))
    ref = np.asarray(reference(model, encs), np.float64)
    for budget in (modeling.LOGITS_BUDGET_BYTES, SMALL_BUDGET):
        got = np.asarray(modeling.batch_logprobs(model, batch, budget=budget)[0], np.float64)
        np.testing.assert_allclose(got, ref, rtol=matmul_tol(1e-5))
    # The factor matters here: the output layer's raw logits score the data differently.
    h = backbone(batch.tokens[:, :-1]).reshape(-1, 64)[batch.pos]
    raw = modeling.kernels.token_logprobs(layer, h, batch.targets) * batch.valid
    raw = np.asarray((batch.row[None, :] == mx.arange(batch.size)[:, None]).astype(mx.float32) @ raw)
    assert np.min(np.abs(raw - ref)) > 1.0, (raw, ref)


def test_unknown_output_layer_falls_back_to_the_forward(monkeypatch):
    """Without its _LOGITS entry granite's backbone + lm_head disagree with its forward on the
    probe, so batch_logprobs scores through the forward: still the model's own values."""
    monkeypatch.delitem(modeling._LOGITS, "granite")
    model = build("granite")
    assert modeling._layouts(model) and modeling.split_head(model) is None
    encs = encodings()
    batch = modeling.make_batch(encs, range(len(encs)))
    got = np.asarray(modeling.batch_logprobs(model, batch)[0], np.float64)
    np.testing.assert_allclose(got, np.asarray(reference(model, encs), np.float64), rtol=matmul_tol(1e-5))


def test_probe_runs_once_without_dropout_and_restores_training_flags(monkeypatch):
    """LoRA dropout would make the probe's two passes differ: it runs in evaluation mode, once
    per model, and leaves every module's training flag as it found it."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = build("llama", tied=False)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.9})
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))  # nonzero lora_b
    model.train()
    model.layers[0].eval()  # mixed flags, to be restored exactly
    flags = [m.training for m in model.modules()]
    calls = []
    probe = modeling._probe
    monkeypatch.setattr(modeling, "_probe", lambda *a: calls.append(1) or probe(*a))
    batch = modeling.make_batch(encodings(), range(3))
    for _ in range(2):
        mx.eval(modeling.batch_logprobs(model, batch)[0])
    assert calls == [1]
    assert modeling.split_head(model) is not None  # not fooled by the dropout
    assert [m.training for m in model.modules()] == flags


def test_probe_inside_the_first_training_step_gives_the_forwards_gradients():
    """The probe runs lazily on the first batch_logprobs, here inside nn.value_and_grad: the loss
    and gradients are those of the model's own forward (granite: its logits_scaling included)."""
    encs = encodings()
    batch = modeling.make_batch(encs, range(len(encs)))
    w = mx.array([1.0, -0.5, 0.25])
    model = build("granite", tied=True)
    model.model.embed_tokens.freeze()
    model.train()
    ref_v, ref_g = nn.value_and_grad(model, lambda m: (reference(m, encs) * w).sum())(model)
    fresh = build("granite", tied=True)
    fresh.model.embed_tokens.freeze()
    fresh.train()
    assert getattr(fresh, modeling._PROBED, None) is None
    v, g = nn.value_and_grad(fresh, lambda m: (modeling.batch_logprobs(m, batch, budget=SMALL_BUDGET)[0] * w).sum())(
        fresh)
    assert getattr(fresh, modeling._PROBED) == 0 and fresh.training
    assert v.item() == pytest.approx(ref_v.item(), rel=matmul_tol(1e-5))
    ref_g, g = dict(tree_flatten(ref_g)), dict(tree_flatten(g))
    scale = max(float(mx.abs(x).max()) for x in ref_g.values())
    assert max(float(mx.abs(g[k] - ref_g[k]).max()) for k in ref_g) <= matmul_tol(1e-4) * scale
