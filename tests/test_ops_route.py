"""The routing family (csrc/cpu/route.cpp, csrc/cuda/route.cu): topk_route and
threshold_route against the plain-PyTorch oracles in ``mod_ext.reference``, on every
device the build supports.

* Hand-written cases with the expected outputs written out check the oracles too.
* Routing (indices, slot_mask) must match the oracle exactly, for every logit kind
  (ties, NaN, +-inf, signed zeros), valid mask, layout and dtype.
* Hypothesis property tests check invariants that do not rely on the oracles: indices
  strictly ascending and in range, exactly ``capacity`` per row; top-k routes tokens
  ranked at least as high as every unrouted valid one; threshold routing is causal.
* Bad arguments raise errors that name the argument (copied from tests/test_errors.py,
  plus the device / meta / capacity-type checks); capacity is a SymInt (no
  specialisation under torch.compile(dynamic=True) / torch.export); vmap folds into B.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mod_ext
from mod_ext import reference as R
from tests.helpers import (
    DEVICES,
    LAYOUTS,
    LOGIT_KINDS,
    ROUTE_DTYPES,
    VALID_KINDS,
    assert_bitwise_equal,
    assert_routing_equal,
    capacities,
    dtype_id,
    gen,
    make_logits,
    make_valid,
    requires_cuda,
    strided,
    to,
)

ops = torch.ops.mod_ext
T, F = True, False
NAN, INF = float("nan"), float("inf")
ROUTERS = [("topk_route", "router_logits"), ("threshold_route", "scores")]

# ======================================================================================
# Hand-written cases (expected outputs written out): they check the oracles as well.
# ======================================================================================

TOPK_CASES = [
    ("docstring_1", [[0.5, 2.0, 2.0, -1.0, 3.0]], 3, None, [[1, 2, 4]], [[T, T, T]]),
    ("docstring_2", [[0.5, 2.0, 9.0, -1.0, 3.0]], 3, [[T, F, F, T, F]], [[0, 1, 3]], [[T, F, T]]),
    ("ascending_output", [[5.0, 1.0, 4.0, 2.0, 3.0]], 3, None, [[0, 2, 4]], [[T, T, T]]),
    ("all_equal", [[1.0, 1.0, 1.0, 1.0]], 2, None, [[0, 1]], [[T, T]]),
    ("tie_at_boundary", [[1.0, 3.0, 2.0, 2.0, 2.0]], 3, None, [[1, 2, 3]], [[T, T, T]]),
    ("neg_zero_ties_pos_zero", [[-0.0, 0.0, -1.0]], 1, None, [[0]], [[T]]),
    ("pos_zero_ties_neg_zero", [[-1.0, 0.0, -0.0]], 1, None, [[1]], [[T]]),
    ("neg_zero_first_of_two", [[0.5, -0.0, 0.0, -0.5]], 2, None, [[0, 1]], [[T, T]]),
    ("pos_inf_ties", [[INF, 1.0, INF]], 2, None, [[0, 2]], [[T, T]]),
    ("neg_inf_beats_nan", [[NAN, -INF, NAN, 0.0]], 2, None, [[1, 3]], [[T, T]]),
    ("nan_lowest_first", [[NAN, -INF, NAN, 0.0]], 3, None, [[0, 1, 3]], [[T, T, T]]),
    ("all_nan", [[NAN, NAN, NAN]], 2, None, [[0, 1]], [[T, T]]),
    ("nan_beats_invalid", [[NAN, 5.0, NAN, 0.0]], 3, [[T, F, T, F]], [[0, 1, 2]], [[T, F, T]]),
    ("nan_then_invalid_pad", [[1.0, NAN, 7.0, -INF]], 4, [[F, T, F, T]], [[0, 1, 2, 3]], [[F, T, F, T]]),
    ("invalid_padding_lowest", [[9.0, 8.0, 1.0, 7.0, 2.0]], 3, [[F, F, T, F, F]], [[0, 1, 2]], [[F, F, T]]),
    ("all_invalid_row", [[1.0, 2.0, 3.0]], 2, [[F, F, F]], [[0, 1]], [[F, F]]),
    ("capacity_equals_S", [[3.0, NAN, -INF]], 3, [[T, T, F]], [[0, 1, 2]], [[T, T, F]]),
    ("single_token", [[-INF]], 1, None, [[0]], [[T]]),
    (
        "two_rows_independent",
        [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]],
        2,
        None,
        [[2, 3], [0, 1]],
        [[T, T], [T, T]],
    ),
]


THRESHOLD_CASES = [
    ("first_come", [[1.0, -1.0, 2.0, 3.0, 0.0, 5.0]], 2, None, [[0, 2]], [[T, T]]),
    ("under_capacity", [[1.0, -1.0, 2.0, 3.0, 0.0, 5.0]], 4, None, [[0, 2, 3, 5]], [[T, T, T, T]]),
    ("pad_lowest_unrouted", [[1.0, -1.0, 2.0, 3.0, 0.0, 5.0]], 5, None, [[0, 1, 2, 3, 5]], [[T, F, T, T, T]]),
    ("zero_and_nan_not_routed", [[NAN, 1.0, -0.0, 0.0]], 2, None, [[0, 1]], [[F, T]]),
    ("drop_later", [[1.0, 1.0, 1.0, -1.0]], 2, None, [[0, 1]], [[T, T]]),
    ("inf", [[-INF, INF, 0.5]], 1, None, [[1]], [[T]]),
    ("valid_mask", [[1.0, 1.0, 1.0, 1.0]], 2, [[T, F, T, T]], [[0, 2]], [[T, T]]),
    ("valid_mask_padding", [[1.0, 1.0, -1.0, 1.0]], 3, [[F, T, T, F]], [[0, 1, 2]], [[F, T, F]]),
    ("none_routed", [[-1.0, 0.0, NAN]], 2, None, [[0, 1]], [[F, F]]),
    ("all_invalid", [[1.0, 2.0, 3.0]], 3, [[F, F, F]], [[0, 1, 2]], [[F, F, F]]),
    ("tiny_positive", [[-1.0, 1e-3, -1.0]], 1, None, [[1]], [[T]]),
    (
        "two_rows",
        [[-1.0, 2.0, -1.0, 2.0], [2.0, 2.0, 2.0, -1.0]],
        2,
        None,
        [[1, 3], [0, 1]],
        [[T, T], [T, T]],
    ),
]


def _case_inputs(logits, valid, dtype, device):
    x = torch.tensor(logits, dtype=torch.float32).to(dtype).to(device)
    v = None if valid is None else torch.tensor(valid, dtype=torch.bool, device=device)
    return x, v


ROUTE_HAND_CASES = [("topk_route", c) for c in TOPK_CASES] + [("threshold_route", c) for c in THRESHOLD_CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op_name,case", ROUTE_HAND_CASES, ids=[f"{o}-{c[0]}" for o, c in ROUTE_HAND_CASES])
def test_route_hand_cases(op_name, case, dtype, device):
    """Hand-written expected outputs check both the oracle and the op."""
    name, logits, C, valid, exp_idx, exp_mask = case
    op, ref = getattr(mod_ext, op_name), getattr(R, f"{op_name}_ref")
    x, v = _case_inputs(logits, valid, dtype, device)
    expected = (torch.tensor(exp_idx, dtype=torch.int64), torch.tensor(exp_mask, dtype=torch.bool))
    assert_routing_equal(ref(x.cpu(), C, to(v, "cpu")), expected, f"oracle {name}")
    out = op(x, C, v)
    assert out[0].device.type == device and out[1].device.type == device
    assert_routing_equal(out, expected, f"{op_name} {name}")


# ======================================================================================
# Routing vs the oracles
# ======================================================================================

ROUTE_SEQ_LENS = [1, 7, 83, 128]


def _route_cases(S, kind, dtype, seed):
    """Yields (ctx, logits_cpu, capacity, valid_cpu or None, layout)."""
    g = gen(seed)
    n = 0
    for B in (0, 1, 3):
        for C in capacities(S):
            for vk in VALID_KINDS:
                layout = LAYOUTS[n % len(LAYOUTS)]
                n += 1
                logits = make_logits(kind, B, S, dtype, g)
                valid = make_valid(vk, B, S, C, g)
                ctx = f"B={B} S={S} C={C} kind={kind} valid={vk} layout={layout} dtype={dtype}"
                yield ctx, logits, C, valid, layout


def _check_route(op, ref, device, S, kind, dtype, seed):
    for ctx, logits, C, valid, layout in _route_cases(S, kind, dtype, seed):
        _, lv = strided(logits.to(device), layout)
        vv = None if valid is None else strided(valid.to(device), layout)[1]
        expected = ref(lv.cpu(), C, to(vv, "cpu"))
        out = op(lv, C, vv)
        assert out[0].device.type == device
        assert_routing_equal(out, expected, f"{op.__name__} {ctx}")
        # The contract itself, independently of the oracle.
        idx, mask = out[0].cpu(), out[1].cpu()
        if idx.shape[0] > 0:
            assert bool((idx[:, 1:] > idx[:, :-1]).all()), f"{ctx}: indices not strictly ascending"
            assert int(idx.min()) >= 0 and int(idx.max()) < S, f"{ctx}: index out of range"
            v = torch.ones_like(lv.cpu(), dtype=torch.bool) if vv is None else vv.cpu()
            assert torch.equal(mask & ~v.gather(1, idx), torch.zeros_like(mask)), f"{ctx}: invalid token routed"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("S", ROUTE_SEQ_LENS)
@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=dtype_id)
def test_topk_route_matches_reference(dtype, S, kind, device):
    _check_route(mod_ext.topk_route, R.topk_route_ref, device, S, kind, dtype, seed=1000 + S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("S", ROUTE_SEQ_LENS)
@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=dtype_id)
def test_threshold_route_matches_reference(dtype, S, kind, device):
    _check_route(mod_ext.threshold_route, R.threshold_route_ref, device, S, kind, dtype, seed=2000 + S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["topk_route", "threshold_route"])
def test_route_mixed_strides(op_name, device):
    """Logits and valid with different non-contiguous layouts at once."""
    op, ref = getattr(mod_ext, op_name), getattr(R, op_name + "_ref")
    g = gen(7)
    B, S, C = 3, 50, 9
    big = make_logits("ties", B * 2, S * 3, torch.float32, g).to(device)
    logits = big[::2, 1::3]  # sliced in both dims
    valid = (torch.rand(S, B, generator=g) < 0.6).to(device).t()  # column-major
    expected = ref(logits.cpu(), C, valid.cpu())
    assert_routing_equal(op(logits, C, valid), expected, op_name)
    # valid broadcast along the batch (stride 0)
    v0 = (torch.rand(1, S, generator=g) < 0.5).to(device).expand(B, S)
    assert_routing_equal(op(logits, C, v0), ref(logits.cpu(), C, v0.cpu()), op_name + " expanded valid")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["topk_route", "threshold_route"])
def test_route_batch_zero(op_name, device):
    op = getattr(mod_ext, op_name)
    for valid in (None, torch.zeros(0, 5, dtype=torch.bool, device=device)):
        idx, mask = op(torch.zeros(0, 5, device=device), 3, valid)
        assert idx.shape == (0, 3) and idx.dtype == torch.int64 and idx.device.type == device
        assert mask.shape == (0, 3) and mask.dtype == torch.bool and mask.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=dtype_id)
def test_topk_route_deterministic(dtype, device):
    g = gen(11)
    logits = make_logits("ties", 4, 300, dtype, g).to(device)
    valid = (torch.rand(4, 300, generator=g) < 0.8).to(device)
    first = mod_ext.topk_route(logits, 37, valid)
    for _ in range(3):
        assert_routing_equal(mod_ext.topk_route(logits, 37, valid), first, "repeat")


@pytest.mark.parametrize("device", DEVICES)
def test_topk_route_does_not_modify_inputs(device):
    g = gen(12)
    logits = make_logits("special", 3, 40, torch.float32, g).to(device)
    valid = (torch.rand(3, 40, generator=g) < 0.5).to(device)
    l0, v0 = logits.clone(), valid.clone()
    mod_ext.topk_route(logits, 10, valid)
    mod_ext.threshold_route(logits, 10, valid)
    assert_bitwise_equal(logits, l0, "router_logits modified")
    assert torch.equal(valid, v0), "valid modified"


# ======================================================================================
# Larger cases and CUDA-only behaviour
# ======================================================================================


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["randn", "ties", "all_equal", "sparse_special", "narrow"])
@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=dtype_id)
def test_route_large(kind, dtype, device):
    g = gen(71)
    B, S, C = 3, 4096, 512
    if kind == "narrow":  # equal high bits: the radix select needs many passes
        logits = (1.0 + torch.randint(0, 64, (B, S), generator=g) * 2.0**-20).to(dtype)
    else:
        logits = make_logits(kind, B, S, dtype, g)
    for vk in (None, "random", "few"):
        valid = make_valid(vk, B, S, C, g)
        for cap in (C, 1, S, 4095, 513):
            ctx = f"large kind={kind} valid={vk} C={cap} dtype={dtype}"
            ld, vd = logits.to(device), to(valid, device)
            assert_routing_equal(mod_ext.topk_route(ld, cap, vd), R.topk_route_ref(logits, cap, valid), "topk " + ctx)
            assert_routing_equal(
                mod_ext.threshold_route(ld, cap, vd), R.threshold_route_ref(logits, cap, valid), "threshold " + ctx
            )


@pytest.mark.parametrize("device", DEVICES)
def test_route_very_long_rows(device):
    g = gen(72)
    B, S = 2, 70001
    C = mod_ext.capacity_for(S, 0.125)
    logits = make_logits("sparse_special", B, S, torch.float32, g)
    valid = torch.rand(B, S, generator=g) < 0.9
    for v in (None, valid):
        assert_routing_equal(
            mod_ext.topk_route(logits.to(device), C, to(v, device)), R.topk_route_ref(logits, C, v), "topk long"
        )
        assert_routing_equal(
            mod_ext.threshold_route(logits.to(device), C, to(v, device)),
            R.threshold_route_ref(logits, C, v),
            "threshold long",
        )


@requires_cuda
def test_cuda_ops_keep_device_and_stream():
    """Ops run on the current stream of the tensor's device; results are right when
    read after synchronising that stream."""
    g = gen(82)
    logits = torch.randn(4, 1000, generator=g)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ld = logits.cuda(non_blocking=False)
        idx, mask = mod_ext.topk_route(ld, 100)
    s.synchronize()
    assert_routing_equal((idx, mask), R.topk_route_ref(logits, 100), "topk on a side stream")


# ======================================================================================
# Property tests (hypothesis)
# ======================================================================================

ROUTE_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


ROUTE_DTYPE_ST = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


_POOLS = {
    "ties": [-1.0, -0.0, 0.0, 0.5, 1.0],
    "special": [NAN, INF, -INF, -0.0, 0.0, 1.0, -1.0, 2.0],
    "wide": [NAN, INF, -INF, -0.0, 0.0, 1e-3, -1e-3, 0.25, 1.0, -2.0, 3.0, 100.0, -100.0],
}


@st.composite
def routing_inputs(draw, max_B=4, max_S=40, dtypes=ROUTE_DTYPE_ST):
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


# ======================================================================================
# Errors (copied from tests/test_errors.py) and argument handling
# ======================================================================================


def _route(name):
    return getattr(mod_ext, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("capacity", [0, -1, -100, 9, 100])
def test_route_capacity_out_of_range(op_name, arg, capacity, device):
    logits = torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError, match=r"capacity must satisfy 1 <= capacity <= S = 8.*got " + str(capacity)):
        _route(op_name)(logits, capacity)
    with pytest.raises(RuntimeError, match="capacity"):  # also for an empty batch
        _route(op_name)(logits[:0], capacity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("shape", [(8,), (2, 8, 1), ()], ids=["1d", "3d", "0d"])
def test_route_logits_rank(op_name, arg, shape, device):
    with pytest.raises(RuntimeError, match=rf"{arg} must have shape \(B, S\)"):
        _route(op_name)(torch.randn(shape, device=device), 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float64, torch.uint8])
def test_route_logits_dtype(op_name, arg, dtype, device):
    logits = torch.ones(2, 8, device=device).to(dtype)
    with pytest.raises(RuntimeError, match=rf"{arg} must be float32, bfloat16 or float16"):
        _route(op_name)(logits, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64])
def test_route_valid_dtype(op_name, arg, dtype, device):
    logits = torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError, match="valid must be a bool tensor"):
        _route(op_name)(logits, 2, torch.ones(2, 8, device=device).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("shape", [(2, 7), (1, 8), (8,), (2, 8, 1), (8, 2)])
def test_route_valid_shape(op_name, arg, shape, device):
    logits = torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError, match=r"valid must have shape \(B, S\)"):
        _route(op_name)(logits, 2, torch.ones(shape, dtype=torch.bool, device=device))


@requires_cuda
@pytest.mark.parametrize("op_name,arg", ROUTERS)
def test_route_device_mismatch(op_name, arg):
    with pytest.raises(RuntimeError, match=rf"{arg} and valid must be on the same device"):
        _route(op_name)(torch.randn(2, 8, device="cuda"), 2, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=rf"{arg} and valid must be on the same device"):
        _route(op_name)(torch.randn(2, 8), 2, torch.ones(2, 8, dtype=torch.bool, device="cuda"))


def test_compiled_route_capacity_error_names_capacity():
    """The fake kernels used by torch.compile check capacity as well."""
    torch._dynamo.reset()
    f = torch.compile(lambda z: mod_ext.topk_route(z, 9), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="capacity"):
        f(torch.randn(2, 8))
    torch._dynamo.reset()


@pytest.mark.parametrize("op_name,arg", ROUTERS)
def test_route_valid_on_meta_device(op_name, arg):
    """A meta `valid` beside real logits (or the reverse) dispatches to the fake kernel,
    which used to return uninitialised indices; it must name the two arguments."""
    logits = torch.randn(2, 8)
    meta_valid = torch.empty(2, 8, dtype=torch.bool, device="meta")
    with pytest.raises(RuntimeError, match=rf"{arg} and valid must be on the same device"):
        _route(op_name)(logits, 2, meta_valid)
    with pytest.raises(RuntimeError, match=rf"{arg} and valid must be on the same device"):
        _route(op_name)(logits.to("meta"), 2, torch.ones(2, 8, dtype=torch.bool))
    # meta with meta is fine (shape propagation)
    idx, mask = _route(op_name)(logits.to("meta"), 3, meta_valid)
    assert idx.shape == (2, 3) and idx.dtype == torch.int64 and mask.dtype == torch.bool


@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("bad", [True, False, 2.0, "2", None])
def test_route_capacity_must_be_an_int(op_name, arg, bad):
    with pytest.raises(TypeError, match="capacity must be an int"):
        _route(op_name)(torch.randn(2, 8), bad)


@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("np_int", [np.int64, np.int32, np.int16, np.uint8])
def test_route_capacity_numpy_integers(op_name, arg, np_int):
    logits = make_logits("ties", 3, 20, torch.float32, gen(5))
    expected = _route(op_name)(logits, 7)
    assert_routing_equal(_route(op_name)(logits, np_int(7)), expected, f"{op_name} capacity={np_int.__name__}(7)")


@pytest.mark.parametrize("op_name,arg", ROUTERS)
def test_route_capacity_symbolic_compile_dynamic(op_name, arg):
    """capacity is a SymInt in the schema: a capacity derived from a symbolic sequence
    length compiles once for every S (an `int` schema argument would specialise it and
    recompile per S)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    op = _route(op_name)
    f = torch.compile(lambda z: op(z, z.shape[1] // 2), backend=cnt, dynamic=True, fullgraph=True)
    for S in (8, 10, 13, 20):
        z = make_logits("randn", 3, S, torch.float32, gen(S))
        assert_routing_equal(f(z), op(z, S // 2), f"compiled {op_name} S={S}")
    assert cnt.frame_count == 1, f"recompiled: {cnt.frame_count} frames for 4 sequence lengths"
    torch._dynamo.reset()


def test_route_capacity_symbolic_export():
    """torch.export with a dynamic sequence length keeps capacity = S // 4 symbolic (min
    8 so that PyTorch's own 0/1 size specialisation of the (B, capacity) outputs holds)."""

    class Route(torch.nn.Module):
        def forward(self, z):
            return mod_ext.topk_route(z, z.shape[1] // 4)

    S = torch.export.Dim("S", min=8, max=4096)
    ep = torch.export.export(Route(), (torch.randn(2, 16),), dynamic_shapes={"z": {1: S}})
    for s in (16, 40, 100):
        z = make_logits("ties", 2, s, torch.float32, gen(s))
        assert_routing_equal(ep.module()(z), mod_ext.topk_route(z, s // 4), f"exported S={s}")


def _route_opcheck_samples(device):
    g = gen(61)
    B, S, C = 2, 9, 4
    logits = torch.randn(B, S, generator=g).to(device)
    valid = (torch.rand(B, S, generator=g) < 0.6).to(device)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    return [
        ("topk_route", (logits, C, None)),
        ("topk_route", (logits, C, valid)),
        ("topk_route", (bf(logits), 1, None)),
        ("topk_route", (logits.t().contiguous().t().half(), S, valid)),
        ("topk_route", (logits[:0], 2, None)),
        ("threshold_route", (logits, C, None)),
        ("threshold_route", (logits.half(), C, valid)),
        ("threshold_route", (bf(logits), S, valid)),
    ]


_ROUTE_OPCHECK_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(_route_opcheck_samples("cpu"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(len(_ROUTE_OPCHECK_IDS)), ids=_ROUTE_OPCHECK_IDS)
def test_route_opcheck(sample, device):
    """torch.library.opcheck: schema (SymInt capacity), fake kernel, AOT dispatch."""
    name, args = _route_opcheck_samples(device)[sample]
    torch.library.opcheck(getattr(ops, name).default, args)


@requires_cuda
def test_cuda_route_matches_cpu_kernels():
    """The CUDA routing kernels give exactly what the CPU kernels give, on the same inputs."""
    g = gen(81)
    for S, C in [(1, 1), (7, 3), (83, 40), (600, 100), (1500, 1500)]:
        B = 3
        logits = make_logits("special", B, S, torch.float32, g)
        valid = torch.rand(B, S, generator=g) < 0.7
        for op in (mod_ext.topk_route, mod_ext.threshold_route):
            assert_routing_equal(op(logits.cuda(), C, valid.cuda()), op(logits, C, valid), f"{op.__name__} S={S}")


# ======================================================================================
# vmap: the vmapped dim is folded into B (no per-sample fallback loop)
# ======================================================================================


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,arg", ROUTERS)
@pytest.mark.parametrize("valid_dim", ["none", "batched", "unbatched", "batched_dim1"])
def test_route_vmap_matches_loop(op_name, arg, valid_dim, device):
    op = _route(op_name)
    g = gen(91)
    V, B, S, C = 4, 3, 17, 5
    logits = make_logits("special", V, B * S, torch.float32, g).reshape(V, B, S).to(device)
    vb = (torch.rand(V, B, S, generator=g) < 0.6).to(device)
    vu = (torch.rand(B, S, generator=g) < 0.6).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the slow-fallback warning would fail the test
        if valid_dim == "none":
            got = torch.vmap(lambda z: op(z, C))(logits)
            want = [op(logits[i], C) for i in range(V)]
        elif valid_dim == "batched":
            got = torch.vmap(lambda z, v: op(z, C, v))(logits, vb)
            want = [op(logits[i], C, vb[i]) for i in range(V)]
        elif valid_dim == "unbatched":
            got = torch.vmap(lambda z: op(z, C, vu))(logits)
            want = [op(logits[i], C, vu) for i in range(V)]
        else:  # vmapped dim of valid in the middle, logits along dim 2
            lt = logits.permute(1, 2, 0)
            got = torch.vmap(lambda z, v: op(z, C, v), in_dims=(2, 1))(lt, vb.transpose(0, 1))
            want = [op(logits[i], C, vb[i]) for i in range(V)]
    expected = (torch.stack([w[0] for w in want]), torch.stack([w[1] for w in want]))
    assert_routing_equal((got[0].reshape(V * B, C), got[1].reshape(V * B, C)),
                         (expected[0].reshape(V * B, C), expected[1].reshape(V * B, C)), f"vmap {op_name} {valid_dim}")
    assert got[0].shape == (V, B, C)
