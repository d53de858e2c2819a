"""Hypothesis property tests for the mod_ext ops.

Drawn inputs (shapes, dtypes, logits with forced ties, NaN and +-inf, valid masks,
non-contiguous layouts) are compared with the oracles in ``mod_ext.reference``, and
checked against invariants that do not rely on the oracles:

* indices strictly ascending (hence unique), in range, exactly ``capacity`` per row;
* top-k: every routed token ranks at least as high as every unrouted valid token in
  the order valid numbers (by value) > valid NaN > invalid, ties to the lower position;
  padding exactly when a row has fewer valid tokens than capacity;
* threshold: routed = the first ``capacity`` valid tokens with score > 0, padding = the
  lowest-position unrouted tokens, and causality (changing scores after position t never
  changes the decision for tokens <= t).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mod_ext
from mod_ext import reference as R
from tests.helpers import (
    DEVICES,
    LAYOUTS,
    assert_bitwise_equal,
    assert_close,
    assert_routing_equal,
    strided,
)

ROUTE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
DATA_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

NAN, INF = float("nan"), float("inf")
ROUTE_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
DATA_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])

# Small value pools force ties; the special pool mixes NaN, +-inf and signed zeros.
_POOLS = {
    "ties": [-1.0, -0.0, 0.0, 0.5, 1.0],
    "special": [NAN, INF, -INF, -0.0, 0.0, 1.0, -1.0, 2.0],
    "wide": [NAN, INF, -INF, -0.0, 0.0, 1e-3, -1e-3, 0.25, 1.0, -2.0, 3.0, 100.0, -100.0],
}


@st.composite
def routing_inputs(draw, max_B=4, max_S=40, dtypes=ROUTE_DTYPES):
    B = draw(st.integers(0, max_B))
    S = draw(st.integers(1, max_S))
    capacity = draw(st.integers(1, S))
    dtype = draw(dtypes)
    pool = draw(st.sampled_from(sorted(_POOLS)))
    values = draw(
        st.lists(
            st.one_of(
                st.sampled_from(_POOLS[pool]),
                st.floats(-4, 4, width=16),
            ),
            min_size=B * S,
            max_size=B * S,
        )
    )
    logits = torch.tensor(values, dtype=torch.float32).reshape(B, S).to(dtype)
    valid = None
    if draw(st.booleans()):
        vlist = draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S))
        valid = torch.tensor(vlist, dtype=torch.bool).reshape(B, S)
        if B > 0 and draw(st.booleans()):  # a row with fewer valid tokens than capacity
            valid[0] = False
            n = draw(st.integers(0, capacity - 1))
            valid[0, :n] = True
    layout = draw(st.sampled_from(LAYOUTS[:3]))  # "expanded" would change the values
    return logits, capacity, valid, layout


def _on(device, logits, valid, layout):
    _, lv = strided(logits.to(device), layout)
    vv = None if valid is None else strided(valid.to(device), layout)[1]
    return lv, vv


def _rank_key(value: float, valid: bool, position: int):
    """Sort key of the top-k order: larger is better (ties to the lower position)."""
    if not valid:
        cls, v = 0, 0.0
    elif math.isnan(value):
        cls, v = 1, 0.0
    else:
        cls, v = 2, value + 0.0  # -0.0 == 0.0
    return (cls, v, -position)


def _check_shape_invariants(idx, mask, B, S, capacity, ctx):
    assert idx.shape == (B, capacity) and mask.shape == (B, capacity), ctx
    assert idx.dtype == torch.int64 and mask.dtype == torch.bool, ctx
    if B == 0:
        return
    assert bool((idx >= 0).all()) and bool((idx < S).all()), f"{ctx}: index out of range {idx}"
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"{ctx}: not strictly ascending {idx}"


def _route_and_check(name, inp, device):
    """Run topk_route or threshold_route on the device, compare with its oracle and check
    the shape invariants; return (idx, mask) on the CPU, the float32 logits, the valid
    mask (all True when None), the capacity and a context string for messages."""
    logits, capacity, valid, layout = inp
    B, S = logits.shape
    op, ref = {"topk": (mod_ext.topk_route, R.topk_route_ref),
               "threshold": (mod_ext.threshold_route, R.threshold_route_ref)}[name]
    lv, vv = _on(device, logits, valid, layout)
    idx, mask = op(lv, capacity, vv)
    ctx = f"{name} B={B} S={S} C={capacity} dtype={logits.dtype} layout={layout}"
    assert_routing_equal((idx, mask), ref(logits, capacity, valid), ctx)
    idx, mask = idx.cpu(), mask.cpu()
    _check_shape_invariants(idx, mask, B, S, capacity, ctx)
    v = torch.ones(B, S, dtype=torch.bool) if valid is None else valid
    return idx, mask, logits.float(), v, capacity, ctx


@pytest.mark.parametrize("device", DEVICES)
@ROUTE_SETTINGS
@given(inp=routing_inputs())
def test_topk_route_properties(inp, device):
    idx, mask, vals, v, capacity, ctx = _route_and_check("topk", inp, device)
    B, S = vals.shape
    for b in range(B):
        chosen = set(idx[b].tolist())
        keys = {s: _rank_key(float(vals[b, s]), bool(v[b, s]), s) for s in range(S)}
        worst_chosen = min(keys[s] for s in chosen)
        others = [keys[s] for s in range(S) if s not in chosen]
        if others:
            assert worst_chosen > max(others), f"{ctx}: row {b} skipped a better token"
        # slot_mask says exactly which slots hold valid tokens
        assert mask[b].tolist() == [bool(v[b, s]) for s in idx[b].tolist()], ctx
        assert int(mask[b].sum()) == min(capacity, int(v[b].sum())), f"{ctx}: row {b} padding count"


@pytest.mark.parametrize("device", DEVICES)
@ROUTE_SETTINGS
@given(inp=routing_inputs())
def test_threshold_route_properties(inp, device):
    idx, mask, vals, v, capacity, ctx = _route_and_check("threshold", inp, device)
    B, S = vals.shape
    for b in range(B):
        wants = [s for s in range(S) if bool(v[b, s]) and float(vals[b, s]) > 0]
        routed = wants[:capacity]
        got_routed = [s for s, m in zip(idx[b].tolist(), mask[b].tolist()) if m]
        assert got_routed == routed, f"{ctx}: row {b} routed {got_routed}, want {routed}"
        unrouted = [s for s in range(S) if s not in set(routed)]
        padding = unrouted[: capacity - len(routed)]
        got_pad = [s for s, m in zip(idx[b].tolist(), mask[b].tolist()) if not m]
        assert got_pad == padding, f"{ctx}: row {b} padding {got_pad}, want {padding}"


@pytest.mark.parametrize("device", DEVICES)
@ROUTE_SETTINGS
@given(inp=routing_inputs(max_B=3), data=st.data())
def test_threshold_route_is_causal(inp, data, device):
    """Changing scores (and valid) after position t never changes which tokens <= t are
    routed."""
    logits, capacity, valid, layout = inp
    B, S = logits.shape
    assume(B > 0)
    t = data.draw(st.integers(0, S - 1), label="t")
    new_tail = data.draw(
        st.lists(st.sampled_from(_POOLS["special"]), min_size=B * (S - t - 1), max_size=B * (S - t - 1)),
        label="tail",
    )
    logits2 = logits.clone()
    logits2[:, t + 1 :] = torch.tensor(new_tail, dtype=torch.float32).reshape(B, S - t - 1).to(logits.dtype)
    valid2 = None
    if valid is not None:
        valid2 = valid.clone()
        valid2[:, t + 1 :] = ~valid2[:, t + 1 :]

    def routed_upto(l, v):
        lv, vv = _on(device, l, v, layout)
        idx, mask = mod_ext.threshold_route(lv, capacity, vv)
        idx, mask = idx.cpu(), mask.cpu()
        return [sorted(s for s, m in zip(idx[b].tolist(), mask[b].tolist()) if m and s <= t) for b in range(B)]

    assert routed_upto(logits, valid) == routed_upto(logits2, valid2), f"decision for tokens <= {t} changed"


@pytest.mark.parametrize("device", DEVICES)
@ROUTE_SETTINGS
@given(inp=routing_inputs(max_B=3, dtypes=st.just(torch.float32)), data=st.data())
def test_topk_route_invariant_to_order_preserving_changes(inp, data, device):
    """Top-k depends only on the order: adding a constant to the valid finite logits of a
    row, or changing invalid tokens' logits, leaves the routing unchanged."""
    logits, capacity, valid, layout = inp
    shift = data.draw(st.sampled_from([0.5, 1.0, -2.0, 8.0]))
    finite = torch.isfinite(logits)
    # exact in float32 for these small numbers (binary fractions with few bits)
    shifted = torch.where(finite, logits + shift, logits)
    assume(torch.equal((shifted - shift)[finite], logits[finite]))
    if valid is not None:
        shifted = torch.where(valid, shifted, torch.full_like(shifted, INF))
    # An exact shift is injective and monotonic: it keeps order and ties among the finite
    # values, and NaN / +-inf stay what they are.
    lv, vv = _on(device, logits, valid, layout)
    sv, _ = _on(device, shifted, valid, layout)
    a = mod_ext.topk_route(lv, capacity, vv)
    b = mod_ext.topk_route(sv, capacity, vv)
    assert_routing_equal(a, (b[0].cpu(), b[1].cpu()), f"shift={shift}")


# --------------------------------------------------------------------------------------
# gather / scatter
# --------------------------------------------------------------------------------------


@st.composite
def data_inputs(draw):
    B = draw(st.integers(0, 3))
    S = draw(st.integers(1, 24))
    D = draw(st.integers(0, 20))
    C = draw(st.integers(0, S))
    dtype = draw(DATA_DTYPES)
    w_dtype = draw(st.sampled_from([dtype, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(LAYOUTS))
    scale = draw(st.sampled_from([1.0, 1e-3, 100.0]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, S, D, generator=g) * scale).to(dtype)
    y = (torch.randn(B, C, D, generator=g) * scale).to(dtype)
    idx = torch.rand(B, S, generator=g).argsort(dim=1)[:, :C]
    if draw(st.booleans()):
        idx = idx.sort(dim=1).values
    w = torch.randn(B, C, generator=g).to(w_dtype)
    go_scatter = torch.randn(B, S, D, generator=g).to(dtype)
    go_gather = torch.randn(B, C, D, generator=g).to(dtype)
    return x, y, idx, w, go_scatter, go_gather, layout


@pytest.mark.parametrize("device", DEVICES)
@DATA_SETTINGS
@given(inp=data_inputs())
def test_gather_tokens_property(inp, device):
    x, _, idx, _, _, go, layout = inp
    ctx = f"gather x={tuple(x.shape)} C={idx.shape[1]} dtype={x.dtype} layout={layout}"
    x_leaf, xv = strided(x.to(device), layout, True)
    xr_leaf, xr = strided(x, layout, True)
    iv = strided(idx.to(device), layout)[1]
    ir = strided(idx, layout)[1]
    out = mod_ext.gather_tokens(xv, iv)
    ref = R.gather_tokens_ref(xr, ir)
    assert_bitwise_equal(out, ref, ctx)
    gv = strided(go.to(device), layout)[1]
    gr = strided(go, layout)[1]
    (gx,) = torch.autograd.grad(out, x_leaf, gv)
    (gxr,) = torch.autograd.grad(ref, xr_leaf, gr)
    if layout == "expanded":
        assert_close(gx, gxr, ctx + " grad x", scale=4)
    else:
        assert_bitwise_equal(gx, gxr, ctx + " grad x")


@pytest.mark.parametrize("device", DEVICES)
@DATA_SETTINGS
@given(inp=data_inputs())
def test_scatter_add_weighted_property(inp, device):
    x, y, idx, w, go, _, layout = inp
    B, S, D = x.shape
    ctx = f"scatter x={tuple(x.shape)} C={idx.shape[1]} dtype={x.dtype} w={w.dtype} layout={layout}"
    leaves, views, rleaves, rviews = [], [], [], []
    for t, rg in ((x, True), (y, True), (idx, False), (w, True)):
        leaf, view = strided(t.to(device), layout, rg)
        rleaf, rview = strided(t, layout, rg)
        leaves.append(leaf), views.append(view), rleaves.append(rleaf), rviews.append(rview)
    out = mod_ext.scatter_add_weighted(*views)
    ref = R.scatter_add_weighted_ref(*rviews)
    assert_bitwise_equal(out, ref, ctx)
    # untouched rows are x bit for bit
    iv = rviews[2]
    touched = torch.zeros(B, S, dtype=torch.bool).scatter_(1, iv, True)
    assert_bitwise_equal(out.cpu()[~touched], rviews[0].detach()[~touched], ctx + " untouched rows")

    gv = strided(go.to(device), layout)[1]
    gr = strided(go, layout)[1]
    gx, gy, gw = torch.autograd.grad(out, (leaves[0], leaves[1], leaves[3]), gv)
    gxr, gyr, gwr = torch.autograd.grad(ref, (rleaves[0], rleaves[1], rleaves[3]), gr)
    if layout == "expanded":
        assert_close(gx, gxr, ctx + " grad x", scale=4)
        assert_close(gy, gyr, ctx + " grad y", scale=4 * 100)
    else:
        assert_bitwise_equal(gx, gxr, ctx + " grad x")
        assert_bitwise_equal(gy, gyr, ctx + " grad y")
    if w.dtype in (torch.bfloat16, torch.float16):
        tol_dtype = w.dtype
    else:
        tol_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dot_scale = 1.0
    if B and idx.shape[1] and D:
        gsel = gr.double().gather(1, iv.unsqueeze(-1).expand(-1, -1, D))
        dot_scale = max(1.0, float((gsel.abs() * rviews[1].detach().double().abs()).sum(-1).max()))
    assert_close(gw, gwr, ctx + " grad weights", dtype=tol_dtype, scale=dot_scale * (B if layout == "expanded" else 1))
