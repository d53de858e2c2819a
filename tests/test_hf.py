"""mod_ext.hf: a transformers causal LM converted to Mixture-of-Depths, on tiny random
models of every supported family (llama, mistral, qwen2, qwen3, gemma, gpt2; sdpa and
eager attention).

Oracles (tests/hf_helpers.py, written from docs/MOD_SPEC.md and the hf.py docstrings): a
plain-PyTorch routed decoder layer (top-k / causal routing, gather in position order,
the layer's own sublayers with explicit masks and rotary at the true positions,
``x + r * f`` on the routed rows) and a whole-model oracle built on it; the unconverted
model (capacity 1 is the identity at initialisation); generation without a cache and
each prompt alone (the decode cache must not change greedy results); and training /
checkpointing / compile against the plain eager forward.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import mod_ext  # noqa: E402
import mod_ext.hf as H  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.hf_helpers import (  # noqa: E402
    ATTN,
    D,
    FAMILIES,
    MAX_POS,
    N_LAYERS,
    V,
    calibrate_causal,
    call_layer,
    causal_visible,
    capacity,
    decoder_layers,
    layer_call,
    left_padded,
    mod_layers,
    model_oracle,
    oracle_logits,
    oracle_routed,
    randomize_mod,
    returned_cache,
    routed_layer_oracle,
    sublayer_update,
    tiny_model,
    true_positions,
    window_of,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two
    OpenMP threads make each small op orders of magnitude slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    v = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(v)


def converted(model_type, attn="sdpa", seed=0, router_seed=None, predictor_bias=None, weight_std=1.0, **kw):
    """A tiny converted model; with router_seed, random routers (data-dependent routing)."""
    model = tiny_model(model_type, attn, seed)
    assert H.convert(model, **kw) is model
    if router_seed is not None:
        randomize_mod(model, router_seed, weight_std=weight_std, predictor_bias=predictor_bias)
    return model


def capture_mod(model):
    """Record each MoD block's (input x, MoDBlockOutput) of forward calls: {index: [(x, out)]}."""
    seen = {}
    handles = []
    for i, layer in mod_layers(model):
        def hook(mod, args, kwargs, out, i=i):
            seen.setdefault(i, []).append((args[0].detach(), out))
        handles.append(layer.mod.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def valid_rows(t, mask):
    """The valid positions of (B, T, ...) t, flattened (B * valid, ...)."""
    return t[mask.bool()]


# ======================================================================================
# 1. Conversion: which layers, settings, state dict, errors
# ======================================================================================


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, [1, 3]),
        ({"every": 2}, [1, 3]),
        ({"every": 3}, [2]),
        ({"every": 1}, [0, 1, 2, 3]),
        ({"every": 4}, [3]),
        ({"layers": [0, 2]}, [0, 2]),
        ({"layers": (3, 0)}, [0, 3]),
        ({"layers": [1], "every": 3}, [1]),  # layers wins over every
    ],
)
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_convert_which_layers(model_type, kw, expected):
    model = tiny_model(model_type)
    cls, layer_cls = type(model), [type(l) for l in decoder_layers(model)]
    out = H.convert(model, **kw)
    assert out is model
    assert H.is_converted(model)
    assert H.mod_layer_indices(model) == expected
    assert [i for i, _ in mod_layers(model)] == expected
    for i, layer in enumerate(decoder_layers(model)):
        # the layer keeps its class (a subclass of it, under its name)
        assert isinstance(layer, layer_cls[i]) and type(layer).__name__ == layer_cls[i].__name__
        if i in expected:
            assert isinstance(layer.mod, mod_ext.MoDBlock)
            assert layer.mod.max_seq_len == MAX_POS
        else:
            assert not hasattr(layer, "mod")
            assert type(layer) is layer_cls[i]
    assert isinstance(model, cls) and type(model).__name__ == cls.__name__
    assert model.config.mod_ext["layers"] == expected


def test_convert_default_settings_and_init():
    model = converted("llama")
    assert model.config.mod_ext == {
        "capacity_factor": 0.125,
        "layers": [1, 3],
        "causal_router": "predictor",
        "router_activation": "scaled_sigmoid",
        "aux_loss_weight": 0.1,
        "predictor_hidden": None,
    }
    for _, layer in mod_layers(model):
        mod = layer.mod
        assert mod.capacity_factor == 0.125
        assert mod.router_activation == "scaled_sigmoid" and mod.causal_router == "predictor"
        assert mod.routing == "topk"
        assert mod.predictor is not None
        # scaled_sigmoid starts from a zero router: r = 2 * sigmoid(0) = 1
        assert torch.count_nonzero(mod.router_weight) == 0 and float(mod.router_bias.detach()) == 0.0
        assert mod.router_weight.shape == (D,) and mod.router_bias.shape == (1,)


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_convert_nondefault_settings_recorded(model_type):
    model = converted(model_type, capacity_factor=0.25, layers=[0, 3], causal_router="router",
                      router_activation="identity", aux_loss_weight=0.5)
    assert model.config.mod_ext == {
        "capacity_factor": 0.25,
        "layers": [0, 3],
        "causal_router": "router",
        "router_activation": "identity",
        "aux_loss_weight": 0.5,
        "predictor_hidden": None,
    }
    for _, layer in mod_layers(model):
        assert layer.mod.predictor is None and layer.mod.causal_router == "router"
        assert layer.mod.router_activation == "identity"
        # identity starts from router bias 1: r = z = 1
        assert torch.count_nonzero(layer.mod.router_weight) == 0 and float(layer.mod.router_bias.detach()) == 1.0
    m2 = converted(model_type, predictor_hidden=8)
    assert m2.config.mod_ext["predictor_hidden"] == 8
    assert mod_layers(m2)[0][1].mod.predictor.net[0].out_features == 8
    # the settings reach the saved config dict
    assert model.config.to_dict()["mod_ext"]["layers"] == [0, 3]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_state_dict_keys(model_type):
    model = tiny_model(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H.convert(model, every=2)
    after = model.state_dict()
    assert set(before) <= set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    prefix = "transformer.h" if model_type == "gpt2" else "model.layers"
    mod_names = [n for n, _ in mod_ext.MoDBlock(None, D, causal_router="predictor").state_dict().items()]
    assert "router_weight" in mod_names and "router_bias" in mod_names
    expected_new = {f"{prefix}.{i}.mod.{n}" for i in (1, 3) for n in mod_names}
    assert set(after) - set(before) == expected_new
    # the MoD parameters are parameters of the model (trained, moved, saved with it)
    params = dict(model.named_parameters())
    assert f"{prefix}.1.mod.router_weight" in params and f"{prefix}.3.mod.router_bias" in params


def test_convert_twice_raises():
    model = converted("llama")
    with pytest.raises(ValueError, match="already converted"):
        H.convert(model)
    with pytest.raises(ValueError, match="already converted"):
        H.convert(model, layers=[0])
    assert H.mod_layer_indices(model) == [1, 3]


def _unsupported(model_type):
    torch.manual_seed(0)
    if model_type == "opt":
        cfg = AutoConfig.for_model("opt", vocab_size=V, hidden_size=D, num_hidden_layers=2, ffn_dim=2 * D,
                                   num_attention_heads=4, max_position_embeddings=MAX_POS, word_embed_proj_dim=D)
    elif model_type == "gpt_neox":
        cfg = AutoConfig.for_model("gpt_neox", vocab_size=V, hidden_size=D, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=2 * D, max_position_embeddings=MAX_POS)
    else:
        raise ValueError(model_type)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type", ["opt", "gpt_neox"])
def test_unsupported_architecture_raises(model_type):
    model = _unsupported(model_type)
    with pytest.raises(ValueError) as ei:
        H.convert(model)
    msg = str(ei.value)
    assert model_type in msg
    for mt in FAMILIES:
        assert mt in msg, f"supported type {mt} not listed in: {msg}"
    assert set(H.SUPPORTED_MODEL_TYPES) == set(FAMILIES)
    assert not H.is_converted(model)
    assert not any(hasattr(m, "mod") for m in model.modules())


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"capacity_factor": 1.5}, "capacity_factor"),
        ({"capacity_factor": -0.25}, "capacity_factor"),
        ({"capacity_factor": float("nan")}, "capacity_factor"),
        ({"capacity_factor": True}, "capacity_factor"),
        ({"every": 0}, "every"),
        ({"every": -2}, "every"),
        ({"every": 1.5}, "every"),
        ({"every": True}, "every"),
        ({"every": 5}, "every"),  # no layer would become MoD
        ({"layers": [4]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"layers": [1, 3, 1]}, "layers"),
        ({"layers": [1.5]}, "layers"),  # not an index (the project's integer rule refuses it)
        ({"layers": [True]}, "layers"),
        ({"layers": 3}, "layers"),
        ({"layers": []}, "layers"),
        ({"router_activation": "sigmoid"}, "router_activation"),
        ({"router_activation": "relu"}, "router_activation"),
        ({"causal_router": "mlp"}, "causal_router"),
        ({"causal_router": None}, "causal_router"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"aux_loss_weight": float("inf")}, "aux_loss_weight"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_bad_arguments_raise_naming_the_argument(kw, name):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=name):
        H.convert(model, **kw)
    assert not H.is_converted(model), "a failed convert must leave the model as it was"
    assert not any(hasattr(l, "mod") for l in decoder_layers(model))


def _with_fresh_classes(model):
    """The model with its class and its decoder layers' class replaced by trivial
    subclasses created here, so mod_ext.hf has never seen them (convert builds and caches
    one converted class per class: fresh classes make the test independent of what
    other tests converted before)."""
    model.__class__ = type(type(model).__name__, (type(model),), {})
    layer_cls = type(decoder_layers(model)[0])
    fresh = type(layer_cls.__name__, (layer_cls,), {})
    for layer in decoder_layers(model):
        layer.__class__ = fresh
    return model


@pytest.mark.parametrize("first, second", [("gpt2", "llama"), ("llama", "gpt2"), ("qwen3", "gpt2")])
def test_signatures_survive_converting_another_family(first, second):
    """A converted model and its MoD layers keep their own class's forward signature
    (transformers reads it: generate validates model kwargs and Trainer drops dataset
    columns by it), also after a model of another family was converted."""
    import inspect

    a = _with_fresh_classes(tiny_model(first))
    a_model_sig = inspect.signature(type(a).forward)
    a_layer_sig = inspect.signature(type(decoder_layers(a)[1]).forward)
    H.convert(a)
    assert inspect.signature(type(a).forward) == a_model_sig
    H.convert(_with_fresh_classes(tiny_model(second)))
    assert inspect.signature(type(a).forward) == a_model_sig, f"{first} now reports {second}'s forward signature"
    assert list(inspect.signature(a.forward).parameters) == list(a_model_sig.parameters)[1:]
    assert inspect.signature(type(decoder_layers(a)[1]).forward) == a_layer_sig


def test_gpt2_generate_kwargs_after_converting_llama():
    """The consequence of a borrowed signature: generate validates its model kwargs
    against ``inspect.signature(model.forward)``; GPT-2 takes token_type_ids."""
    g = H.convert(_with_fresh_classes(tiny_model("gpt2")))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = g.generate(ids, token_type_ids=torch.zeros_like(ids), max_new_tokens=2)
    H.convert(_with_fresh_classes(tiny_model("llama")))
    with torch.no_grad():
        after = g.generate(ids, token_type_ids=torch.zeros_like(ids), max_new_tokens=2)
    assert torch.equal(after, before)


def test_api_errors_on_unconverted_and_bad_modes():
    model = tiny_model("llama")
    for fn in (H.aux_loss, H.router_parameters, H.mod_layer_indices):
        with pytest.raises(ValueError, match="not a model converted"):
            fn(model)
    with pytest.raises(ValueError, match="not a model converted"):
        H.MoDCache(model)
    H.convert(model)
    with pytest.raises(ValueError, match="routing"):
        H.set_routing(model, "threshold")
    with pytest.raises(ValueError, match="decode_capacity"):
        H.MoDCache(model, decode_capacity=0)


# ======================================================================================
# 2. Oracle: one routed decoder layer, and whole models
# ======================================================================================

LAYER_CASES = ["padded_T7", "T1", "noncontiguous"]


def _layer_inputs(model, case):
    """(ids, mask, position_ids) of a case: left padding with true positions (T = 7; one
    row with fewer valid tokens than the capacity), T = 1, or T = 7 unpadded."""
    if case == "padded_T7":
        ids, mask, _ = left_padded([7, 5, 2], seed=3)
        return ids, mask, true_positions(mask)
    if case == "T1":
        ids, mask, _ = left_padded([1, 1], seed=4)
        return ids, mask, None
    ids, mask, _ = left_padded([7, 7], seed=5)
    return ids, None, None


def _noncontiguous(x):
    """x's values as a non-contiguous view (every other element of a wider last dim)."""
    storage = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
    storage[..., 1::2] = x
    leaf = storage.requires_grad_(True)
    view = leaf[..., 1::2]
    assert not view.is_contiguous()
    return leaf, view


def _grad_check(model, index, x_values, call, routing="topk", tol_dtype=None, valid=None):
    """Forward and gradients (x, router weight/bias, the layer's parameters) of converted
    layer ``index`` against the oracle."""
    layer = decoder_layers(model)[index]
    B, T, _ = x_values.shape
    pos = call["position_ids"].expand(B, T)
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    params = [p for n, p in layer.named_parameters() if "predictor" not in n]
    names = [n for n, p in layer.named_parameters() if "predictor" not in n]
    g = torch.randn(x_values.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(
        x_values.dtype)

    xa = x_values.clone().requires_grad_(True)
    got = call_layer(layer, xa, call)
    ga = torch.autograd.grad((got * g).sum(), [xa] + params, allow_unused=True)

    xb = x_values.clone().requires_grad_(True)
    want = routed_layer_oracle(model, index, xb, valid, pos, routing)
    gb = torch.autograd.grad((want * g).sum(), [xb] + params, allow_unused=True)

    assert_close(got, want, f"layer {index} output", dtype=tol_dtype)
    for n, a, b in zip(["x"] + names, ga, gb):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, f"layer {index}: grad of {n} should be zero"
            continue
        assert a is not None, f"layer {index}: no gradient for {n}"
        assert_close(a, b, f"layer {index}: grad of {n}", dtype=tol_dtype)
    return got, want


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_matches_oracle(model_type, attn, case):
    model = converted(model_type, attn, capacity_factor=0.5, router_seed=11, weight_std=0.3)
    with torch.no_grad():
        for _, layer in mod_layers(model):
            layer.mod.router_bias.fill_(0.2)
    ids, mask, pid = _layer_inputs(model, case)
    valid = None if mask is None else mask.bool()
    for i, layer in mod_layers(model):
        call = layer_call(model, i, ids, mask, pid)
        x = call["hidden_states"]
        if case == "noncontiguous":
            leaf, view = _noncontiguous(x)
            out = call_layer(layer, view, call)
            want = routed_layer_oracle(model, i, x, torch.ones(x.shape[:2], dtype=torch.bool),
                                       call["position_ids"].expand(x.shape[:2]))
            assert_close(out, want, f"layer {i} on a non-contiguous input")
            (gx,) = torch.autograd.grad(out.sum(), [leaf])
            xr = x.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad(routed_layer_oracle(model, i, xr, torch.ones(x.shape[:2], dtype=torch.bool),
                                                            call["position_ids"].expand(x.shape[:2])).sum(), [xr])
            assert_close(gx[..., 1::2], gr, f"layer {i}: grad of a non-contiguous input")
            assert torch.count_nonzero(gx[..., 0::2]) == 0
        else:
            got, _ = _grad_check(model, i, x, call, valid=valid)
            if valid is not None:  # padding rows pass through bit for bit
                assert torch.equal(got[~valid], x[~valid])


@pytest.mark.parametrize(
    "model_type, attn, options",
    [
        ("llama", "sdpa", dict(router_activation="identity")),
        ("gpt2", "eager", dict(router_activation="identity", causal_router="router")),
        ("qwen2", "sdpa", dict(routing="causal")),
        ("mistral", "eager", dict(routing="causal", causal_router="router")),
        ("gemma", "sdpa", dict(routing="causal", router_activation="identity")),
    ],
)
def test_layer_matches_oracle_options(model_type, attn, options):
    """Other router activations / causal routers, and causal routing (set_routing) of the
    layer forward: K = ceil(c * max_position_embeddings) = 64 does not bind at T = 7."""
    options = dict(options)
    routing = options.pop("routing", "topk")
    model = converted(model_type, attn, capacity_factor=0.5, router_seed=12, weight_std=0.3, **options)
    with torch.no_grad():
        for _, layer in mod_layers(model):
            layer.mod.router_bias.fill_(0.3)
    ids, mask, pid = _layer_inputs(model, "padded_T7")
    if routing == "causal":
        calibrate_causal(model, ids, mask)
    H.set_routing(model, routing)
    valid = mask.bool()
    for i, layer in mod_layers(model):
        call = layer_call(model, i, ids, mask, pid)
        got, _ = _grad_check(model, i, call["hidden_states"], call, routing=routing, valid=valid)
        assert torch.equal(got[~valid], call["hidden_states"][~valid])
    if routing == "causal":  # the case is not trivial: some tokens route, some do not
        seen, hs = capture_mod(model)
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=pid, use_cache=False)
        for h in hs:
            h.remove()
        counts = [int(o.routing.slot_mask.sum()) for v in seen.values() for _, o in v]
        assert len(counts) == 2 and all(0 < n < int(valid.sum()) for n in counts), counts


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_layer_matches_oracle_float64(model_type):
    model = converted(model_type, "sdpa", capacity_factor=0.5, router_seed=13, weight_std=0.3).to(torch.float64)
    for _, layer in mod_layers(model):
        assert layer.mod.router_weight.dtype == torch.float64
    ids, mask, pid = _layer_inputs(model, "padded_T7")
    for i, layer in mod_layers(model):
        call = layer_call(model, i, ids, mask, pid)
        assert call["hidden_states"].dtype == torch.float64
        _grad_check(model, i, call["hidden_states"], call, valid=mask.bool(), tol_dtype=torch.float64)


def test_layer_ties_go_to_lower_positions():
    """At initialisation every router logit is 0: top-k takes the first valid tokens."""
    model = converted("llama", capacity_factor=0.5)
    ids, mask, _ = left_padded([8, 6, 3], seed=8)
    seen, hs = capture_mod(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in hs:
        h.remove()
    C = capacity(8, 0.5)
    for i, calls in seen.items():
        (x, out), = calls
        idx, sm = out.routing.indices, out.routing.slot_mask
        for b, n in enumerate([8, 6, 3]):
            first = list(range(8 - n, 8 - n + min(C, n)))
            assert idx[b][sm[b]].tolist() == first, (i, b)
            assert int(sm[b].sum()) == min(C, n)
        assert torch.equal(idx, idx.sort(dim=1).values), "slots must be in position order"


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_model_matches_oracle(model_type, attn):
    model = converted(model_type, attn, capacity_factor=0.5, router_seed=21, weight_std=0.3)
    ids, mask, _ = left_padded([7, 4, 6], seed=9)
    calibrate_causal(model, ids, mask)
    for pid in (None, true_positions(mask)):
        for routing in ("topk", "causal"):
            H.set_routing(model, routing)
            with torch.no_grad():
                got = model(ids, attention_mask=mask, position_ids=pid).logits
                want = model_oracle(model, ids, mask, pid, routing)
            assert_close(valid_rows(got, mask), valid_rows(want, mask),
                         f"{model_type}/{attn} logits, routing={routing}, explicit positions={pid is not None}")
    H.set_routing(model, "topk")
    with torch.no_grad():  # no padding, no mask
        got = model(ids[:, :5]).logits
        want = model_oracle(model, ids[:, :5])
    assert_close(got, want, f"{model_type}/{attn} logits without a mask")


# ======================================================================================
# 3. capacity_factor = 1: the identity at initialisation
# ======================================================================================


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_capacity_one_is_identity_at_init(model_type, attn):
    base = tiny_model(model_type, attn)
    model = H.convert(copy.deepcopy(base), capacity_factor=1.0)
    ids, mask, _ = left_padded([7, 5, 3], seed=10)
    # labels on valid targets predicted from valid positions only (the logits of padding
    # positions are not specified: MoD layers pass padding tokens through)
    labels = ids.masked_fill((mask == 0) | (true_positions(mask) == 0), -100)
    with torch.no_grad():
        want = base(ids, attention_mask=mask, labels=labels)
    got = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(valid_rows(got.logits, mask), valid_rows(want.logits, mask), rtol=0, atol=1e-5)
    aux = H.aux_loss(model)
    assert aux is not None and aux.dtype == torch.float32 and aux.dim() == 0
    torch.testing.assert_close(got.loss, want.loss + aux, rtol=0, atol=1e-5)
    got.loss.backward()
    for i, layer in mod_layers(model):
        gw, gb = layer.mod.router_weight.grad, layer.mod.router_bias.grad
        assert gw is not None and torch.count_nonzero(gw) > 0, f"layer {i}: router weight got no gradient"
        assert gb is not None and float(gb.abs()) > 0, f"layer {i}: router bias got no gradient"
        assert torch.isfinite(gw).all()


# ======================================================================================
# 4. The residual is added once: x' = x + r * f, not r * layer(x)
# ======================================================================================


@pytest.mark.parametrize("activation", ["scaled_sigmoid", "identity"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_residual_added_once(model_type, activation):
    base = tiny_model(model_type)
    model = H.convert(copy.deepcopy(base), capacity_factor=1.0, router_activation=activation)
    r = 1.5
    with torch.no_grad():
        for _, layer in mod_layers(model):
            layer.mod.router_weight.zero_()
            # scaled_sigmoid: 2 * sigmoid(log 3) = 1.5; identity: r = bias
            layer.mod.router_bias.fill_(math.log(3.0) if activation == "scaled_sigmoid" else r)
    ids, _, _ = left_padded([6, 6], seed=12)
    for i, layer in mod_layers(model):
        call = layer_call(model, i, ids)
        x = call["hidden_states"] * 3.0  # a residual stream far from the layer's update
        with torch.no_grad():
            y = call_layer(decoder_layers(base)[i], x, layer_call(base, i, ids))  # x + f(x)
            got = call_layer(layer, x, call)
        f = y - x
        assert float(f.abs().max()) > 1e-2
        torch.testing.assert_close(got, x + r * f, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, r * y, atol=1e-3), "router weight applied to the residual"


# ======================================================================================
# 5. Positions: routed tokens keep their true positions
# ======================================================================================


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3"])
def test_routed_tokens_rotary_at_true_positions(model_type):
    """Route the even positions only (router weight e_0, x[:, even, 0] large): the layer
    equals the oracle with rotary and the sliding window at the true positions (row
    offsets given by position_ids; routed tokens 2 apart, so a window of 4 positions
    spans 2 routed tokens, not 4) and differs from one with compressed positions 0..C-1."""
    model = converted(model_type, capacity_factor=0.5)
    T = 8
    ids, _, _ = left_padded([T, T], seed=13)
    pid = torch.stack([torch.arange(T) + 5, torch.arange(T) + 17])  # explicit, per-row offsets
    i, layer = mod_layers(model)[-1]  # layer 3: sliding (window 4) in mistral and qwen3
    assert (window_of(model, i) is None) == (model_type == "llama")
    with torch.no_grad():
        layer.mod.router_weight.zero_()
        layer.mod.router_weight[0] = 1.0
    call = layer_call(model, i, ids, None, pid)
    x = call["hidden_states"].clone()
    x[:, 0::2, 0] += 20.0
    with torch.no_grad():
        got = call_layer(layer, x, call)
        want = routed_layer_oracle(model, i, x, torch.ones(2, T, dtype=torch.bool), pid)
    assert_close(got, want, "rotary at the true positions")
    # untouched odd positions, and the compressed-position fault is distinguishable
    assert torch.equal(got[:, 1::2], x[:, 1::2])
    xs = x[:, 0::2]
    ps = pid[:, 0::2]
    with torch.no_grad():
        f_true = sublayer_update(model, layer, xs, ps, causal_visible(ps, window_of(model, i)))
        f_comp = sublayer_update(model, layer, xs, torch.arange(T // 2).expand(2, -1),
                                 causal_visible(torch.arange(T // 2).expand(2, -1), None))
    assert not torch.allclose(f_true, f_comp, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_left_padded_row_with_true_positions_equals_prompt_alone(model_type):
    """Causal routing (K fixed by max_position_embeddings): a left-padded row run with its
    true positions (position_ids) gives the logits of the prompt alone."""
    model = converted(model_type, capacity_factor=0.25, router_seed=14, weight_std=0.3)
    H.set_routing(model, "causal")
    ids, mask, prompts = left_padded([9, 5, 2], seed=15)
    calibrate_causal(model, ids, mask)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=true_positions(mask)).logits
        for b, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            assert_close(got[b, -len(p):], alone, f"{model_type}: row {b} vs the prompt alone")


# ======================================================================================
# 6. Padding
# ======================================================================================


@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_padding_never_routed(model_type, routing):
    """Padding tokens get the largest router logits (and predictor logits) and are still
    never routed while valid tokens remain; rows with fewer valid tokens than the capacity
    flag the rest padding."""
    model = converted(model_type, capacity_factor=0.5, router_seed=16, weight_std=0.3, predictor_bias=50.0)
    H.set_routing(model, routing)
    lengths = [8, 5, 2, 0]
    ids, mask, _ = left_padded(lengths, seed=17, total=8)
    valid = mask.bool()
    for i, layer in mod_layers(model):
        call = layer_call(model, i, ids, mask)
        x = call["hidden_states"].clone()
        w = layer.mod.router_weight.detach()
        x[~valid] += 50.0 * w / w.norm()  # padding would win top-k
        seen, hs = capture_mod(model)
        with torch.no_grad():
            call_layer(layer, x, call)
        for h in hs:
            h.remove()
        (xin, out), = seen[i]
        z = oracle_logits(layer.mod, xin)
        assert bool((z[~valid].min() > z[valid].max())), "the padding must have the largest logits here"
        idx, sm = out.routing.indices, out.routing.slot_mask
        C = idx.shape[1]
        assert C == (capacity(8, 0.5) if routing == "topk" else min(8, capacity(MAX_POS, 0.5)))
        for b, n in enumerate(lengths):
            routed = idx[b][sm[b]]
            assert valid[b, routed].all(), f"layer {i} row {b}: a padding token was routed"
            assert len(routed) == min(C, n), f"layer {i} row {b}: {len(routed)} routed of {n} valid"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_padding_token_ids_do_not_matter(model_type):
    model = converted(model_type, capacity_factor=0.5, router_seed=18, weight_std=0.3)
    ids, mask, _ = left_padded([7, 3, 5], seed=19)
    calibrate_causal(model, ids, mask)
    other = ids.clone()
    other[mask == 0] = torch.randint(3, V, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other, ids)
    for routing in ("topk", "causal"):
        H.set_routing(model, routing)
        with torch.no_grad():
            a = model(ids, attention_mask=mask).logits
            b = model(other, attention_mask=mask).logits
        assert_close(valid_rows(b, mask), valid_rows(a, mask), f"{model_type} {routing}: padded ids changed logits")


@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_batch_invariance(model_type, routing):
    """A row's outputs do not depend on the other rows of the batch."""
    model = converted(model_type, capacity_factor=0.5, router_seed=20, weight_std=0.3)
    H.set_routing(model, routing)
    ids, mask, _ = left_padded([7, 2, 5], seed=21)
    calibrate_causal(model, ids, mask)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for b in range(3):
            alone = model(ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
            assert_close(valid_rows(batch[b:b + 1], mask[b:b + 1]), valid_rows(alone, mask[b:b + 1]),
                         f"{model_type} {routing}: row {b} depends on the batch")


# ======================================================================================
# 7. bf16
# ======================================================================================


@pytest.mark.parametrize("order", ["convert_then_cast", "cast_then_convert"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_bf16_forward_backward_generate(model_type, order):
    model = tiny_model(model_type)
    if order == "convert_then_cast":
        H.convert(model, capacity_factor=0.5)
        randomize_mod(model, 22, weight_std=0.3)
        model.to(torch.bfloat16)
    else:
        model.to(torch.bfloat16)
        H.convert(model, capacity_factor=0.5)
        randomize_mod(model, 22, weight_std=0.3)
    for _, layer in mod_layers(model):
        assert layer.mod.router_weight.dtype == torch.bfloat16
    ids, mask, _ = left_padded([7, 4], seed=23)
    labels = ids.masked_fill(mask == 0, -100)
    seen, hs = capture_mod(model)
    out = model(ids, attention_mask=mask, labels=labels)
    for h in hs:
        h.remove()
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for i, layer in mod_layers(model):
        (x, o), = seen[i]
        assert x.dtype == torch.bfloat16
        rl = o.routing.router_logits
        assert rl.dtype == torch.float32, "router logits must be computed in float32"
        want = x.float() @ layer.mod.router_weight.float() + layer.mod.router_bias.float()
        torch.testing.assert_close(rl.detach(), want, rtol=1e-5, atol=1e-5)
        # the routing decision is the float32 top-k
        C = o.routing.indices.shape[1]
        for b, R in enumerate(oracle_routed(want, mask.bool(), C)):
            assert o.routing.indices[b][o.routing.slot_mask[b]].tolist() == R
        g = layer.mod.router_weight.grad
        assert g is not None and torch.isfinite(g.float()).all() and torch.count_nonzero(g) > 0
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert gen.shape == (2, ids.shape[1] + 4)
    assert torch.equal(gen[:, :ids.shape[1]], ids)


# ======================================================================================
# 8. Generation
# ======================================================================================


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, **kw)


GEN_CASES = [(mt, "sdpa") for mt in FAMILIES] + [("llama", "eager"), ("mistral", "eager"), ("gpt2", "eager")]


@pytest.mark.parametrize("static", [None, True], ids=["default_path", "static_path"])
@pytest.mark.parametrize("model_type, attn", GEN_CASES)
def test_generate_matches_no_cache_and_prompt_alone(model_type, attn, static):
    """static=True runs, on the CPU, the static-shaped prefill/decode path a GPU takes."""
    model = converted(model_type, attn, capacity_factor=0.25, router_seed=24, weight_std=0.3)
    lengths, new = [5, 8, 3], 6
    ids, mask, prompts = left_padded(lengths, seed=25)
    calibrate_causal(model, ids, mask)
    B = len(lengths)
    out = _generate(model, ids, mask, max_new_tokens=new,
                    past_key_values=H.MoDCache(model, decode_capacity=B, static=static))
    ref = _generate(model, ids, mask, max_new_tokens=new, use_cache=False)
    assert out.sequences.shape == (B, ids.shape[1] + new)
    assert torch.equal(out.sequences, ref.sequences), "generate with the MoD cache != generate(use_cache=False)"
    for s, (a, b) in enumerate(zip(out.scores, ref.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {s}: {m}")
    for b, p in enumerate(prompts):
        alone = _generate(model, p[None], None, max_new_tokens=new,
                          past_key_values=H.MoDCache(model, decode_capacity=1, static=static))
        assert torch.equal(out.sequences[b, -new:], alone.sequences[0, -new:]), f"row {b} != its prompt alone"
        for s in range(new):
            torch.testing.assert_close(out.scores[s][b], alone.scores[s][0], rtol=1e-4, atol=1e-4)
    cache = returned_cache(out)
    drops = H.cache_drops(cache)
    assert sorted(drops) == H.mod_layer_indices(model)
    for i, d in drops.items():
        assert d.dtype == torch.int64 and d.shape == (B,)
        assert int(d.sum()) == 0, f"layer {i} dropped tokens with decode_capacity = B"
    # the routing is not trivial: each MoD layer routes some tokens and skips others
    total = sum(lengths) + B * (new - 1)
    for i, lc in enumerate(cache.layers):
        if isinstance(lc, H.MoDCacheLayer):
            assert lc.routing == "causal"
            assert lc.columns == ids.shape[1] + new - 1
            routed = int(lc.kv.fill.sum())
            assert 0 < routed < total, f"layer {i}: {routed} of {total} tokens routed"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_default_decode_capacity_reports_drops(model_type):
    """Every token wants the layer (predictor bias 50); the default decode capacity at
    B = 4, c = 0.125 is 3 slots, so each decode step drops exactly one token per layer."""
    model = converted(model_type, capacity_factor=0.125, router_seed=26, weight_std=0.3, predictor_bias=50.0)
    B, new = 4, 5
    assert mod_ext.default_decode_capacity(B, 0.125) == 3
    ids, mask, _ = left_padded([5] * B, seed=27)
    out = _generate(model, ids, mask, max_new_tokens=new)
    assert out.sequences.shape == (B, 5 + new)
    drops = H.cache_drops(returned_cache(out))
    assert sorted(drops) == H.mod_layer_indices(model)
    for i, d in drops.items():
        assert d.dtype == torch.int64 and d.shape == (B,)
        assert (d >= 0).all()
        assert int(d.sum()) == new - 1, f"layer {i}: drops {d.tolist()}"
    # an ample decode capacity drops nothing
    out2 = _generate(model, ids, mask, max_new_tokens=new, past_key_values=H.MoDCache(model, decode_capacity=B))
    assert all(int(d.sum()) == 0 for d in H.cache_drops(returned_cache(out2)).values())


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gpt2"])
def test_static_and_dynamic_paths_agree_with_drops(model_type):
    """The static path (what a GPU runs: padding block slots in each decode step) gives the
    dynamic path's tokens, scores and drop counts when the decode capacity binds."""
    model = converted(model_type, capacity_factor=0.25, router_seed=28, weight_std=0.3)
    ids, mask, _ = left_padded([6, 3, 5, 6], seed=29)
    calibrate_causal(model, ids, mask)
    runs = {st: _generate(model, ids, mask, max_new_tokens=6,
                          past_key_values=H.MoDCache(model, decode_capacity=2, static=st)) for st in (False, True)}
    assert torch.equal(runs[False].sequences, runs[True].sequences)
    for a, b in zip(runs[False].scores, runs[True].scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    d0, d1 = (H.cache_drops(returned_cache(runs[st])) for st in (False, True))
    assert {i: d.tolist() for i, d in d0.items()} == {i: d.tolist() for i, d in d1.items()}


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt2"])
def test_manual_decode_step_after_generate(model_type, keyword):
    """The cache generate returns continues in a manual step (either cache keyword) and
    gives the logits of a full no-cache causal forward of the whole sequence."""
    model = converted(model_type, capacity_factor=0.25, router_seed=28, weight_std=0.3)
    ids, mask, _ = left_padded([6, 3, 8], seed=29)
    calibrate_causal(model, ids, mask)
    B, new = 3, 4
    out = _generate(model, ids, mask, max_new_tokens=new, past_key_values=H.MoDCache(model, decode_capacity=B))
    cache = returned_cache(out)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(B, new, dtype=mask.dtype)], 1)
    pos = true_positions(full_mask)
    H.set_routing(model, "causal")
    with torch.no_grad():
        step = model(seq[:, -1:], attention_mask=full_mask, position_ids=pos[:, -1:], **{keyword: cache}).logits
        full = model(seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
    assert_close(step[:, -1], full[:, -1], f"{model_type}: manual step via {keyword}=")
    # one more step, from the prompt of a fresh cache, by hand
    cache2 = H.MoDCache(model, decode_capacity=B)
    with torch.no_grad():
        pre = model(seq[:, :-1], attention_mask=full_mask[:, :-1], position_ids=pos[:, :-1], **{keyword: cache2})
        nxt = model(seq[:, -1:], attention_mask=full_mask, position_ids=pos[:, -1:], **{keyword: cache2})
    assert_close(valid_rows(pre.logits, full_mask[:, :-1]), valid_rows(full[:, :-1], full_mask[:, :-1]),
                 "prefill by hand")
    assert_close(nxt.logits[:, -1], full[:, -1], "decode step by hand")


def test_topk_filled_cache_cannot_decode():
    model = converted("llama", capacity_factor=0.25, router_seed=30, weight_std=0.3)
    ids, mask, _ = left_padded([6, 4], seed=31)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)  # top-k routing
    cache = returned_cache(out)
    assert cache is not None
    H.set_routing(model, "causal")
    nxt = torch.tensor([[5], [6]])
    m2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with pytest.raises(ValueError, match="top-k"):
        with torch.no_grad():
            model(nxt, attention_mask=m2, past_key_values=cache)
    # and a causally filled cache refuses top-k routing
    cache = H.MoDCache(model, decode_capacity=2)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    H.set_routing(model, "topk")
    with pytest.raises(ValueError, match="causal"):
        with torch.no_grad():
            model(nxt, attention_mask=m2, past_key_values=cache)


@pytest.mark.parametrize("predictor_bias", [None, 50.0])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_causal_prefix_routes_as_inside_longer_input(model_type, predictor_bias):
    """K = capacity_for(max_position_embeddings = 128, 0.125) = 16: the prefix (24 tokens)
    routes exactly as inside the 40-token input, also when every token wants the layer
    and the cap binds inside the prefix (the first 16 tokens run it)."""
    model = converted(model_type, capacity_factor=0.125, router_seed=32, weight_std=0.3,
                      predictor_bias=predictor_bias)
    H.set_routing(model, "causal")
    K = capacity(MAX_POS, 0.125)
    assert K == 16
    ids, _, _ = left_padded([40, 40], seed=33)
    if predictor_bias is None:
        calibrate_causal(model, ids)
    P = 24
    seen, hs = capture_mod(model)
    with torch.no_grad():
        long = model(ids, output_hidden_states=True)
        short = model(ids[:, :P], output_hidden_states=True)
    for h in hs:
        h.remove()
    for layer_h_long, layer_h_short in zip(long.hidden_states, short.hidden_states):
        assert_close(layer_h_short, layer_h_long[:, :P], "hidden states of the prefix")
    assert_close(short.logits, long.logits[:, :P], "logits of the prefix")
    for i, ((_, o_long), (_, o_short)) in seen.items():
        for b in range(2):
            rl = o_long.routing.indices[b][o_long.routing.slot_mask[b]]
            rs = o_short.routing.indices[b][o_short.routing.slot_mask[b]]
            assert torch.equal(rl[rl < P], rs), f"layer {i} row {b}: prefix routing changed"
            assert len(rl) <= K
            if predictor_bias is not None:
                assert rl.tolist() == list(range(K)), f"layer {i}: first come first served up to K"


# ======================================================================================
# 9. output_hidden_states / output_attentions
# ======================================================================================


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_output_hidden_states(model_type):
    model = converted(model_type, capacity_factor=0.5, router_seed=34, weight_std=0.3)
    ids, mask, _ = left_padded([7, 4], seed=35)
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == N_LAYERS + 1
    for k, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert a.shape == (2, 7, D)
        assert torch.equal(a.detach(), b), f"hidden state {k} differs between grad and no-grad mode"
    assert torch.equal(out.logits.detach(), ref.logits)
    # a MoD layer's recorded output is its forward on the recorded input
    for i, layer in mod_layers(model):
        if i + 1 < N_LAYERS:
            call = layer_call(model, i, ids, mask)
            with torch.no_grad():
                y = call_layer(layer, ref.hidden_states[i], call)
            assert_close(ref.hidden_states[i + 1], y, f"hidden state after MoD layer {i}")


def test_output_attentions_not_implemented():
    model = converted("llama")
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, output_attentions=True)


# ======================================================================================
# 10. save_pretrained / from_pretrained
# ======================================================================================


@pytest.mark.parametrize(
    "settings",
    [dict(capacity_factor=0.25, every=2, predictor_hidden=8),
     dict(capacity_factor=0.5, layers=[0, 3], causal_router="router", router_activation="identity",
          aux_loss_weight=0.3)],
    ids=["predictor", "router"],
)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_save_load_round_trip(model_type, settings, tmp_path):
    model = converted(model_type, "sdpa", router_seed=36, weight_std=0.3, **settings)
    ids, mask, _ = left_padded([7, 4], seed=37)
    calibrate_causal(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = H.from_pretrained(tmp_path).eval()
    assert H.is_converted(loaded)
    assert loaded.config.mod_ext == model.config.mod_ext
    assert H.mod_layer_indices(loaded) == H.mod_layer_indices(model)
    for (_, a), (_, b) in zip(mod_layers(model), mod_layers(loaded)):
        assert (a.mod.capacity_factor, a.mod.router_activation, a.mod.causal_router, a.mod.max_seq_len) == (
            b.mod.capacity_factor, b.mod.router_activation, b.mod.causal_router, b.mod.max_seq_len)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for routing in ("topk", "causal"):
        H.set_routing(model, routing)
        H.set_routing(loaded, routing)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                       rtol=0, atol=0)
    a = _generate(model, ids, mask, max_new_tokens=3)
    b = _generate(loaded, ids, mask, max_new_tokens=3)
    assert torch.equal(a.sequences, b.sequences)


def test_causal_threshold_saved_and_old_checkpoints_load(tmp_path):
    """The calibrated causal threshold travels with save_pretrained; a checkpoint saved
    before it existed (no causal_threshold tensors) loads with threshold 0."""
    from safetensors.torch import load_file, save_file

    model = converted("llama", "sdpa", router_seed=36, weight_std=0.3, capacity_factor=0.25)
    mods = [layer.mod for _, layer in mod_layers(model)]
    mods[0].causal_threshold.fill_(0.125)
    model.save_pretrained(tmp_path)
    assert float(mod_layers(H.from_pretrained(tmp_path))[0][1].mod.causal_threshold) == 0.125
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    assert any(k.endswith(".causal_threshold") for k in state)
    save_file({k: v for k, v in state.items() if not k.endswith(".causal_threshold")}, path,
              metadata={"format": "pt"})
    old = H.from_pretrained(tmp_path)
    assert all(float(layer.mod.causal_threshold) == 0.0 for _, layer in mod_layers(old))


def test_from_pretrained_rejects_unconverted_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mod_ext"):
        H.from_pretrained(tmp_path)


# ======================================================================================
# 11. Trainer, router-only tuning, PEFT
# ======================================================================================


class _LMData(torch.utils.data.Dataset):
    def __init__(self, n=8, T=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(3, V, (n, T), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.x[i]}


def _train(model, tmp_path, steps=3):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_LMData())
    return trainer.train()


def test_loss_is_lm_loss_plus_weighted_aux():
    model = converted("llama", capacity_factor=0.25, router_seed=38, weight_std=0.3, aux_loss_weight=0.7)
    ids, mask, _ = left_padded([9, 6], seed=39)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
    aux = H.aux_loss(model)
    assert aux is not None and aux.requires_grad
    # the aux part is 0.7 * the sum of the layers' BCE of the predictor vs top-k membership
    seen, hs = capture_mod(model)
    model(ids, attention_mask=mask, labels=labels)
    for h in hs:
        h.remove()
    parts = []
    layers = dict(mod_layers(model))
    for i, ((x, o),) in seen.items():
        target = torch.zeros(x.shape[:2])
        target.scatter_(1, o.routing.indices, o.routing.slot_mask.float())
        pl = layers[i].mod.predictor(x)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(pl, target, reduction="none")
        parts.append(bce[mask.bool()].mean())
    torch.testing.assert_close(H.aux_loss(model), 0.7 * torch.stack(parts).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, lm + aux, rtol=1e-5, atol=1e-6)
    # no labels: no loss, aux_loss still reports the aux part; causal routing: no aux
    o2 = model(ids, attention_mask=mask)
    assert o2.loss is None and H.aux_loss(model) is not None
    H.set_routing(model, "causal")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert H.aux_loss(model) is None


def test_aux_weighed_like_the_lm_loss_under_num_items_in_batch():
    """With num_items_in_batch (Trainer, gradient accumulation) the LM loss is sum / N;
    the aux is weighed by this micro-batch's share n / N of the label tokens, so a step
    of micro-batches sums to the mean of both."""
    model = converted("llama", capacity_factor=0.25, router_seed=52, weight_std=0.3, aux_loss_weight=0.7)
    ids, mask, _ = left_padded([9, 6], seed=53)
    labels = ids.masked_fill(mask == 0, -100)
    plain = model(ids, attention_mask=mask, labels=labels)
    aux = H.aux_loss(model).detach()
    n = int(labels[:, 1:].ne(-100).sum())
    N = 3 * n
    out = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=N)
    torch.testing.assert_close(H.aux_loss(model), aux * n / N, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, (plain.loss - aux) * n / N + aux * n / N, rtol=1e-5, atol=1e-6)


def test_trainer_fine_tunes_with_aux_loss(tmp_path):
    model = converted("llama", capacity_factor=0.25)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = _train(model, tmp_path)
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    pred = {n for n in before if ".mod.predictor." in n}
    router = {n for n in before if n.endswith("mod.router_weight") or n.endswith("mod.router_bias")}
    # the predictor reads a detached input: only the aux loss in out.loss can train it
    assert pred and pred <= changed, f"predictor parameters unchanged: {sorted(pred - changed)}"
    assert router <= changed
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_router_only_tuning(tmp_path):
    model = converted("llama", capacity_factor=0.25)
    model.train()
    rp = H.router_parameters(model)
    assert len(rp) == 2 * (2 + 4)  # 2 MoD layers x (router weight, bias, predictor 2 x (weight, bias))
    assert {id(p) for p in rp} == {id(p) for _, l in mod_layers(model) for p in l.mod.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in rp:
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, tmp_path)
    ids_rp = {id(p) for p in rp}
    for n, p in model.named_parameters():
        if id(p) in ids_rp:
            assert not torch.equal(p, before[n]), f"router parameter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"


def test_peft_lora_on_converted_llama():
    peft = pytest.importorskip("peft")
    model = converted("llama", capacity_factor=0.25, router_seed=40, weight_std=0.3)
    ids, mask, _ = left_padded([6, 4], seed=41)
    ref = _generate(model, ids, mask, max_new_tokens=3).sequences
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, task_type="CAUSAL_LM"))
    assert H.is_converted(pm)
    rp = H.router_parameters(pm)
    assert len(rp) == 12
    for p in rp:
        p.requires_grad_(True)
    pm.train()
    labels = ids.masked_fill(mask == 0, -100)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    assert H.aux_loss(pm) is not None
    out.loss.backward()
    lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for _, p in lora)
    for p in rp:
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    pm.eval()
    with torch.no_grad():
        gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, ref), "LoRA starts at zero: the PEFT model generates as the model"


# ======================================================================================
# 12. Gradient checkpointing
# ======================================================================================


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("causal_router", ["predictor", "router"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gradient_checkpointing_same_loss_and_grads(model_type, causal_router, use_reentrant):
    model = converted(model_type, capacity_factor=0.5, causal_router=causal_router, router_seed=42,
                      weight_std=0.3)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert ckpt.is_gradient_checkpointing
    model.train()
    ckpt.train()
    ids, mask, _ = left_padded([8, 5], seed=43)
    labels = ids.masked_fill(mask == 0, -100)
    a = model(ids, attention_mask=mask, labels=labels)
    a.loss.backward()
    b = ckpt(ids, attention_mask=mask, labels=labels)
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(H.aux_loss(ckpt), H.aux_loss(model), rtol=0, atol=1e-6)
    pa = dict(model.named_parameters())
    for n, p in ckpt.named_parameters():
        ga = pa[n].grad
        if ".mod." in n:
            assert ga is not None and torch.count_nonzero(ga) > 0, f"{n}: no gradient without checkpointing"
        assert (p.grad is None) == (ga is None), n
        if ga is not None:
            assert_close(p.grad, ga, f"grad of {n} under checkpointing")


# ======================================================================================
# 13. deepcopy, state_dict, float64
# ======================================================================================


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_deepcopy_state_dict_and_float64(model_type):
    model = converted(model_type, capacity_factor=0.5, router_seed=44, weight_std=0.3)
    ids, mask, _ = left_padded([7, 3], seed=45)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    twin = copy.deepcopy(model)
    assert H.is_converted(twin) and H.mod_layer_indices(twin) == H.mod_layer_indices(model)
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask).logits, ref)
        for _, layer in mod_layers(twin):
            layer.mod.router_weight.add_(1.0)
        assert torch.equal(model(ids, attention_mask=mask).logits, ref), "the copy shares parameters"
    H.set_routing(twin, "causal")
    assert all(l.mod.routing == "topk" for _, l in mod_layers(model))
    # state_dict into a converted model of other weights
    other = converted(model_type, seed=99, capacity_factor=0.5)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(ids, attention_mask=mask).logits, ref)
    # float64
    m64 = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        out = m64(ids, attention_mask=mask).logits
        want = model_oracle(m64, ids, mask)
    assert out.dtype == torch.float64
    assert_close(valid_rows(out, mask), valid_rows(want, mask), "float64 logits vs the oracle", dtype=torch.float64)
    torch.testing.assert_close(valid_rows(out, mask).float(), valid_rows(ref, mask), rtol=1e-4, atol=1e-4)


# ======================================================================================
# 14. torch.compile
# ======================================================================================


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_compiled_model_matches_eager(model_type):
    torch._dynamo.reset()
    model = converted(model_type, capacity_factor=0.5, router_seed=46, weight_std=0.3)
    ids, mask, _ = left_padded([7, 4], seed=47)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, labels=labels)
        cm = torch.compile(model, backend="eager")
        out = cm(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "gpt2"])
def test_compiled_decoder_layer_fullgraph(model_type):
    """No graph break inside a MoD layer: fullgraph=True on a converted decoder layer
    called with the arguments the model passes (top-k and causal routing)."""
    model = converted(model_type, capacity_factor=0.5, router_seed=48, weight_std=0.3)
    ids, mask, _ = left_padded([7, 4], seed=49)
    calibrate_causal(model, ids, mask)
    i, layer = mod_layers(model)[-1]
    call = layer_call(model, i, ids, mask)
    for routing in ("topk", "causal"):
        H.set_routing(model, routing)
        torch._dynamo.reset()
        x = call["hidden_states"].clone().requires_grad_(True)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        got = call_layer(compiled, x, call)
        (gx,) = torch.autograd.grad(got.sum(), [x])
        x2 = call["hidden_states"].clone().requires_grad_(True)
        want = call_layer(layer, x2, call)
        (gw,) = torch.autograd.grad(want.sum(), [x2])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, gw, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_whole_model_fullgraph():
    torch._dynamo.reset()
    model = converted("llama", capacity_factor=0.5, router_seed=50, weight_std=0.3)
    ids, mask, _ = left_padded([7, 4], seed=51)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        out = torch.compile(model, fullgraph=True, backend="eager")(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Found by a fresh-user trial: pickling, PEFT-wrapped models, numpy layer indices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_pickle_round_trip_in_a_fresh_process(model_type, tmp_path):
    """torch.save(model) / torch.load in a process that never converted a model: the
    converted classes are rebuilt by name (mod_ext.hf.__getattr__)."""
    import subprocess
    import sys

    model = H.convert(tiny_model(model_type), capacity_factor=0.5)
    randomize_mod(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    torch.save({"model": model, "ids": ids, "ref": ref}, tmp_path / "m.pt")
    code = (
        "import torch, sys\n"
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        "m = d['model']\n"
        "import mod_ext.hf as H\n"
        "assert H.is_converted(m), type(m)\n"
        "with torch.no_grad():\n"
        "    diff = (m(d['ids']).logits - d['ref']).abs().max().item()\n"
        "print('DIFF', diff)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DIFF 0.0" in r.stdout, r.stdout
    assert type(model).__name__ == type(tiny_model(model_type)).__name__  # architectures unchanged


def test_convert_a_peft_model_converts_its_base_model():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    assert H.convert(pm, capacity_factor=0.5) is pm
    assert H.mod_layer_indices(pm) == [1, 3] and H.is_converted(base)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    out = pm(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and H.aux_loss(pm) is not None
    with pytest.raises(ValueError, match="already converted"):
        H.convert(pm)


def test_layers_as_numpy_array():
    np = pytest.importorskip("numpy")
    model = H.convert(tiny_model("llama"), layers=np.array([0, 2]))
    assert H.mod_layer_indices(model) == [0, 2]
    with pytest.raises(ValueError, match="layers must be a sequence of int"):
        H.convert(tiny_model("llama"), layers=np.array([0.5]))
