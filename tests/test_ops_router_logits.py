"""The router_logits family (csrc/cpu/router_logits.cpp, csrc/cuda/router_logits.cu,
backward in csrc/autograd.cpp): z = x @ weight (+ bias) in float32 (float64 for float64
x), against the oracle ``mod_ext.reference.router_logits_ref``.

* float32 x: bit-identical to ``torch.matmul(x.to(torch.float32), weight.to(torch.float32))
  + bias.float().reshape(())`` (the layer's expression), any strides.
* bfloat16 / float16 x: within float32 rounding of the oracle (another summation order).
* Gradients in x.dtype / weight.dtype / bias.dtype, against the oracle's autograd;
  gradcheck and gradgradcheck in float64; opcheck; errors that name the argument; vmap.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mod_ext  # noqa: F401
from mod_ext.ops import router_logits  # not (yet) re-exported by mod_ext/__init__.py
from mod_ext import reference as R
from tests.helpers import DEVICES, LAYOUTS, assert_bitwise_equal, assert_close, dtype_id, gen, requires_cuda, strided

ops = torch.ops.mod_ext
X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1), (2, 7, 83), (3, 83, 7), (1, 7, 1), (2, 5, 1030), (0, 4, 3), (2, 0, 3), (2, 3, 0)]
BIASES = ["none", "scalar", "one", "float64"]


def _bias(kind, device):
    return {
        "none": None,
        "scalar": torch.tensor(0.375, device=device),
        "one": torch.tensor([-1.25], device=device),
        "float64": torch.tensor(0.1, dtype=torch.float64, device=device),
    }[kind]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
def test_router_logits_matches_reference(dtype, layout, device):
    g = gen(100 + LAYOUTS.index(layout))
    for B, S, D in SHAPES:
        for bk in BIASES:
            xv = torch.randn(B, S, D, generator=g).to(dtype)
            wv = torch.randn(D, generator=g)
            b = _bias(bk, device)
            _, x = strided(xv.to(device), layout)
            out = router_logits(x, wv.to(device), b)
            ctx = f"B={B} S={S} D={D} bias={bk} layout={layout} dtype={dtype}"
            assert out.dtype == _acc(dtype) and out.shape == (B, S) and out.device.type == device, ctx
            assert out.is_contiguous(), ctx
            ref = R.router_logits_ref(x.cpu(), wv, None if b is None else b.cpu())
            if dtype in (torch.float32, torch.float64):
                assert_bitwise_equal(out, ref, ctx)  # the same at::matmul
            else:
                scale = max(1.0, float((x.cpu().double().abs() * wv.double().abs()).sum(-1).max())) if out.numel() else 1.0
                assert_close(out, ref, ctx, dtype=torch.float32, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_fp32_bit_exact_vs_layer_expression(device):
    """Bit-identical to what mod_block computed before, for contiguous and strided x."""
    g = gen(101)
    for B, S, D in [(4, 256, 128), (1, 7, 83), (3, 83, 1)]:
        x = torch.randn(B, S, D, generator=g).to(device)
        w = torch.randn(D, generator=g).to(device)
        for b in (None, torch.tensor(0.3, device=device), torch.tensor([2.5], device=device)):
            for xv in (x, x.transpose(0, 1).contiguous().transpose(0, 1), x[:, :, :].flip(1)):
                expected = torch.matmul(xv.to(torch.float32), w.to(torch.float32))
                if b is not None:
                    expected = expected + b.float().reshape(())
                assert_bitwise_equal(router_logits(xv, w, b), expected, f"B={B} S={S} D={D}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_router_logits_gradients_vs_reference(dtype, w_dtype, device):
    g = gen(102)
    B, S, D = 3, 19, 37
    xv = torch.randn(B, S, D, generator=g).to(dtype)
    wv = torch.randn(D, generator=g).to(w_dtype)
    bv = torch.tensor([0.5], dtype=w_dtype)
    go = torch.randn(B, S, generator=g, dtype=_acc(dtype))
    for layout in ("contiguous", "transposed", "sliced"):
        x_leaf, x = strided(xv.to(device), layout, True)
        w, b = wv.to(device).requires_grad_(), bv.to(device).requires_grad_()
        xr_leaf, xr = strided(xv, layout, True)
        wr, br = wv.clone().requires_grad_(), bv.clone().requires_grad_()
        gx, gw, gb = torch.autograd.grad(router_logits(x, w, b), (x_leaf, w, b), go.to(device))
        gxr, gwr, gbr = torch.autograd.grad(R.router_logits_ref(xr, wr, br), (xr_leaf, wr, br), go)
        ctx = f"x={dtype} w={w_dtype} layout={layout}"
        assert gx.dtype == dtype and gw.dtype == w_dtype and gb.dtype == w_dtype and gb.shape == (1,), ctx
        assert_bitwise_equal(gx, gxr, "grad x " + ctx)  # one product per element, rounded once
        scale = float((xv.double().abs() * go.double().abs().unsqueeze(-1)).sum((0, 1)).max())
        tol = w_dtype if w_dtype != torch.float32 or dtype == torch.float64 else torch.float32
        assert_close(gw, gwr, "grad weight " + ctx, dtype=tol if tol != torch.float64 or dtype == torch.float64 else torch.float32, scale=scale)
        assert_close(gb, gbr, "grad bias " + ctx, dtype=w_dtype if w_dtype != torch.float64 else _acc(dtype), scale=float(go.abs().sum()))


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_needs_input_grad(device):
    """Only the gradients that inputs need are returned; each equals the full result."""
    g = gen(103)
    x = torch.randn(2, 5, 4, generator=g).to(device)
    w = torch.randn(4, generator=g).to(device)
    b = torch.tensor(0.2, device=device)
    go = torch.randn(2, 5, generator=g).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    full = torch.autograd.grad(router_logits(*leaves), leaves, go)
    for i in range(3):
        only = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, w, b))]
        (gi,) = torch.autograd.grad(router_logits(*only), [only[i]], go)
        assert_bitwise_equal(gi, full[i], f"grad {i} alone")
    xl = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(router_logits(xl, w), [xl], go)  # no bias
    assert_bitwise_equal(gx, full[0], "grad x without bias")


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_gradcheck_and_double_backward(device):
    g = gen(104)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(1, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(router_logits, (x, w, b))
    assert torch.autograd.gradcheck(lambda a, c: router_logits(a.transpose(0, 1), c), (x, w))
    assert torch.autograd.gradgradcheck(router_logits, (x, w, b))
    # the mixed second derivative is not silently zero: d/dx <grad_w, v> = grad * v
    z = router_logits(x, w, b)
    (gw,) = torch.autograd.grad(z.square().sum(), w, create_graph=True)
    (gx,) = torch.autograd.grad(gw.sum(), x)
    assert gx.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_double_backward_low_precision(device):
    """bfloat16 x with create_graph=True uses differentiable formulas: its second
    derivative matches the oracle's (not silently wrong)."""
    g = gen(105)
    x = torch.randn(2, 6, 8, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    w = torch.randn(8, generator=g).to(device).requires_grad_()
    xr, wr = x.detach().cpu().clone().requires_grad_(), w.detach().cpu().clone().requires_grad_()
    (gw,) = torch.autograd.grad(router_logits(x, w).square().sum(), w, create_graph=True)
    (gwr,) = torch.autograd.grad(R.router_logits_ref(xr, wr).square().sum(), wr, create_graph=True)
    (gx,) = torch.autograd.grad(gw.sum(), x)
    (gxr,) = torch.autograd.grad(gwr.sum(), xr)
    assert_close(gx, gxr, "d(grad_w)/dx", dtype=torch.bfloat16, scale=10)


def _opcheck_samples(device):
    g = gen(106)
    x = torch.randn(2, 7, 5, generator=g).to(device)
    w = torch.randn(5, generator=g).to(device)
    b = torch.tensor([0.25], device=device)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    return [
        (x, w, None),
        (x, w, b),
        (rg(x), rg(w), rg(b)),
        (rg(x.bfloat16()), rg(w), rg(b)),
        (rg(x.half()), w, None),
        (rg(x.double()), rg(w.double()), rg(b.double().reshape(()))),
        (rg(x).transpose(0, 1), rg(w.bfloat16()), None),
        (x[:0], w, b),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(8))
def test_router_logits_opcheck(sample, device):
    torch.library.opcheck(ops.router_logits.default, _opcheck_samples(device)[sample])


def test_router_logits_compiles_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    f = torch.compile(lambda a, c: router_logits(a, c).sigmoid().sum(), fullgraph=True, backend="aot_eager")
    loss = f(x, w)
    gx, gw = torch.autograd.grad(loss, (x, w))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gxr, gwr = torch.autograd.grad(router_logits(xr, wr).sigmoid().sum(), (xr, wr))
    assert_bitwise_equal(gx, gxr, "compiled grad x")
    assert_close(gw, gwr, "compiled grad weight")
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_errors(device):
    x = torch.randn(2, 5, 4, device=device)
    w = torch.randn(4, device=device)
    with pytest.raises(RuntimeError, match=r"x must have shape \(B, S, D\)"):
        router_logits(x[0], w)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        router_logits(x.long(), w)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(D,\) = \(4,\)"):
        router_logits(x, w[:3])
    with pytest.raises(RuntimeError, match=r"weight must have shape \(D,\)"):
        router_logits(x, w.reshape(4, 1))
    with pytest.raises(RuntimeError, match="weight must be a floating-point tensor"):
        router_logits(x, w.long())
    with pytest.raises(RuntimeError, match="bias must be None or a tensor with one element"):
        router_logits(x, w, torch.zeros(2, device=device))
    with pytest.raises(RuntimeError, match="bias must be a floating-point tensor"):
        router_logits(x, w, torch.zeros(1, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="x and weight must be on the same device"):
        router_logits(x, w.to("meta"))
    with pytest.raises(RuntimeError, match="x and bias must be on the same device"):
        router_logits(x, w, torch.zeros(1, device="meta"))


@requires_cuda
def test_router_logits_device_mismatch_cuda():
    x = torch.randn(2, 5, 4, device="cuda")
    with pytest.raises(RuntimeError, match="x and weight must be on the same device"):
        router_logits(x, torch.randn(4))
    with pytest.raises(RuntimeError, match="x and bias must be on the same device"):
        router_logits(x, torch.randn(4, device="cuda"), torch.zeros(1))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_router_logits_cuda_low_precision_deterministic(dtype):
    g = gen(107)
    x = torch.randn(4, 300, 257, generator=g).to(dtype).cuda()
    w = torch.randn(257, generator=g).cuda()
    first = router_logits(x, w)
    for _ in range(3):
        assert_bitwise_equal(router_logits(x, w), first, "repeat")


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_vmap_matches_loop(device):
    g = gen(108)
    V, B, S, D = 3, 2, 7, 5
    x = torch.randn(V, B, S, D, generator=g).to(device)
    w = torch.randn(V, D, generator=g).to(device)
    b = torch.randn(V, 1, generator=g).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = torch.vmap(lambda a: router_logits(a, w[0], b[0]))(x)
        per_w = torch.vmap(router_logits)(x, w, b)
        moved = torch.vmap(lambda a: router_logits(a, w[1]), in_dims=2)(x.movedim(0, 2).bfloat16())
    for i in range(V):
        # folded into one (V*B, S, D) matmul: BLAS may block (and round) differently
        assert_close(folded[i], router_logits(x[i], w[0], b[0]), f"folded {i}")
        assert_bitwise_equal(per_w[i], router_logits(x[i], w[i], b[i]), f"per-sample weight {i}")
        assert_close(moved[i], router_logits(x[i].bfloat16(), w[1]), f"in_dims=2 {i}", scale=4)
