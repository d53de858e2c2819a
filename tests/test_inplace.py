"""The in-place scatter (``scatter_add_weighted_``) that inference uses, and mod_block's
use of it under no_grad: same values as the out-of-place op / oracle, x really updated
in place, only the routed rows touched, and aliasing rejected."""

import pytest
import torch

import mod_ext
from mod_ext import reference as R
from tests.helpers import (
    DATA_DTYPES,
    DEVICES,
    assert_bitwise_equal,
    dtype_id,
    gen,
    rand_indices,
)

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["topk", "threshold"])
def test_mod_block_no_grad_updates_x_in_place(routing, device):
    """Under no_grad mod_block writes into x (serving copies no hidden state) and gives
    exactly what the out-of-place, differentiable path gives."""
    g = gen(11)
    B, S, D = 3, 40, 8
    x = torch.randn(B, S, D, generator=g).to(device)
    w_r = torch.randn(D, generator=g).to(device)
    lin = torch.nn.Linear(D, D).to(device)

    def block_fn(xs, pos, mask):
        return torch.tanh(lin(xs))

    ref = mod_ext.mod_block(x, w_r, block_fn, capacity=10, routing=routing)
    assert ref.output.data_ptr() != x.data_ptr(), "grad mode on: x must not be modified"
    x2 = x.clone()
    with torch.no_grad():
        out = mod_ext.mod_block(x2, w_r, block_fn, capacity=10, routing=routing)
    assert out.output is x2
    assert torch.equal(out.indices, ref.indices)
    assert_bitwise_equal(x2, ref.output.detach(), "no_grad in-place vs out-of-place")
    with torch.inference_mode():
        x3 = x.clone()
        out3 = mod_ext.mod_block(x3, w_r, block_fn, capacity=10, routing=routing)
        assert out3.output is x3
        assert_bitwise_equal(x3, ref.output.detach(), "inference_mode")


def test_compiled_no_grad_mod_block_fullgraph():
    """The in-place path traces with fullgraph=True too (functionalised by Dynamo)."""
    torch._dynamo.reset()
    g = gen(5)
    B, S, D = 2, 32, 8
    x = torch.randn(B, S, D, generator=g)
    w_r = torch.randn(D, generator=g)
    lin = torch.nn.Linear(D, D)

    def layer(x):
        return mod_ext.mod_block(x, w_r, lambda xs, p, m: lin(xs), capacity_factor=0.25).output

    expected = layer(x.clone()).detach()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        xc = x.clone()
        got = compiled(xc)
    assert_bitwise_equal(got, expected, "compiled in-place")
    assert_bitwise_equal(xc, expected, "input mutated in place")
