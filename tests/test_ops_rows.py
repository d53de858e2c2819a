"""The rows family (csrc/cpu/rows.cpp, csrc/cuda/rows.cu): gather_tokens,
scatter_add_weighted (out of place and in place) and their backward ops, against the
plain-PyTorch oracles in ``mod_ext.reference``, on every device the build supports.

* gather must match the oracle exactly; scatter bit for bit in every dtype (both compute
  in float32, float64 for float64, and round once); rows no slot points at are x itself.
* Gradients are compared with the autograd gradients of the oracle: exact where the math
  is one rounding per element, within dtype tolerance for the weight gradient (a dot
  product summed in another order). gradcheck / gradgradcheck in float64; autograd is
  registered in C++ (csrc/autograd.cpp).
* The in-place scatter updates x in place, bumps its version counter like PyTorch's
  in-place ops, refuses grad-requiring inputs in grad mode, and compiles (fullgraph).
* Bad arguments raise errors that name the argument (copied from tests/test_errors.py).
* vmap folds the vmapped dim into B (no per-sample fallback loop).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mod_ext
from mod_ext import reference as R
from tests.helpers import (
    DATA_DTYPES,
    DEVICES,
    LAYOUTS,
    assert_bitwise_equal,
    assert_close,
    dtype_id,
    gen,
    rand_indices,
    requires_cuda,
    strided,
)

ops = torch.ops.mod_ext

# ======================================================================================
# Hand-written cases (expected outputs written out): they check the oracles as well.
# ======================================================================================


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
# gradcheck (float64) and double backward
# ======================================================================================


# ======================================================================================
# Incoming gradients with their own strides. The CPU backward kernels read grad_output
# in place (no .contiguous() copy): stride 0 (the gradient of .sum(), broadcasts),
# non-unit inner strides (transposed, sliced). Compared with the oracle's autograd.
# ======================================================================================

GRAD_LAYOUTS = ["contiguous", "sum", "expand_slots", "expand_inner", "transposed", "sliced_inner", "sliced_rows"]


def _grad_like(shape, dtype, layout, g, device):
    """A gradient of ``shape`` laid out as ``layout`` (values from ``g``)."""
    B, R, D = shape
    if layout == "contiguous":
        return _data(shape, dtype, g).to(device)
    if layout == "sum":  # what out.sum().backward() hands the op: all strides 0
        return _data((), dtype, g).to(device).expand(shape)
    if layout == "expand_slots":  # stride 0 over the rows, dense rows
        return _data((B, 1, D), dtype, g).to(device).expand(shape)
    if layout == "expand_inner":  # inner stride 0, arbitrary outer strides
        return _data((B, R, 1), dtype, g).to(device).expand(shape)
    if layout == "transposed":  # inner stride B * R
        return _data((D, R, B), dtype, g).to(device).permute(2, 1, 0)
    if layout == "sliced_inner":  # inner stride 2
        return _data((B, R, 2 * D), dtype, g).to(device)[:, :, ::2]
    if layout == "sliced_rows":  # dense rows, row stride 3 * D
        return _data((B, 3 * R, D), dtype, g).to(device)[:, 1::3]
    raise ValueError(layout)


# (B, S, D, C): small; D > 256 (the kernels work in chunks of 256); and a grad_x / output
# of >= 4 MiB in float32 / float64, which the CPU gather backward writes with
# non-temporal stores.
_GRAD_SHAPES = [(3, 11, 5, 4), (2, 9, 300, 5), (2, 2048, 288, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_gather_tokens_backward_strided_grad(dtype, layout, device):
    g = gen(71)
    for B, S, D, C in _GRAD_SHAPES:
        for repeats in (False, True):
            xv = _data((B, S, D), dtype, g)
            if repeats:  # repeated positions accumulate in slot order
                iv = torch.randint(0, max(1, S // 3), (B, C), generator=g)
            else:
                iv = rand_indices(B, S, C, g, ascending=False)
            go = _grad_like((B, C, D), dtype, layout, g, device)
            x = xv.to(device, copy=True).requires_grad_()
            xr = xv.clone().requires_grad_()
            (gx,) = torch.autograd.grad(mod_ext.gather_tokens(x, iv.to(device)), x, go)
            (gxr,) = torch.autograd.grad(R.gather_tokens_ref(xr, iv), xr, go.cpu())
            ctx = f"{layout} B={B} S={S} D={D} C={C} repeats={repeats}"
            assert gx.is_contiguous(), ctx
            # The same bits as with a contiguous copy of the gradient; the oracle's bits
            # too without repeats (with repeats, a half-precision sum rounds differently).
            dense = ops.gather_tokens_backward(go.contiguous(), iv.to(device), S)
            assert_bitwise_equal(gx, dense, f"grad x vs contiguous grad {ctx}")
            assert_bitwise_equal(ops.gather_tokens_backward(go, iv.to(device), S), dense, f"op {ctx}")
            if repeats:
                assert_close(gx, gxr, f"grad x {ctx}", scale=C)
            else:
                assert_bitwise_equal(gx, gxr, f"grad x {ctx}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
def test_scatter_add_weighted_backward_strided_grad(dtype, layout, device):
    g = gen(72)
    for B, S, D, C in _GRAD_SHAPES:
        xv, yv = _data((B, S, D), dtype, g), _data((B, C, D), dtype, g)
        wv = torch.rand(B, C, generator=g).to(dtype)
        iv = rand_indices(B, S, C, g, ascending=False)
        go = _grad_like((B, S, D), dtype, layout, g, device)
        leaves = [t.to(device, copy=True).requires_grad_() for t in (xv, yv, wv)]
        ref_leaves = [t.clone().requires_grad_() for t in (xv, yv, wv)]
        gx, gy, gw = torch.autograd.grad(mod_ext.scatter_add_weighted(leaves[0], leaves[1], iv.to(device), leaves[2]),
                                         leaves, go)
        gxr, gyr, gwr = torch.autograd.grad(R.scatter_add_weighted_ref(ref_leaves[0], ref_leaves[1], iv, ref_leaves[2]),
                                            ref_leaves, go.cpu())
        ctx = f"{layout} B={B} S={S} D={D} C={C}"
        assert_bitwise_equal(gx, gxr, f"grad x {ctx}")
        assert_bitwise_equal(gy, gyr, f"grad y {ctx}")
        tol_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else (
            torch.float64 if dtype == torch.float64 else torch.float32)
        scale = _dot_scale(go.detach().cpu(), iv, yv) if B else 1.0
        assert_close(gw, gwr, f"grad weights {ctx}", dtype=tol_dtype, scale=scale)
        gy2, gw2 = ops.scatter_add_weighted_backward(go, yv.to(device), iv.to(device), wv.to(device))
        assert_bitwise_equal(gy2, gy, f"op grad y {ctx}")
        assert_bitwise_equal(gw2, gw, f"op grad weights {ctx}")


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
@pytest.mark.parametrize("routing", ["topk", "causal"])
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
    # separated from each other (top-k) and from 0 (causal).
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


# ======================================================================================
# Larger cases and CUDA-only behaviour
# ======================================================================================


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


# ======================================================================================
# Property tests (hypothesis)
# ======================================================================================


DATA_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


DATA_DTYPE_ST = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@st.composite
def data_inputs(draw):
    B = draw(st.integers(0, 3))
    S = draw(st.integers(1, 24))
    D = draw(st.integers(0, 20))
    C = draw(st.integers(0, S))
    dtype = draw(DATA_DTYPE_ST)
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


# ======================================================================================
# The in-place scatter (scatter_add_weighted_)
# ======================================================================================


SHAPES = [(1, 1, 1, 1), (3, 7, 5, 3), (2, 83, 7, 83), (4, 128, 64, 16)]


def _inputs(B, S, D, C, dtype, seed, device):
    g = gen(seed)
    x = torch.randn(B, S, D, generator=g).to(dtype)
    y = torch.randn(B, C, D, generator=g).to(dtype)
    idx = rand_indices(B, S, C, g)
    w = torch.rand(B, C, generator=g)
    return x.to(device), y.to(device), idx.to(device), w.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,S,D,C", SHAPES)
def test_inplace_matches_oracle(B, S, D, C, dtype, device):
    x, y, idx, w = _inputs(B, S, D, C, dtype, 7, device)
    expected = R.scatter_add_weighted_ref(x.cpu(), y.cpu(), idx.cpu(), w.cpu())
    x_ptr = x.data_ptr()
    out = mod_ext.scatter_add_weighted_(x, y, idx, w)
    assert out is x and x.data_ptr() == x_ptr, "must update x in place and return it"
    assert_bitwise_equal(x.cpu(), expected, "in-place vs oracle")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_non_contiguous_x(device):
    x, y, idx, w = _inputs(2, 9, 6, 4, torch.float32, 3, device)
    expected = R.scatter_add_weighted_ref(x.cpu(), y.cpu(), idx.cpu(), w.cpu())
    storage = x.transpose(1, 2).contiguous()  # (B, D, S) memory
    xt = storage.transpose(1, 2)  # (B, S, D) view, not contiguous
    out = mod_ext.scatter_add_weighted_(xt, y, idx, w)
    assert out is xt
    assert_bitwise_equal(storage.transpose(1, 2).cpu(), expected, "non-contiguous in-place")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_aliasing_rejected(device):
    x, y, idx, w = _inputs(2, 8, 4, 3, torch.float32, 1, device)
    with pytest.raises(RuntimeError, match="y must not share memory with x"):
        mod_ext.scatter_add_weighted_(x, x[:, :3], idx, w)
    with pytest.raises(RuntimeError, match="overlapping memory"):
        mod_ext.scatter_add_weighted_(x[:1].expand(2, 8, 4), y, idx, w)
    with pytest.raises(RuntimeError, match="y must have the same dtype"):
        mod_ext.scatter_add_weighted_(x, y.double(), idx, w)


def test_inplace_index_checks_cpu():
    x, y, idx, w = _inputs(1, 8, 4, 3, torch.float32, 2, "cpu")
    before = x.clone()
    bad = idx.clone()
    bad[0, 2] = 8
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, S\)"):
        mod_ext.scatter_add_weighted_(x, y, bad, w)
    bad[0, 2] = bad[0, 1]
    with pytest.raises(RuntimeError, match="unique"):
        mod_ext.scatter_add_weighted_(x, y, bad, w)
    assert_bitwise_equal(x, before, "a rejected call must leave x unchanged")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_opcheck(device):
    x, y, idx, w = _inputs(2, 11, 5, 4, torch.float32, 4, device)
    torch.library.opcheck(torch.ops.mod_ext.scatter_add_weighted_.default, (x, y, idx, w))


def test_inplace_bumps_version_counter():
    x, y, idx, w = _inputs(2, 9, 4, 3, torch.float32, 8, "cpu")
    v0 = x._version
    mod_ext.scatter_add_weighted_(x, y, idx, w)
    assert x._version == v0 + 1, f"version {x._version}, want {v0 + 1}"
    view = x[:, 1:]  # a view shares (and bumps) its base's counter
    mod_ext.scatter_add_weighted_(view, y, idx.clamp(max=7), w)
    assert x._version == v0 + 2 and view._version == v0 + 2
    with torch.no_grad():
        mod_ext.scatter_add_weighted_(x, y, idx, w)
    assert x._version == v0 + 3, "no_grad in-place ops bump the version as well"


def test_inplace_overwriting_saved_tensor_fails_at_backward():
    """x saved for backward by an earlier graph, then overwritten in place: backward
    gives autograd's usual error instead of a silently wrong gradient."""
    x, y, idx, w = _inputs(2, 9, 4, 3, torch.float32, 9, "cpu")
    a = torch.randn(2, 9, 4, requires_grad=True)
    loss = (a * x).sum()  # saves x
    with torch.no_grad():
        mod_ext.scatter_add_weighted_(x, y, idx, w)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # grad mode on, nothing requires grad: allowed, and caught the same way
    x2 = x.clone()
    loss2 = (a * x2).sum()
    mod_ext.scatter_add_weighted_(x2, y, idx, w)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss2.backward()


def test_inplace_no_error_on_fresh_tensor_under_no_grad():
    x, y, idx, w = _inputs(2, 9, 4, 3, torch.float32, 10, "cpu")
    expected = R.scatter_add_weighted_ref(x, y, idx, w)
    a = torch.randn(2, 9, 4, requires_grad=True)
    loss = (a * x).sum()
    with torch.no_grad():
        fresh = x.clone()
        mod_ext.scatter_add_weighted_(fresh, y, idx, w)
    loss.backward()  # x itself was not touched
    assert_bitwise_equal(a.grad, x, "grad of a")
    assert_bitwise_equal(fresh, expected, "fresh in-place result")


@pytest.mark.parametrize("which", ["x", "y", "weights"])
def test_inplace_refuses_grad_in_grad_mode(which):
    x, y, idx, w = _inputs(2, 9, 4, 3, torch.float32, 11, "cpu")
    args = {"x": x, "y": y, "weights": w}
    args[which] = args[which].clone().requires_grad_()
    if which == "x":
        args["x"] = args["x"] * 1.0  # a non-leaf that requires grad (a leaf would refuse anyway)
    before = args["x"].detach().clone()
    with pytest.raises(RuntimeError, match=rf"scatter_add_weighted_ is not differentiable.*{which} requires grad"):
        mod_ext.scatter_add_weighted_(args["x"], args["y"], idx, args["weights"])
    assert_bitwise_equal(args["x"].detach(), before, "a refused call leaves x unchanged")
    # the same call under no_grad / inference_mode runs
    expected = R.scatter_add_weighted_ref(before, args["y"].detach(), idx, args["weights"].detach())
    with torch.no_grad():
        xs = args["x"].detach().clone()
        mod_ext.scatter_add_weighted_(xs, args["y"], idx, args["weights"])
    assert_bitwise_equal(xs, expected, "under no_grad")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_inference_mode(device):
    x, y, idx, w = _inputs(2, 9, 4, 3, torch.float32, 12, device)
    expected = R.scatter_add_weighted_ref(x.cpu(), y.cpu(), idx.cpu(), w.cpu())
    normal = x.clone()
    with torch.inference_mode():
        inf = x.clone()  # an inference tensor (no version counter)
        mod_ext.scatter_add_weighted_(inf, y, idx, w)
        v0 = normal._version
        mod_ext.scatter_add_weighted_(normal, y, idx, w)  # a normal tensor inside inference mode
    assert_bitwise_equal(inf, expected, "inference tensor")
    assert_bitwise_equal(normal, expected, "normal tensor in inference mode")
    assert normal._version == v0 + 1


def test_inplace_compiled_fullgraph():
    """torch.compile of the in-place op traces with fullgraph=True (functionalised), and
    the input is mutated like in eager mode."""
    torch._dynamo.reset()
    x, y, idx, w = _inputs(2, 11, 5, 4, torch.float32, 13, "cpu")
    expected = R.scatter_add_weighted_ref(x, y, idx, w)

    def f(x, y, idx, w):
        mod_ext.scatter_add_weighted_(x, y, idx, w)
        return x * 2

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        with torch.no_grad():
            xc = x.clone()
            got = compiled(xc, y, idx, w)
        assert_bitwise_equal(xc, expected, f"{backend}: input mutated in place")
        assert_bitwise_equal(got, expected * 2, f"{backend}: output")
    torch._dynamo.reset()


# ======================================================================================
# torch.library.opcheck (schema, fake kernel, C++ autograd registration, AOT dispatch)
# ======================================================================================


def _rows_opcheck_samples(device):
    g = gen(61)
    B, S, D, C = 2, 9, 5, 4
    idx = rand_indices(B, S, C, g).to(device)
    x = torch.randn(B, S, D, generator=g).to(device)
    y = torch.randn(B, C, D, generator=g).to(device)
    w = torch.rand(B, C, generator=g).to(device)
    go_c = torch.randn(B, C, D, generator=g).to(device)
    go_s = torch.randn(B, S, D, generator=g).to(device)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    return [
        ("gather_tokens", (x, idx)),
        ("gather_tokens", (rg(x), idx)),
        ("gather_tokens", (rg(bf(x)), idx)),
        ("gather_tokens", (rg(x.double()), idx.flip(1))),
        ("gather_tokens", (rg(x[:0]), idx[:0])),
        ("gather_tokens_backward", (go_c, idx, S)),
        ("gather_tokens_backward", (rg(go_c), idx, S)),
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
        ("scatter_add_weighted_backward", (rg(go_s), rg(y), idx, rg(w))),
        ("scatter_add_weighted_backward", (bf(go_s), bf(y), idx, w)),
        ("scatter_add_weighted_backward", (go_s.double(), y.double(), idx, w.double())),
        ("scatter_add_weighted_", (x.clone(), y, idx, w)),
        ("scatter_add_weighted_", (bf(x), bf(y), idx, w)),
    ]


_ROWS_OPCHECK_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(_rows_opcheck_samples("cpu"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(len(_ROWS_OPCHECK_IDS)), ids=_ROWS_OPCHECK_IDS)
def test_rows_opcheck(sample, device):
    name, args = _rows_opcheck_samples(device)[sample]
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_skips_unneeded_gradients(device):
    """Only the gradients an input needs are computed (needs_input_grad), and they are
    the same as when all are needed."""
    g = gen(14)
    B, S, D, C = 2, 9, 4, 3
    x = torch.randn(B, S, D, generator=g).to(device)
    y = torch.randn(B, C, D, generator=g).to(device)
    w = torch.rand(B, C, generator=g).to(device)
    idx = rand_indices(B, S, C, g).to(device)
    go = torch.randn(B, S, D, generator=g).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    gx, gy, gw = torch.autograd.grad(mod_ext.scatter_add_weighted(leaves[0], leaves[1], idx, leaves[2]), leaves, go)
    for i, name in enumerate(("x", "y", "weights")):
        only = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, y, w))]
        out = mod_ext.scatter_add_weighted(only[0], only[1], idx, only[2])
        (gi,) = torch.autograd.grad(out, [only[i]], go)
        assert_bitwise_equal(gi, (gx, gy, gw)[i], f"grad {name} alone")
    with torch.no_grad():
        out = mod_ext.scatter_add_weighted(leaves[0], leaves[1], idx, leaves[2])
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_rows_vmap_matches_loop(device):
    """torch.vmap over every rows op, with batched and unbatched arguments and vmapped
    dims not in front, equals a Python loop, and warns nothing (no slow fallback).
    (torch.func.grad / vjp of these ops is not supported: PyTorch refuses C++
    autograd::Functions under functorch transforms; ordinary autograd through vmap is.)"""
    g = gen(92)
    V, B, S, D, C = 3, 2, 9, 5, 4
    x = torch.randn(V, B, S, D, generator=g).to(device)
    y = torch.randn(V, B, C, D, generator=g).to(device)
    w = torch.rand(V, B, C, generator=g).to(device)
    idx = torch.stack([rand_indices(B, S, C, g) for _ in range(V)]).to(device)
    go_c = torch.randn(V, B, C, D, generator=g).to(device)
    go_s = torch.randn(V, B, S, D, generator=g).to(device)
    stack = lambda outs: torch.stack(list(outs))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cases = [
            ("gather", torch.vmap(mod_ext.gather_tokens)(x, idx), stack(mod_ext.gather_tokens(x[i], idx[i]) for i in range(V))),
            ("gather x unbatched", torch.vmap(lambda i: mod_ext.gather_tokens(x[0], i))(idx),
             stack(mod_ext.gather_tokens(x[0], idx[i]) for i in range(V))),
            ("gather in_dims=(2, 1)", torch.vmap(mod_ext.gather_tokens, in_dims=(2, 1))(x.movedim(0, 2), idx.movedim(0, 1)),
             stack(mod_ext.gather_tokens(x[i], idx[i]) for i in range(V))),
            ("gather backward", torch.vmap(lambda a, i: ops.gather_tokens_backward(a, i, S))(go_c, idx),
             stack(ops.gather_tokens_backward(go_c[i], idx[i], S) for i in range(V))),
            ("scatter", torch.vmap(mod_ext.scatter_add_weighted)(x, y, idx, w),
             stack(mod_ext.scatter_add_weighted(x[i], y[i], idx[i], w[i]) for i in range(V))),
            ("scatter idx unbatched", torch.vmap(lambda a, b, c: mod_ext.scatter_add_weighted(a, b, idx[0], c))(x, y, w),
             stack(mod_ext.scatter_add_weighted(x[i], y[i], idx[0], w[i]) for i in range(V))),
        ]
        gy, gw = torch.vmap(ops.scatter_add_weighted_backward)(go_s, y, idx, w)
        cases += [
            ("scatter backward grad_y", gy, stack(ops.scatter_add_weighted_backward(go_s[i], y[i], idx[i], w[i])[0] for i in range(V))),
            ("scatter backward grad_w", gw, stack(ops.scatter_add_weighted_backward(go_s[i], y[i], idx[i], w[i])[1] for i in range(V))),
        ]
        # autograd through the vmapped forward (recorded on the folded tensors)
        yl, wl = y.clone().requires_grad_(), w.clone().requires_grad_()
        loss = torch.vmap(lambda a, b, i, c: mod_ext.gather_tokens(mod_ext.scatter_add_weighted(a, b, i, c), i))(
            x, yl, idx, wl).square().sum()
        vgy, vgw = torch.autograd.grad(loss, (yl, wl))
    for i in range(V):
        yi, wi = y[i].clone().requires_grad_(), w[i].clone().requires_grad_()
        li = mod_ext.gather_tokens(mod_ext.scatter_add_weighted(x[i], yi, idx[i], wi), idx[i]).square().sum()
        gyi, gwi = torch.autograd.grad(li, (yi, wi))
        assert_close(vgy[i], gyi, f"grad y through vmap, sample {i}")
        assert_close(vgw[i], gwi, f"grad w through vmap, sample {i}", scale=10)
    for name, got, want in cases:
        assert_bitwise_equal(got, want, f"vmap {name}")





# ======================================================================================
# Errors (copied from tests/test_errors.py)
# ======================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_gather_bad_x(device):
    idx = torch.zeros(2, 3, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match=r"x must have shape \(B, S, D\)"):
        mod_ext.gather_tokens(torch.randn(2, 5, device=device), idx)
    with pytest.raises(RuntimeError, match=r"x must have shape \(B, S, D\)"):
        mod_ext.gather_tokens(torch.randn(2, 5, 4, 1, device=device), idx)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        mod_ext.gather_tokens(torch.ones(2, 5, 4, dtype=torch.int64, device=device), idx)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_bad_indices(device):
    x = torch.randn(2, 5, 4, device=device)
    for dtype in (torch.float32, torch.int32, torch.bool):
        with pytest.raises(RuntimeError, match="indices must be int64"):
            mod_ext.gather_tokens(x, torch.zeros(2, 3, device=device).to(dtype))
    for shape in [(3,), (2, 3, 1)]:
        with pytest.raises(RuntimeError, match=r"indices must have shape \(B, C\)"):
            mod_ext.gather_tokens(x, torch.zeros(shape, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match=r"indices must have shape \(B, C\) with B = 2"):
        mod_ext.gather_tokens(x, torch.zeros(3, 2, dtype=torch.int64, device=device))


@pytest.mark.parametrize("bad", [-1, 5, 100, -(2**40)])
def test_gather_indices_out_of_range_cpu(bad):
    x = torch.randn(2, 5, 4)
    idx = torch.tensor([[0, 1, 2], [3, 4, 0]])
    idx[1, 1] = bad
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, S\) = \[0, 5\), got " + str(bad)):
        mod_ext.gather_tokens(x, idx)
    with pytest.raises(RuntimeError, match="indices must lie in"):  # even when D = 0
        mod_ext.gather_tokens(torch.randn(2, 5, 0), idx)
    with pytest.raises(RuntimeError, match="indices must lie in"):
        ops.gather_tokens_backward(torch.randn(2, 3, 4), idx, 5)


def test_gather_backward_bad_args():
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="seq_len"):
        ops.gather_tokens_backward(torch.randn(2, 3, 4), idx, -1)
    with pytest.raises(RuntimeError, match="indices"):
        ops.gather_tokens_backward(torch.randn(2, 4, 4), idx, 5)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.gather_tokens_backward(torch.randn(2, 3), idx, 5)


def _scatter_args(device, B=2, S=6, D=4, C=3):
    x = torch.randn(B, S, D, device=device)
    y = torch.randn(B, C, D, device=device)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]], device=device)[:B, :C]
    w = torch.rand(B, C, device=device)
    return x, y, idx, w


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_bad_x(device):
    x, y, idx, w = _scatter_args(device)
    with pytest.raises(RuntimeError, match=r"x must have shape \(B, S, D\)"):
        mod_ext.scatter_add_weighted(x[0], y, idx, w)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        mod_ext.scatter_add_weighted(x.long(), y.long(), idx, w)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_bad_y(device):
    x, y, idx, w = _scatter_args(device)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        with pytest.raises(RuntimeError, match=r"y must have the same dtype as x"):
            mod_ext.scatter_add_weighted(x, y.to(dtype), idx, w)
    with pytest.raises(RuntimeError, match=r"y must have shape \(B, C, D\)"):
        mod_ext.scatter_add_weighted(x, y[..., :3], idx, w)  # D mismatch
    with pytest.raises(RuntimeError, match=r"y must have shape \(B, C, D\)"):
        mod_ext.scatter_add_weighted(x, y[:1], idx, w)  # B mismatch
    with pytest.raises(RuntimeError, match=r"y must have shape \(B, C, D\)"):
        mod_ext.scatter_add_weighted(x, y[..., 0], idx, w)  # rank


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_bad_indices(device):
    x, y, idx, w = _scatter_args(device)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        mod_ext.scatter_add_weighted(x, y, idx.float(), w)
    with pytest.raises(RuntimeError, match=r"indices must have shape \(B, C\)"):
        mod_ext.scatter_add_weighted(x, y, idx[:, :2], w)  # C mismatch with y
    with pytest.raises(RuntimeError, match=r"indices must have shape \(B, C\)"):
        mod_ext.scatter_add_weighted(x, y, idx[:1], w)  # B mismatch
    with pytest.raises(RuntimeError, match=r"indices must have shape \(B, C\)"):
        mod_ext.scatter_add_weighted(x, y, idx.flatten(), w)  # rank


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_bad_weights(device):
    x, y, idx, w = _scatter_args(device)
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, C\)"):
        mod_ext.scatter_add_weighted(x, y, idx, w[:, :2])
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, C\)"):
        mod_ext.scatter_add_weighted(x, y, idx, w.t())
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, C\)"):
        mod_ext.scatter_add_weighted(x, y, idx, w.flatten())
    with pytest.raises(RuntimeError, match="weights must be a floating-point tensor"):
        mod_ext.scatter_add_weighted(x, y, idx, torch.ones_like(w, dtype=torch.int64))


@pytest.mark.parametrize("bad", [-1, 6, 1000])
def test_scatter_indices_out_of_range_cpu(bad):
    x, y, idx, w = _scatter_args("cpu")
    idx = idx.clone()
    idx[0, 1] = bad
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, S\) = \[0, 6\), got " + str(bad)):
        mod_ext.scatter_add_weighted(x, y, idx, w)
    with pytest.raises(RuntimeError, match="indices must lie in"):
        ops.scatter_add_weighted_backward(x, y, idx, w)


def test_scatter_duplicate_indices_cpu():
    x, y, idx, w = _scatter_args("cpu")
    idx = torch.tensor([[0, 2, 5], [4, 3, 4]])
    with pytest.raises(RuntimeError, match=r"indices must be unique within each row; row 1 repeats position 4"):
        mod_ext.scatter_add_weighted(x, y, idx, w)
    # the same position in different rows is fine
    mod_ext.scatter_add_weighted(x, y, torch.tensor([[0, 2, 5], [0, 2, 5]]), w)


@requires_cuda
def test_gather_device_mismatch():
    with pytest.raises(RuntimeError, match="x and indices must be on the same device"):
        mod_ext.gather_tokens(torch.randn(2, 5, 4, device="cuda"), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="x and indices must be on the same device"):
        mod_ext.gather_tokens(torch.randn(2, 5, 4), torch.zeros(2, 3, dtype=torch.int64, device="cuda"))


@requires_cuda
def test_scatter_device_mismatch():
    x, y, idx, w = _scatter_args("cuda")
    with pytest.raises(RuntimeError, match="x and y must be on the same device"):
        mod_ext.scatter_add_weighted(x, y.cpu(), idx, w)
    with pytest.raises(RuntimeError, match="x and indices must be on the same device"):
        mod_ext.scatter_add_weighted(x, y, idx.cpu(), w)
    with pytest.raises(RuntimeError, match="x and weights must be on the same device"):
        mod_ext.scatter_add_weighted(x, y, idx, w.cpu())
    with pytest.raises(RuntimeError, match="must be on the same device"):
        mod_ext.scatter_add_weighted(x.cpu(), y, idx, w)


@requires_cuda
def test_cuda_rows_match_cpu_kernels():
    """The CUDA row kernels give exactly what the CPU kernels give, on the same inputs."""
    g = gen(81)
    for S, D, C in [(1, 1, 1), (7, 7, 3), (83, 83, 40), (600, 64, 100), (1500, 33, 1500)]:
        B = 3
        x, y = torch.randn(B, S, D, generator=g), torch.randn(B, C, D, generator=g)
        idx = rand_indices(B, S, C, g)
        w = torch.rand(B, C, generator=g)
        assert_bitwise_equal(mod_ext.gather_tokens(x.cuda(), idx.cuda()), mod_ext.gather_tokens(x, idx), "gather")
        assert_bitwise_equal(
            mod_ext.scatter_add_weighted(x.cuda(), y.cuda(), idx.cuda(), w.cuda()),
            mod_ext.scatter_add_weighted(x, y, idx, w),
            "scatter",
        )


# ======================================================================================
# The eager fast path: mod_ext.gather_tokens / scatter_add_weighted(_) call the typed
# operator handle from mod_ext._C, except while dynamo traces and when __torch_function__
# (a subclass or a TorchFunctionMode) is involved, where torch.ops.mod_ext.*.default is
# called so those see the op.
# ======================================================================================

_FAST = {
    "gather_tokens": "_fast_gather_tokens",
    "scatter_add_weighted": "_fast_scatter_add_weighted",
    "scatter_add_weighted_": "_fast_scatter_add_weighted_",
}


def _rows_args(op, dtype=torch.float32, requires_grad=False):
    g = gen(81)
    B, S, D, C = 2, 9, 6, 4
    x = _data((B, S, D), dtype, g)
    idx = rand_indices(B, S, C, g, ascending=False)
    if op == "gather_tokens":
        return [x.requires_grad_(requires_grad), idx]
    y, w = _data((B, C, D), dtype, g), torch.rand(B, C, generator=g).to(dtype)
    if op == "scatter_add_weighted":
        return [x.requires_grad_(requires_grad), y.requires_grad_(requires_grad), idx, w.requires_grad_(requires_grad)]
    return [x, y, idx, w]


def _call(op, args):
    return getattr(mod_ext, op)(*args)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls of each fast entry point."""
    counts = {op: 0 for op in _FAST}
    for op, attr in _FAST.items():
        real = getattr(mod_ext.ops, attr)

        def counting(*a, _real=real, _op=op):
            counts[_op] += 1
            return _real(*a)

        monkeypatch.setattr(mod_ext.ops, attr, counting)
    return counts


@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", list(_FAST))
def test_fast_path_bit_identical_to_op_overload(op, dtype, fast_calls):
    grad = op != "scatter_add_weighted_"
    args = _rows_args(op, dtype, requires_grad=grad)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    out = _call(op, args)
    assert fast_calls[op] == 1
    ref = getattr(ops, op).default(*ref_args)
    if op == "scatter_add_weighted_":
        assert out is args[0] and ref is None
        assert_bitwise_equal(args[0], ref_args[0], op)
        return
    assert_bitwise_equal(out, ref, op)
    assert out.requires_grad and type(out.grad_fn) is type(ref.grad_fn)
    go = _data(out.shape, dtype, gen(82))
    leaves = [a for a in args if a.requires_grad]
    ref_leaves = [a for a in ref_args if a.requires_grad]
    for got, want in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, ref_leaves, go)):
        assert_bitwise_equal(got, want, f"{op} grad")


@pytest.mark.parametrize("op", list(_FAST))
def test_fast_path_non_tensor_argument_same_error(op, fast_calls):
    args = _rows_args(op)
    args[0] = args[0].tolist()
    with pytest.raises(Exception) as fast:
        _call(op, args)
    with pytest.raises(Exception) as slow:
        getattr(ops, op).default(*args)
    assert type(fast.value) is type(slow.value) and str(fast.value) == str(slow.value)


@pytest.mark.parametrize("op", list(_FAST))
def test_fast_path_not_taken_with_torch_function_subclass(op, fast_calls):
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    args = _rows_args(op)
    want = [a.clone() for a in args]
    args[0] = args[0].as_subclass(Logged)
    _call(op, args)
    assert fast_calls[op] == 0
    assert getattr(ops, op).default in seen
    if op == "scatter_add_weighted_":
        ops.scatter_add_weighted_.default(*want)
        assert_bitwise_equal(args[0].as_subclass(torch.Tensor), want[0], op)


@pytest.mark.parametrize("op", list(_FAST))
def test_fast_path_not_taken_under_torch_function_mode(op, fast_calls):
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    args = _rows_args(op)
    with Mode():
        _call(op, args)
    assert fast_calls[op] == 0
    assert seen == [getattr(ops, op).default]


@pytest.mark.parametrize("op", list(_FAST))
def test_fast_path_reaches_dispatch_modes_and_fake_tensors(op, fast_calls):
    """The fast path enters the dispatcher: TorchDispatchMode and FakeTensorMode see it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    args = _rows_args(op)
    with Mode():
        _call(op, args)
    assert fast_calls[op] == 1 and getattr(ops, op).default in seen
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) for a in _rows_args(op)]
        out = _call(op, args)
    assert fast_calls[op] == 2
    assert out.shape == (args[0].shape if op != "gather_tokens" else (2, 4, 6))


@pytest.mark.parametrize("op", list(_FAST))
def test_fast_path_not_taken_while_compiling(op, fast_calls):
    """dynamo must see torch.ops.mod_ext.<op>.default: one graph (fullgraph) holding it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda *a: _call(op, list(a)), backend=backend, fullgraph=True)
    args = _rows_args(op)
    want = [a.clone() for a in args]
    out = fn(*args)
    assert fast_calls[op] == 0
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert getattr(ops, op).default in targets
    ref = getattr(mod_ext, op)(*want)
    assert_bitwise_equal(out, ref, op)


def test_forward_ad_still_refused():
    """No input requires grad, but a forward-mode tangent is not silently dropped."""
    import torch.autograd.forward_ad as fwAD

    x, idx = _rows_args("gather_tokens")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            mod_ext.gather_tokens(dual, idx)
