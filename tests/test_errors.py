"""Every bad input raises a clear error that names the offending argument."""

from __future__ import annotations

import pytest
import torch

import mod_ext
from tests.helpers import DEVICES, requires_cuda

ops = torch.ops.mod_ext
ROUTERS = [("topk_route", "router_logits"), ("threshold_route", "scores")]


def _route(name):
    return getattr(mod_ext, name)


# --------------------------------------------------------------------------------------
# topk_route / threshold_route
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# gather_tokens
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# scatter_add_weighted
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Devices (needs CUDA)
# --------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("op_name,arg", ROUTERS)
def test_route_device_mismatch(op_name, arg):
    with pytest.raises(RuntimeError, match=rf"{arg} and valid must be on the same device"):
        _route(op_name)(torch.randn(2, 8, device="cuda"), 2, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=rf"{arg} and valid must be on the same device"):
        _route(op_name)(torch.randn(2, 8), 2, torch.ones(2, 8, dtype=torch.bool, device="cuda"))


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
def test_mod_block_device_mismatch():
    x = torch.randn(2, 8, 4, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="valid"):
        mod_ext.mod_block(x, torch.randn(4, device="cuda"), lambda a, p, m: a, capacity=2,
                          valid=torch.ones(2, 8, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# mod_block and helpers
# --------------------------------------------------------------------------------------


def _block(xs, positions, slot_mask):
    return torch.tanh(xs)


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_bad_args(device):
    x = torch.randn(2, 8, 4, device=device)
    rw = torch.randn(4, device=device)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        mod_ext.mod_block(x, torch.randn(5, device=device), _block)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        mod_ext.mod_block(x, torch.randn(4, 1, device=device), _block)
    with pytest.raises(ValueError, match="x must be a floating-point tensor of shape"):
        mod_ext.mod_block(x[0], rw, _block)
    with pytest.raises(ValueError, match="x must be a floating-point tensor of shape"):
        mod_ext.mod_block(x.long(), rw, _block)
    with pytest.raises(ValueError, match="routing must be 'topk' or 'threshold'"):
        mod_ext.mod_block(x, rw, _block, routing="causal")
    with pytest.raises(ValueError, match="router_activation must be 'sigmoid' or 'identity'"):
        mod_ext.mod_block(x, rw, _block, router_activation="softmax")
    with pytest.raises(ValueError, match="scores are only used with routing='threshold'"):
        mod_ext.mod_block(x, rw, _block, scores=torch.randn(2, 8, device=device))
    with pytest.raises(ValueError, match="scores must have shape"):
        mod_ext.mod_block(x, rw, _block, routing="threshold", scores=torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="router_bias must be a scalar"):
        mod_ext.mod_block(x, rw, _block, router_bias=torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        mod_ext.mod_block(x, rw, _block, valid=torch.ones(2, 8, device=device))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        mod_ext.mod_block(x, rw, _block, valid=torch.ones(2, 7, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="capacity"):
        mod_ext.mod_block(x, rw, _block, capacity=9)
    with pytest.raises(RuntimeError, match="capacity"):
        mod_ext.mod_block(x, rw, _block, capacity=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        mod_ext.mod_block(x, rw, _block, capacity_factor=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_block_fn_wrong_shape(device):
    x = torch.randn(2, 8, 4, device=device)
    rw = torch.randn(4, device=device)
    for bad in (
        lambda xs, p, m: xs[..., :3],
        lambda xs, p, m: xs.sum(-1),
        lambda xs, p, m: torch.zeros(2, 8, 4, device=device),  # full sequence instead of slots
    ):
        with pytest.raises(ValueError, match=r"block_fn must return the update of shape \(B, C, D\)"):
            mod_ext.mod_block(x, rw, bad, capacity=3)


def test_router_aux_loss_bad_args():
    z = torch.randn(2, 8)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="router_logits must be"):
        mod_ext.router_aux_loss(z[0], idx)
    with pytest.raises(ValueError, match="indices must be"):
        mod_ext.router_aux_loss(z, idx[:1])
    with pytest.raises(ValueError, match="indices must be"):
        mod_ext.router_aux_loss(z, idx[0])
    with pytest.raises(ValueError, match="valid must have shape"):
        mod_ext.router_aux_loss(z, idx, torch.ones(2, 7, dtype=torch.bool))


def test_compiled_route_capacity_error_names_capacity():
    """The fake kernels used by torch.compile check capacity as well."""
    torch._dynamo.reset()
    f = torch.compile(lambda z: mod_ext.topk_route(z, 9), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="capacity"):
        f(torch.randn(2, 8))
    torch._dynamo.reset()


def test_mod_block_argument_types():
    x = torch.randn(2, 8, 4)
    w = torch.randn(4)
    f = lambda xs, p, m: xs  # noqa: E731
    with pytest.raises(ValueError, match="capacity must be an int"):
        mod_ext.mod_block(x, w, f, capacity=2.5)
    with pytest.raises(ValueError, match="capacity must be an int"):
        mod_ext.mod_block(x, w, f, capacity=True)
    with pytest.raises(ValueError, match="block_fn must return the update"):
        mod_ext.mod_block(x, w, lambda xs, p, m: (xs,))
    with pytest.raises(ValueError, match="x and router_weight must be torch tensors"):
        mod_ext.mod_block(x.numpy(), w, f)
    # a plain number is a valid router bias and equals the tensor form
    a = mod_ext.mod_block(x, w, f, router_bias=0.5, capacity=3)
    b = mod_ext.mod_block(x, w, f, router_bias=torch.tensor(0.5), capacity=3)
    assert torch.equal(a.output, b.output) and torch.equal(a.router_logits, b.router_logits)
    for bad in (None, "0.5", True):
        with pytest.raises(ValueError, match="capacity_factor"):
            mod_ext.capacity_for(8, bad)
    with pytest.raises(ValueError, match="seq_len"):
        mod_ext.capacity_for(8.0, 0.5)


def test_modblock_wrong_width_and_positions():
    blk = mod_ext.MoDBlock(torch.nn.Identity(), 4)
    with pytest.raises(ValueError, match="d_model = 4"):
        blk(torch.randn(1, 8, 5))
    with pytest.raises(ValueError, match="positions must be an int64"):
        blk(torch.randn(1, 8, 4), positions=torch.zeros(1, 8))
