"""The single entry point to mod_ext's compiled routing ops.

Each op is registered in C++ under ``torch.ops.mod_ext`` (schemas in
``csrc/registration.cpp``, kernels in ``csrc/routing_cpu.cpp`` and
``csrc/cuda/routing_cuda.cu``). This module adds, per op, a typed wrapper with its
documentation, a fake (meta) kernel so ``torch.compile`` can trace it, and autograd
where the op is differentiable. Plain-PyTorch oracles live in
:mod:`mod_ext.reference`.

Shapes: ``(B, S, D)`` hidden states, ``(B, S)`` router logits, ``(B, C)`` slots with
``C`` = capacity. Source: Raposo et al. 2024 (arXiv 2404.02258), Sections 3.1-3.5.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.mod_ext.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "mod_ext._C (the compiled ops) could not be loaded. Build it with "
        "`pip install --no-build-isolation -e .` from the mod_ext checkout, against the "
        f"PyTorch you run ({torch.__version__}). Original error: {e}"
    ) from e

__all__ = [
    "topk_route",
    "threshold_route",
    "gather_tokens",
    "scatter_add_weighted",
    "scatter_add_weighted_",
    "cuda_built",
    "build_info",
]

_ops = torch.ops.mod_ext


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mod_ext::gather_tokens", "CUDA")


def build_info() -> dict:
    """What ``pip install`` built: backend ("cuda" or "cpu"), why, and against which
    PyTorch and CUDA toolkit. ``cuda_available`` says whether this process can use it."""
    try:
        from . import _build_info as b

        info = {
            "backend": b.BACKEND,
            "reason": b.REASON,
            "built_with_torch": b.TORCH_VERSION,
            "cuda_home": b.CUDA_HOME,
            "cuda_arch_list": b.CUDA_ARCH_LIST,
        }
    except ImportError:
        info = {"backend": "cuda" if cuda_built() else "cpu", "reason": "unknown (no _build_info.py)"}
    info["cuda_kernels_registered"] = cuda_built()
    info["cuda_available"] = torch.cuda.is_available()
    info["torch"] = torch.__version__
    return info


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


def topk_route(
    router_logits: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Expert-choice top-k routing over the sequence (MoD paper, Sections 3.1-3.3).

    Args:
        router_logits: (B, S) float32, bfloat16 or float16. Any strides.
        capacity: number of slots C per row, ``1 <= C <= S``
            (see :func:`mod_ext.capacity_for`).
        valid: optional (B, S) bool, False for tokens that must not be routed
            (padding in a batch of unequal lengths). None means all valid.

    Returns:
        ``(indices, slot_mask)``: indices (B, C) int64, strictly ascending in each row,
        so the routed tokens keep causal order; slot_mask (B, C) bool, True where the
        slot holds a routed token and False for padding.

    Selection (deterministic): the C valid tokens with the largest logits; ties go to
    the lower position; NaN ranks below every number (including -inf) but above
    invalid tokens. A row with fewer than C valid tokens is padded with its
    lowest-position invalid tokens (slot_mask False). Example, C = 3::

        router_logits = [[0.5, 2.0, 2.0, -1.0, 3.0]]    valid = None
        indices       = [[1, 2, 4]]                     slot_mask = [[T, T, T]]
        router_logits = [[0.5, 2.0, 9.0, -1.0, 3.0]]    valid = [[T, F, F, T, F]]
        indices       = [[0, 1, 3]]                     slot_mask = [[T, F, T]]

    Raises:
        RuntimeError: capacity outside [1, S], router_logits not 2-D or of another
            dtype, valid not bool (B, S) or on another device.
    """
    return _ops.topk_route.default(router_logits, capacity, valid)


def threshold_route(
    scores: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Causal first-come-first-served routing for sampling (MoD paper, Section 3.5).

    Token t is routed when ``scores[b, t] > 0`` (NaN is not), ``valid[b, t]``, and
    fewer than ``capacity`` earlier tokens of row b were routed; later tokens that
    want the block are dropped. The decision for t depends on tokens <= t only.
    Unused slots are padded with the lowest-position unrouted tokens.

    Args:
        scores: (B, S) float32, bfloat16 or float16: predictor logits, or router
            logits for the auxiliary-loss method.
        capacity: slots C per row, ``1 <= C <= S``.
        valid: optional (B, S) bool; None means all valid.

    Returns:
        ``(indices, slot_mask)`` as in :func:`topk_route`: indices (B, C) int64
        ascending; slot_mask (B, C) bool, True for routed tokens, False for padding.

    Raises:
        RuntimeError: as :func:`topk_route`.
    """
    return _ops.threshold_route.default(scores, capacity, valid)


def _route_fake(logits, capacity, valid=None):
    torch._check(logits.dim() == 2, lambda: f"mod_ext: router_logits must have shape (B, S), got {tuple(logits.shape)}")
    torch._check(
        1 <= capacity <= logits.shape[1],
        lambda: f"mod_ext: capacity must satisfy 1 <= capacity <= S = {logits.shape[1]}, got {capacity}",
    )
    if valid is not None:
        torch._check(valid.shape == logits.shape, lambda: f"mod_ext: valid must have shape (B, S) = {tuple(logits.shape)}, got {tuple(valid.shape)}")
    B = logits.shape[0]
    return (
        logits.new_empty((B, capacity), dtype=torch.int64),
        logits.new_empty((B, capacity), dtype=torch.bool),
    )


torch.library.register_fake("mod_ext::topk_route")(_route_fake)
torch.library.register_fake("mod_ext::threshold_route")(_route_fake)


# --------------------------------------------------------------------------------------
# Gather
# --------------------------------------------------------------------------------------


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """Gather the routed tokens: ``out[b, j] = x[b, indices[b, j]]``.

    Args:
        x: (B, S, D) hidden states, any floating dtype, any strides.
        indices: (B, C) int64 positions in [0, S) (from :func:`topk_route` or
            :func:`threshold_route`).

    Returns:
        (B, C, D), dtype of x, contiguous. Differentiable in x; the gradient is
        scattered back to the gathered rows (repeated indices accumulate).

    Raises:
        RuntimeError: wrong ranks or dtypes, mismatched B or devices; on CPU also
            indices outside [0, S). On CUDA an out-of-range index cannot be checked
            without a host sync: its slot reads zeros.
    """
    return _ops.gather_tokens.default(x, indices)


@torch.library.register_fake("mod_ext::gather_tokens")
def _gather_tokens_fake(x, indices):
    torch._check(x.dim() == 3, lambda: f"mod_ext: x must have shape (B, S, D), got {tuple(x.shape)}")
    torch._check(indices.dim() == 2 and indices.shape[0] == x.shape[0],
                 lambda: f"mod_ext: indices must have shape (B, C) with B = {x.shape[0]}, got {tuple(indices.shape)}")
    return x.new_empty((x.shape[0], indices.shape[1], x.shape[2]))


@torch.library.register_fake("mod_ext::gather_tokens_backward")
def _gather_tokens_backward_fake(grad_output, indices, seq_len):
    return grad_output.new_empty((grad_output.shape[0], seq_len, grad_output.shape[2]))


# Double backward: gather_tokens_backward is linear in grad_output, and its adjoint is a
# gather, so gradients of gradients (gradient penalties, Hessian-vector products) are exact.
def _gather_bwd_setup_context(ctx, inputs, output):
    _, indices, _ = inputs
    ctx.save_for_backward(indices)


def _gather_bwd_backward(ctx, grad_grad_x):
    (indices,) = ctx.saved_tensors
    return gather_tokens(grad_grad_x, indices), None, None


torch.library.register_autograd(
    "mod_ext::gather_tokens_backward", _gather_bwd_backward, setup_context=_gather_bwd_setup_context
)


def _gather_tokens_setup_context(ctx, inputs, output):
    x, indices = inputs
    ctx.seq_len = x.shape[1]
    ctx.save_for_backward(indices)


def _gather_tokens_backward(ctx, grad_output):
    (indices,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.gather_tokens_backward.default(grad_output, indices, ctx.seq_len)
    return grad_x, None


torch.library.register_autograd(
    "mod_ext::gather_tokens", _gather_tokens_backward, setup_context=_gather_tokens_setup_context
)


# --------------------------------------------------------------------------------------
# Weighted scatter-add
# --------------------------------------------------------------------------------------


def scatter_add_weighted(x: Tensor, y: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Add the weighted block output back onto the residual stream.

    ``out = x; out[b, indices[b, j]] += weights[b, j] * y[b, j]``, computed in float32
    (float64 stays float64) and rounded once to x.dtype. Rows that no slot points at
    are bit-identical to x. This is ``x' = x + r * f(x~)`` of the MoD paper (Section
    3.4), with the residual added exactly once.

    Args:
        x: (B, S, D) residual stream, any floating dtype, any strides.
        y: (B, C, D) block update f, same dtype as x.
        indices: (B, C) int64, unique within each row.
        weights: (B, C) router weights, any floating dtype (0 for padding slots).

    Returns:
        (B, S, D), dtype of x, contiguous. Differentiable in x (identity), y
        (``weights * grad``) and weights (the per-slot dot product
        ``<grad[b, indices[b, j]], y[b, j]>``).

    Raises:
        RuntimeError: wrong ranks, y/x dtype mismatch, mismatched shapes or devices;
            on CPU also indices outside [0, S) or repeated within a row (on CUDA these
            are not checked; an out-of-range slot writes nothing).
    """
    return _ops.scatter_add_weighted.default(x, y, indices, weights)


@torch.library.register_fake("mod_ext::scatter_add_weighted")
def _scatter_add_weighted_fake(x, y, indices, weights):
    torch._check(x.dim() == 3, lambda: f"mod_ext: x must have shape (B, S, D), got {tuple(x.shape)}")
    torch._check(y.dim() == 3 and y.shape[0] == x.shape[0] and y.shape[2] == x.shape[2],
                 lambda: f"mod_ext: y must have shape (B, C, D) with B, D = {x.shape[0]}, {x.shape[2]}, got {tuple(y.shape)}")
    torch._check(y.dtype == x.dtype, lambda: f"mod_ext: y must have the same dtype as x ({x.dtype}), got {y.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def scatter_add_weighted_(x: Tensor, y: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """In-place :func:`scatter_add_weighted` for inference: ``x[b, indices[b, j]] +=
    weights[b, j] * y[b, j]`` (float32 math, rounded once), returns x.

    Only the C routed rows are read and written, so serving does not copy the whole
    (B, S, D) hidden state. Not differentiable (use :func:`scatter_add_weighted` when a
    gradient is needed). Same arguments and checks as :func:`scatter_add_weighted`.

    Raises:
        RuntimeError: as :func:`scatter_add_weighted`; also when y or weights share
            memory with x, or x has internal overlap (an expanded view).
    """
    _ops.scatter_add_weighted_.default(x, y, indices, weights)
    return x


@torch.library.register_fake("mod_ext::scatter_add_weighted_")
def _scatter_add_weighted_inplace_fake(x, y, indices, weights):
    _scatter_add_weighted_fake(x, y, indices, weights)  # same shape checks


@torch.library.register_fake("mod_ext::scatter_add_weighted_backward")
def _scatter_add_weighted_backward_fake(grad_output, y, indices, weights):
    return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(
        weights, memory_format=torch.contiguous_format
    )


# Double backward of the scatter. With g = grad_output, g_sel = g[b, idx] and incoming
# gradients (a, c) of (grad_y = w * g_sel, grad_w = <g_sel, y>):
#   d/dg = scatter of (w * a + c * y) to idx,  d/dy = c * g_sel,  d/dw = <a, g_sel>.
def _scatter_bwd_setup_context(ctx, inputs, output):
    grad_output, y, indices, weights = inputs
    ctx.seq_len = grad_output.shape[1]
    ctx.save_for_backward(grad_output, y, indices, weights)


def _scatter_bwd_backward(ctx, a, c):
    g, y, indices, w = ctx.saved_tensors
    need_g, need_y, _, need_w = ctx.needs_input_grad
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    a = torch.zeros_like(y) if a is None else a
    c = torch.zeros_like(w) if c is None else c
    grad_g = grad_y = grad_w = None
    if need_g:
        upd = w.to(acc).unsqueeze(-1) * a.to(acc) + c.to(acc).unsqueeze(-1) * y.to(acc)
        grad_g = gather_tokens_backward_op(upd.to(g.dtype), indices, ctx.seq_len)
    if need_y or need_w:
        g_sel = gather_tokens(g, indices).to(acc)  # (B, C, D)
        if need_y:
            grad_y = (c.to(acc).unsqueeze(-1) * g_sel).to(y.dtype)
        if need_w:
            grad_w = (a.to(acc) * g_sel).sum(-1).to(w.dtype)
    return grad_g, grad_y, None, grad_w


def gather_tokens_backward_op(grad_output: Tensor, indices: Tensor, seq_len: int) -> Tensor:
    """``zeros(B, seq_len, D)`` with ``grad_output[b, j]`` added at row ``indices[b, j]``."""
    return _ops.gather_tokens_backward.default(grad_output, indices, seq_len)


torch.library.register_autograd(
    "mod_ext::scatter_add_weighted_backward", _scatter_bwd_backward, setup_context=_scatter_bwd_setup_context
)


def _scatter_setup_context(ctx, inputs, output):
    x, y, indices, weights = inputs
    ctx.save_for_backward(y, indices, weights)


def _scatter_backward(ctx, grad_output):
    y, indices, weights = ctx.saved_tensors
    need_x, need_y, _, need_w = ctx.needs_input_grad
    grad_x = grad_y = grad_w = None
    if need_x:
        grad_x = grad_output
    if need_y or need_w:
        gy, gw = _ops.scatter_add_weighted_backward.default(grad_output, y, indices, weights)
        grad_y = gy if need_y else None
        grad_w = gw if need_w else None
    return grad_x, grad_y, None, grad_w


torch.library.register_autograd(
    "mod_ext::scatter_add_weighted", _scatter_backward, setup_context=_scatter_setup_context
)
