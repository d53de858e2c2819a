"""Correctness of the four mod_ext ops (and their backward ops) against the plain-PyTorch
oracles in ``mod_ext.reference``, on every device the build supports.

* Hand-written cases with the expected outputs written out check the oracles too.
* Routing (indices, slot_mask) and gather must match the oracle exactly; scatter must
  match it bit for bit in every dtype (both compute in float32, float64 for float64,
  and round once).
* Gradients are compared with the autograd gradients of the oracle: exact where the
  math is one rounding per element, within dtype tolerance for the weight gradient
  (a dot product summed in another order).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mod_ext
from mod_ext import reference as R
from tests.helpers import (
    DATA_DTYPES,
    DEVICES,
    LAYOUTS,
    LOGIT_KINDS,
    ROUTE_DTYPES,
    VALID_KINDS,
    assert_bitwise_equal,
    assert_close,
    assert_routing_equal,
    capacities,
    dtype_id,
    gen,
    make_logits,
    make_valid,
    rand_indices,
    requires_cuda,
    strided,
    to,
)

ops = torch.ops.mod_ext
T, F = True, False
NAN, INF = float("nan"), float("inf")

# ======================================================================================
# Hand-written cases (expected outputs written out): they check the oracles as well.
# ======================================================================================

# (name, logits rows, capacity, valid rows or None, expected indices, expected slot_mask)
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

# (name, scores rows, capacity, valid rows or None, expected indices, expected slot_mask)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_hand_case(dtype, device):
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3).to(dtype)
    idx = torch.tensor([[3, 0], [1, 1]])  # unsorted and repeated indices are allowed
    expected = torch.tensor(
        [[[9, 10, 11], [0, 1, 2]], [[15, 16, 17], [15, 16, 17]]], dtype=torch.float32
    ).to(dtype)
    assert_bitwise_equal(R.gather_tokens_ref(x, idx), expected, "oracle")
    xd = x.to(device).requires_grad_()
    out = mod_ext.gather_tokens(xd, idx.to(device))
    assert_bitwise_equal(out, expected, "gather_tokens")
    (gx,) = torch.autograd.grad(out, xd, torch.ones_like(out))
    exp_gx = torch.zeros(2, 4, 3, dtype=dtype)
    exp_gx[0, 3] = 1
    exp_gx[0, 0] = 1
    exp_gx[1, 1] = 2  # repeated index: gradients accumulate
    assert_bitwise_equal(gx, exp_gx, "gather_tokens grad x")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_scatter_hand_case(dtype, device):
    x = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]], dtype=dtype)
    y = torch.tensor([[[10.0], [20.0]], [[-1.0], [8.0]]], dtype=dtype)
    idx = torch.tensor([[0, 2], [2, 1]])
    w = torch.tensor([[0.5, 2.0], [4.0, 0.0]], dtype=dtype)
    expected = torch.tensor([[[6.0], [2.0], [43.0]], [[4.0], [5.0], [2.0]]], dtype=dtype)
    assert_bitwise_equal(R.scatter_add_weighted_ref(x, y, idx, w), expected, "oracle")
    xd, yd, wd = (t.to(device).requires_grad_() for t in (x, y, w))
    out = mod_ext.scatter_add_weighted(xd, yd, idx.to(device), wd)
    assert_bitwise_equal(out, expected, "scatter_add_weighted")
    g = torch.tensor([[[1.0], [2.0], [3.0]], [[0.5], [0.25], [-1.0]]], dtype=dtype)
    gx, gy, gw = torch.autograd.grad(out, (xd, yd, wd), g.to(device))
    assert_bitwise_equal(gx, g, "grad x")  # identity
    # grad_y[b, j] = w[b, j] * g[b, idx[b, j]]; grad_w[b, j] = <g[b, idx[b, j]], y[b, j]>
    assert_bitwise_equal(gy, torch.tensor([[[0.5], [6.0]], [[-4.0], [0.0]]], dtype=dtype), "grad y")
    assert_bitwise_equal(gw, torch.tensor([[10.0, 60.0], [1.0, 2.0]], dtype=dtype), "grad weights")


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_rounds_once_bf16(device):
    """x + w*y is computed in float32 and rounded once: 1 + (1/3)*1.75 = 1.58333 rounds
    to 1.5859375 in bfloat16; rounding the product to bfloat16 first would give
    1.578125 (a tie rounded to even)."""
    x = torch.ones(1, 1, 1, dtype=torch.bfloat16)
    y = torch.full((1, 1, 1), 1.75, dtype=torch.bfloat16)
    w = torch.full((1, 1), 1 / 3, dtype=torch.float32)
    idx = torch.zeros(1, 1, dtype=torch.int64)
    expected = torch.full((1, 1, 1), 1.5859375, dtype=torch.bfloat16)
    assert_bitwise_equal(R.scatter_add_weighted_ref(x, y, idx, w), expected, "oracle")
    out = mod_ext.scatter_add_weighted(x.to(device), y.to(device), idx.to(device), w.to(device))
    assert_bitwise_equal(out, expected, "scatter_add_weighted")


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
# gather_tokens vs the oracle
# ======================================================================================

SD_PAIRS = list(itertools.product([1, 7, 83, 128], [1, 7, 83, 64]))


def _data(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_tokens_matches_reference(dtype, layout, device):
    g = gen(3000 + LAYOUTS.index(layout))
    n = 0
    for S, D in SD_PAIRS:
        for B in (0, 1, 3):
            for C in sorted({1, max(1, S // 3), S}):
                n += 1
                ascending = n % 2 == 0
                ctx = f"B={B} S={S} D={D} C={C} layout={layout} ascending={ascending} dtype={dtype}"
                xv = _data((B, S, D), dtype, g)
                iv = rand_indices(B, S, C, g, ascending=ascending)
                gv = _data((B, C, D), dtype, g)
                x_leaf, x = strided(xv.to(device), layout, requires_grad=True)
                _, idx = strided(iv.to(device), layout)
                _, go = strided(gv.to(device), layout)
                xr_leaf, xr = strided(xv, layout, requires_grad=True)
                _, idxr = strided(iv, layout)
                _, gor = strided(gv, layout)

                out = mod_ext.gather_tokens(x, idx)
                ref = R.gather_tokens_ref(xr, idxr)
                assert out.device.type == device
                assert out.is_contiguous(), f"{ctx}: output not contiguous"
                assert_bitwise_equal(out, ref, f"gather_tokens {ctx}")
                (gx,) = torch.autograd.grad(out, x_leaf, go)
                (gxr,) = torch.autograd.grad(ref, xr_leaf, gor)
                if layout == "expanded":  # the leaf sums over the broadcast batch
                    assert_close(gx, gxr, f"gather_tokens grad x {ctx}", scale=4)
                else:
                    assert_bitwise_equal(gx, gxr, f"gather_tokens grad x {ctx}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_tokens_repeated_indices(dtype, device):
    """Repeated indices are allowed in gather; the gradient accumulates."""
    g = gen(31)
    B, S, D, C = 3, 9, 17, 12
    xv = _data((B, S, D), dtype, g)
    iv = torch.randint(0, S, (B, C), generator=g)
    iv[:, 1] = iv[:, 0]
    gv = _data((B, C, D), dtype, g)
    x = xv.to(device).requires_grad_()
    out = mod_ext.gather_tokens(x, iv.to(device))
    xr = xv.clone().requires_grad_()
    ref = R.gather_tokens_ref(xr, iv)
    assert_bitwise_equal(out, ref, "gather_tokens repeated")
    (gx,) = torch.autograd.grad(out, x, gv.to(device))
    (gxr,) = torch.autograd.grad(ref, xr, gv)
    exact = torch.zeros(B, S, D, dtype=torch.float64).scatter_add_(
        1, iv.unsqueeze(-1).expand(-1, -1, D), gv.double()
    )
    assert_close(gx, gxr, "grad x vs oracle", scale=3)
    assert_close(gx.double(), exact, "grad x vs float64 sum", dtype=dtype, scale=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_tokens_empty(dtype, device):
    for B, S, D, C in [(0, 5, 4, 3), (2, 5, 0, 3), (2, 5, 4, 0), (0, 0, 4, 0)]:
        x = torch.randn(B, S, D, device=device).to(dtype).requires_grad_()
        idx = torch.zeros(B, C, dtype=torch.int64, device=device)
        out = mod_ext.gather_tokens(x, idx)
        assert out.shape == (B, C, D) and out.dtype == dtype and out.device.type == device
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert gx.shape == x.shape
        assert_bitwise_equal(gx, torch.zeros_like(x), f"grad of empty gather B={B} S={S} D={D} C={C}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_tokens_backward_op(dtype, device):
    """The backward op directly: grad_x[b, idx[b, j]] += grad_output[b, j]."""
    g = gen(32)
    for B, S, D, C in [(3, 11, 5, 4), (1, 1, 7, 1), (2, 83, 64, 83), (0, 4, 3, 2), (2, 10, 1030, 4)]:
        gv = _data((B, C, D), dtype, g)
        iv = rand_indices(B, S, C, g, ascending=False)
        out = ops.gather_tokens_backward(gv.to(device), iv.to(device), S)
        ref = torch.zeros(B, S, D, dtype=dtype).scatter_add_(1, iv.unsqueeze(-1).expand(-1, -1, D), gv)
        assert_bitwise_equal(out, ref, f"gather_tokens_backward B={B} S={S} D={D} C={C}")
        # non-contiguous grad_output
        gt = gv.to(device).transpose(0, 2).contiguous().transpose(0, 2)
        assert_bitwise_equal(ops.gather_tokens_backward(gt, iv.to(device), S), ref, "transposed grad_output")


# ======================================================================================
# scatter_add_weighted vs the oracle
# ======================================================================================


def _dot_scale(gv, iv, yv):
    """max over slots of sum_d |g[b, idx, d] * y[b, j, d]|: the size of the weight grad."""
    if yv.numel() == 0:
        return 1.0
    D = yv.shape[-1]
    gsel = gv.double().gather(1, iv.unsqueeze(-1).expand(-1, -1, D))
    return max(1.0, float((gsel.abs() * yv.double().abs()).sum(-1).max()))


def _check_scatter(device, dtype, w_dtype, layouts, B, S, D, C, g, ascending, ctx):
    lx, ly, li, lw, lg = layouts
    xv = _data((B, S, D), dtype, g)
    yv = _data((B, C, D), dtype, g)
    iv = rand_indices(B, S, C, g, ascending=ascending)
    wv = torch.rand(B, C, generator=g).to(w_dtype)
    gv = _data((B, S, D), dtype, g)

    x_leaf, x = strided(xv.to(device), lx, True)
    y_leaf, y = strided(yv.to(device), ly, True)
    _, idx = strided(iv.to(device), li)
    w_leaf, w = strided(wv.to(device), lw, True)
    _, go = strided(gv.to(device), lg)
    xr_leaf, xr = strided(xv, lx, True)
    yr_leaf, yr = strided(yv, ly, True)
    _, idxr = strided(iv, li)
    wr_leaf, wr = strided(wv, lw, True)
    _, gor = strided(gv, lg)

    out = mod_ext.scatter_add_weighted(x, y, idx, w)
    ref = R.scatter_add_weighted_ref(xr, yr, idxr, wr)
    assert out.device.type == device
    assert out.is_contiguous(), f"{ctx}: output not contiguous"
    assert_bitwise_equal(out, ref, f"scatter_add_weighted {ctx}")

    # Rows no slot points at are bit-identical to x.
    touched = torch.zeros(B, S, dtype=torch.bool).scatter_(1, idxr, True) if B else torch.zeros(0, S, dtype=torch.bool)
    untouched = ~touched
    assert_bitwise_equal(out.cpu()[untouched], xr.detach()[untouched], f"untouched rows {ctx}")

    gx, gy, gw = torch.autograd.grad(out, (x_leaf, y_leaf, w_leaf), go)
    gxr, gyr, gwr = torch.autograd.grad(ref, (xr_leaf, yr_leaf, wr_leaf), gor)
    if lx == "expanded":
        assert_close(gx, gxr, f"grad x {ctx}", scale=4)
    else:
        assert_bitwise_equal(gx, gxr, f"grad x {ctx}")
    if "expanded" in (ly, li, lw, lg):
        assert_close(gy, gyr, f"grad y {ctx}", scale=4)
    else:
        assert_bitwise_equal(gy, gyr, f"grad y {ctx}")
    # The weight gradient is a float32 dot product (float64 for float64 x) rounded to the
    # weights' dtype.
    if w_dtype in (torch.bfloat16, torch.float16):
        tol_dtype = w_dtype
    else:
        tol_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = _dot_scale(gor.detach(), idxr, yr.detach()) * (B if lw == "expanded" else 1)
    assert_close(gw, gwr, f"grad weights {ctx}", dtype=tol_dtype, scale=scale)


# (x dtype, weights dtype): weights in x's dtype, and float32 weights (what mod_block
# passes) for low-precision and float64 x.
_SCATTER_DTYPES = [(d, d) for d in DATA_DTYPES] + [
    (d, torch.float32) for d in (torch.bfloat16, torch.float16, torch.float64)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "dtype,w_dtype", _SCATTER_DTYPES, ids=[f"{dtype_id(a)}-w_{dtype_id(b)}" for a, b in _SCATTER_DTYPES]
)
def test_scatter_add_weighted_matches_reference(dtype, w_dtype, layout, device):
    g = gen(4000 + LAYOUTS.index(layout))
    n = 0
    for S, D in SD_PAIRS:
        for B in (0, 1, 3):
            for C in sorted({1, max(1, S // 3), S}):
                n += 1
                ascending = n % 2 == 1
                ctx = f"B={B} S={S} D={D} C={C} layout={layout} w={w_dtype} ascending={ascending} dtype={dtype}"
                _check_scatter(device, dtype, w_dtype, (layout,) * 5, B, S, D, C, g, ascending, ctx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_scatter_add_weighted_mixed_strides(dtype, device):
    g = gen(41)
    combos = [
        ("transposed", "sliced", "expanded", "transposed", "sliced"),
        ("sliced", "expanded", "transposed", "sliced", "contiguous"),
        ("expanded", "transposed", "sliced", "contiguous", "expanded"),
        ("contiguous", "contiguous", "contiguous", "expanded", "transposed"),
    ]
    for layouts in combos:
        for B, S, D, C in [(3, 19, 13, 6), (2, 64, 64, 64)]:
            ctx = f"layouts={layouts} B={B} S={S} D={D} C={C} dtype={dtype}"
            _check_scatter(device, dtype, dtype, layouts, B, S, D, C, g, False, ctx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
def test_scatter_add_weighted_other_weight_dtypes(weights_dtype, device):
    """weights may have another float dtype than x: the math is float32 either way."""
    g = gen(42)
    for dtype in (torch.float32, torch.bfloat16):
        ctx = f"x={dtype} weights={weights_dtype}"
        _check_scatter(device, dtype, weights_dtype, ("contiguous",) * 5, 3, 20, 9, 7, g, True, ctx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_scatter_untouched_rows_bit_identical(dtype, device):
    """Special values (NaN payloads, -0.0, inf, subnormals) on rows no slot points at come
    back bit for bit; rows with weight 0 are still recomputed (x + 0*y) like the oracle."""
    B, S, D = 2, 6, 5
    info = torch.finfo(dtype)
    x = torch.randn(B, S, D).to(dtype)
    x[:, 1, 0] = float("nan")
    x[:, 1, 1] = -0.0
    x[:, 1, 2] = float("inf")
    x[:, 1, 3] = info.smallest_normal / 4  # subnormal
    x[:, 1, 4] = -float("inf")
    x[:, 4] = -0.0
    xi = x.view(torch.int16 if info.bits == 16 else (torch.int32 if info.bits == 32 else torch.int64))
    xi[:, 3, 0] = xi[:, 1, 0] | 1  # NaN with a different payload
    idx = torch.tensor([[0, 2, 5], [5, 0, 2]])
    y = torch.randn(B, 3, D).to(dtype)
    w = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]]).to(dtype)
    expected = R.scatter_add_weighted_ref(x, y, idx, w)
    out = mod_ext.scatter_add_weighted(x.to(device), y.to(device), idx.to(device), w.to(device))
    assert_bitwise_equal(out, expected, "scatter vs oracle")
    for s in (1, 3, 4):
        assert_bitwise_equal(out[:, s], x[:, s].to(device), f"untouched row {s}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_scatter_add_weighted_empty(dtype, device):
    for B, S, D, C in [(0, 5, 4, 3), (2, 5, 0, 3), (2, 5, 4, 0)]:
        x = torch.randn(B, S, D).to(dtype).to(device).requires_grad_()
        y = torch.randn(B, C, D).to(dtype).to(device).requires_grad_()
        w = torch.rand(B, C).to(dtype).to(device).requires_grad_()
        idx = torch.arange(C).expand(B, C).contiguous().to(device)
        out = mod_ext.scatter_add_weighted(x, y, idx, w)
        assert out.shape == (B, S, D) and out.dtype == dtype and out.device.type == device
        assert_bitwise_equal(out, x, f"empty scatter B={B} S={S} D={D} C={C}")
        gx, gy, gw = torch.autograd.grad(out, (x, y, w), torch.ones_like(out))
        assert gx.shape == x.shape and gy.shape == y.shape and gw.shape == w.shape
        assert_bitwise_equal(gy, torch.zeros_like(y), "grad y")
        assert_bitwise_equal(gw, torch.zeros_like(w), "grad weights")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_scatter_add_weighted_backward_op(dtype, device):
    """The backward op directly, against a float64 computation."""
    g = gen(43)
    for B, S, D, C in [(3, 11, 5, 4), (1, 1, 7, 1), (2, 83, 64, 83), (2, 40, 300, 7), (2, 10, 1030, 4)]:
        go = _data((B, S, D), dtype, g)
        y = _data((B, C, D), dtype, g)
        iv = rand_indices(B, S, C, g, ascending=False)
        w = torch.randn(B, C, generator=g).to(dtype)
        gy, gw = ops.scatter_add_weighted_backward(go.to(device), y.to(device), iv.to(device), w.to(device))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gsel = go.gather(1, iv.unsqueeze(-1).expand(-1, -1, D))
        exp_gy = (w.to(acc).unsqueeze(-1) * gsel.to(acc)).to(dtype)
        exp_gw = (gsel.double() * y.double()).sum(-1)
        ctx = f"B={B} S={S} D={D} C={C} dtype={dtype}"
        assert_bitwise_equal(gy, exp_gy, f"grad_y {ctx}")
        assert gw.dtype == dtype
        assert_close(gw.double(), exp_gw, f"grad_weights {ctx}", dtype=dtype, scale=_dot_scale(go, iv, y))


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_add_weighted_deterministic(device):
    g = gen(44)
    B, S, D, C = 4, 300, 257, 100
    x, go = _data((B, S, D), torch.float32, g).to(device), _data((B, S, D), torch.float32, g).to(device)
    y = _data((B, C, D), torch.float32, g).to(device).requires_grad_()
    w = torch.rand(B, C, generator=g).to(device).requires_grad_()
    idx = rand_indices(B, S, C, g).to(device)
    results = []
    for _ in range(3):
        out = mod_ext.scatter_add_weighted(x, y, idx, w)
        results.append((out, *torch.autograd.grad(out, (y, w), go)))
    for r in results[1:]:
        for a, b, name in zip(r, results[0], ("out", "grad y", "grad weights")):
            assert_bitwise_equal(a, b, f"repeat {name}")


# ======================================================================================
# gradcheck (float64)
# ======================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_gather_tokens(device):
    g = gen(51)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    for idx in (torch.tensor([[0, 2, 5], [4, 1, 3]]), torch.tensor([[1, 1, 5], [0, 0, 0]])):
        assert torch.autograd.gradcheck(
            lambda x_: mod_ext.gather_tokens(x_, idx.to(device)), (x,), eps=1e-6, atol=1e-8
        )


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_scatter_add_weighted(device):
    g = gen(52)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(2, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    idx = torch.tensor([[0, 2, 5], [4, 1, 3]], device=device)
    assert torch.autograd.gradcheck(
        lambda x_, y_, w_: mod_ext.scatter_add_weighted(x_, y_, idx, w_), (x, y, w), eps=1e-6, atol=1e-8
    )
    # non-contiguous inputs too
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, y_, w_: mod_ext.scatter_add_weighted(x_, y_, idx.t().contiguous().t(), w_),
        (xt, y, w),
        eps=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["topk", "threshold"])
def test_gradcheck_mod_block(routing, device):
    g = gen(53)
    B, S, D, C = 2, 8, 4, 3
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    rw = torch.randn(D, generator=g, dtype=torch.float64)
    rb = torch.tensor(0.1, dtype=torch.float64)
    lin_w = torch.randn(D, D, generator=g, dtype=torch.float64) / 2
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, -2:] = False
    # gradcheck perturbs inputs by 1e-6: routing must not flip, so logits must be well
    # separated from each other (top-k) and from 0 (threshold).
    z = (x @ rw + rb).float()
    gaps = z.sort(dim=1).values.diff(dim=1).abs()
    assert float(gaps.min()) > 1e-4 and float(z.abs().min()) > 1e-4, "bad seed: near-tied logits"

    x, rw, rb, lin_w = (t.to(device).requires_grad_() for t in (x, rw, rb, lin_w))
    valid = valid.to(device)
    for act in ("sigmoid", "identity"):

        def fn(x_, rw_, rb_, lw_):
            def block(xs, pos, mask):
                return torch.tanh(xs @ lw_) * (1 + pos.unsqueeze(-1).to(xs.dtype) / S)

            return mod_ext.mod_block(
                x_, rw_, block, capacity=C, router_bias=rb_, valid=valid, routing=routing, router_activation=act
            ).output

        assert torch.autograd.gradcheck(fn, (x, rw, rb, lin_w), eps=1e-6, atol=1e-7)


# ======================================================================================
# torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch)
# ======================================================================================


def _opcheck_samples(device):
    g = gen(61)
    B, S, D, C = 2, 9, 5, 4
    logits = torch.randn(B, S, generator=g).to(device)
    valid = (torch.rand(B, S, generator=g) < 0.6).to(device)
    idx = rand_indices(B, S, C, g).to(device)
    x = torch.randn(B, S, D, generator=g).to(device)
    y = torch.randn(B, C, D, generator=g).to(device)
    w = torch.rand(B, C, generator=g).to(device)
    go_c = torch.randn(B, C, D, generator=g).to(device)
    go_s = torch.randn(B, S, D, generator=g).to(device)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
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
        ("gather_tokens", (x, idx)),
        ("gather_tokens", (rg(x), idx)),
        ("gather_tokens", (rg(bf(x)), idx)),
        ("gather_tokens", (rg(x.double()), idx.flip(1))),
        ("gather_tokens", (rg(x[:0]), idx[:0])),
        ("gather_tokens_backward", (go_c, idx, S)),
        ("gather_tokens_backward", (bf(go_c), idx, S)),
        ("gather_tokens_backward", (go_c.transpose(1, 2).contiguous().transpose(1, 2), idx, S + 3)),
        ("scatter_add_weighted", (x, y, idx, w)),
        ("scatter_add_weighted", (rg(x), rg(y), idx, rg(w))),
        ("scatter_add_weighted", (rg(bf(x)), rg(bf(y)), idx, rg(w))),
        ("scatter_add_weighted", (rg(x.half()), rg(y.half()), idx, rg(w.half()))),
        ("scatter_add_weighted", (rg(x.double()), rg(y.double()), idx, rg(w.double()))),
        ("scatter_add_weighted", (x, rg(y), idx, w)),  # only y requires grad
        ("scatter_add_weighted", (x, y, idx, rg(w))),  # only weights require grad
        ("scatter_add_weighted", (rg(x[:0]), rg(y[:0]), idx[:0], rg(w[:0]))),
        ("scatter_add_weighted_backward", (go_s, y, idx, w)),
        ("scatter_add_weighted_backward", (bf(go_s), bf(y), idx, w)),
        ("scatter_add_weighted_backward", (go_s.double(), y.double(), idx, w.double())),
    ]


_OPCHECK_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(_opcheck_samples("cpu"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(len(_OPCHECK_IDS)), ids=_OPCHECK_IDS)
def test_opcheck(sample, device):
    name, args = _opcheck_samples(device)[sample]
    torch.library.opcheck(getattr(ops, name).default, args)


# ======================================================================================
# Larger cases (multi-chunk scans, multi-pass radix select on CUDA; cheap on the CPU)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_scatter_large(dtype, device):
    g = gen(73)
    B, S, D, C = 3, 4096, 256, 512
    ctx = f"large B={B} S={S} D={D} C={C} dtype={dtype}"
    _check_scatter(device, dtype, torch.float32, ("contiguous",) * 5, B, S, D, C, g, True, ctx)
    _check_scatter(device, dtype, dtype, ("transposed", "sliced", "contiguous", "sliced", "transposed"), B, S, D, C, g, False, ctx)
    xv = _data((B, S, D), dtype, g)
    iv = rand_indices(B, S, C, g)
    gv = _data((B, C, D), dtype, g)
    x = xv.to(device).requires_grad_()
    out = mod_ext.gather_tokens(x, iv.to(device))
    assert_bitwise_equal(out, R.gather_tokens_ref(xv, iv), "gather " + ctx)
    (gx,) = torch.autograd.grad(out, x, gv.to(device))
    xr = xv.clone().requires_grad_()
    (gxr,) = torch.autograd.grad(R.gather_tokens_ref(xr, iv), xr, gv)
    assert_bitwise_equal(gx, gxr, "gather grad " + ctx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gather_scatter_wide_rows(dtype, device):
    """D larger than one thread block (and not a multiple of 32), many rows."""
    g = gen(74)
    for B, S, D, C in [(2, 10, 1030, 4), (70, 9, 33, 3)]:
        ctx = f"wide B={B} S={S} D={D} C={C} dtype={dtype}"
        _check_scatter(device, dtype, torch.float32, ("contiguous",) * 5, B, S, D, C, g, False, ctx)
        xv = _data((B, S, D), dtype, g)
        iv = rand_indices(B, S, C, g, ascending=False)
        assert_bitwise_equal(mod_ext.gather_tokens(xv.to(device), iv.to(device)), R.gather_tokens_ref(xv, iv), ctx)


# ======================================================================================
# CUDA-only behaviour
# ======================================================================================


@requires_cuda
def test_cuda_matches_cpu_kernels():
    """The CUDA kernels give exactly what the CPU kernels give, on the same inputs."""
    g = gen(81)
    for S, D, C in [(1, 1, 1), (7, 7, 3), (83, 83, 40), (600, 64, 100), (1500, 33, 1500)]:
        B = 3
        logits = make_logits("special", B, S, torch.float32, g)
        valid = torch.rand(B, S, generator=g) < 0.7
        for op in (mod_ext.topk_route, mod_ext.threshold_route):
            assert_routing_equal(op(logits.cuda(), C, valid.cuda()), op(logits, C, valid), f"{op.__name__} S={S}")
        x, y = torch.randn(B, S, D, generator=g), torch.randn(B, C, D, generator=g)
        idx = rand_indices(B, S, C, g)
        w = torch.rand(B, C, generator=g)
        assert_bitwise_equal(mod_ext.gather_tokens(x.cuda(), idx.cuda()), mod_ext.gather_tokens(x, idx), "gather")
        assert_bitwise_equal(
            mod_ext.scatter_add_weighted(x.cuda(), y.cuda(), idx.cuda(), w.cuda()),
            mod_ext.scatter_add_weighted(x, y, idx, w),
            "scatter",
        )


@requires_cuda
def test_cuda_out_of_range_indices_do_not_crash():
    """Documented CUDA behaviour (no host sync to raise): an out-of-range slot reads zeros
    in gather and writes nothing in scatter; the in-range slots are unaffected."""
    x = torch.randn(2, 5, 4, device="cuda")
    idx = torch.tensor([[0, 7], [-1, 3]], device="cuda")
    out = mod_ext.gather_tokens(x, idx)
    torch.cuda.synchronize()
    assert_bitwise_equal(out[0, 0], x[0, 0], "in-range gather")
    assert_bitwise_equal(out[1, 1], x[1, 3], "in-range gather")
    assert_bitwise_equal(out[0, 1], torch.zeros(4, device="cuda"), "out-of-range gather reads zeros")
    assert_bitwise_equal(out[1, 0], torch.zeros(4, device="cuda"), "negative gather reads zeros")
    y = torch.ones(2, 2, 4, device="cuda")
    w = torch.ones(2, 2, device="cuda")
    s = mod_ext.scatter_add_weighted(x, y, idx, w)
    torch.cuda.synchronize()
    expected = x.clone()
    expected[0, 0] += 1
    expected[1, 3] += 1
    assert_bitwise_equal(s, expected, "scatter with out-of-range slots")


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


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_gradgradcheck(device):
    """Gradients of gradients are exact (gradient penalties, Hessian-vector products),
    not silently None."""
    g = gen(21)
    B, S, D, C = 2, 7, 3, 3
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(B, C, D, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.rand(B, C, generator=g, dtype=torch.float64).to(device).requires_grad_()
    idx = rand_indices(B, S, C, g).to(device)
    dup = torch.tensor([[1, 1, 5], [0, 0, 0]], device=device)
    assert torch.autograd.gradgradcheck(lambda t: mod_ext.gather_tokens(t, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda t: mod_ext.gather_tokens(t, dup), (x,))
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: mod_ext.scatter_add_weighted(a, b, idx, c), (x, y, w)
    )
    # the mixed second derivative d(grad_w)/dy is the output gradient itself
    out = mod_ext.scatter_add_weighted(x, y, idx, w)
    (gw,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    (gy,) = torch.autograd.grad(gw.sum(), y)
    assert gy.abs().sum() > 0
