"""The single entry point to mod_ext's compiled ops.

Each op is registered in C++ under ``torch.ops.mod_ext``: schemas in
``csrc/registration.cpp``, kernels by family and backend in ``csrc/cpu/{route,rows,
router_logits}.cpp`` and ``csrc/cuda/{route,rows,router_logits}.cu``, autograd (and the
in-place op's version counter) in ``csrc/autograd.cpp``. This module adds, per op, a
typed wrapper with its documentation, a fake (meta) kernel so ``torch.compile`` /
``torch.export`` can trace it, and a vmap rule so ``torch.vmap`` folds the vmapped
dimension into the batch instead of looping. Plain-PyTorch oracles live in
:mod:`mod_ext.reference`.

Shapes: ``(B, S, D)`` hidden states, ``(B, S)`` router logits, ``(B, C)`` slots with
``C`` = capacity. Source: Raposo et al. 2024 (arXiv 2404.02258), Sections 3.1-3.5.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._loader import load_compiled

# Loading the library registers torch.ops.mod_ext.*; a missing or broken library is an
# ImportError that says why (e.g. a source checkout shadowing the installed package).
_C = load_compiled()

__all__ = [
    "topk_route",
    "threshold_route",
    "gather_tokens",
    "scatter_add_weighted",
    "scatter_add_weighted_",
    "router_logits",
    "cuda_built",
    "build_info",
]

_ops = torch.ops.mod_ext

# Eager fast path (gather_tokens, scatter_add_weighted, scatter_add_weighted_): mod_ext._C
# calls the op's typed operator handle directly, skipping the OpOverload's parse of the
# arguments against the schema (~1-1.5 us a call). The dispatcher still runs every key
# (autograd, Python dispatch modes, FakeTensor, vmap / functorch). The OpOverload is used
# instead while dynamo traces (it must see the op in the graph, no graph break) and when
# an argument has __torch_function__ or a TorchFunctionMode is active (has_torch_function
# covers both), so those see torch.ops.mod_ext.<op>.default as before. A non-tensor
# argument makes the fast path return NotImplemented: the OpOverload then raises its error.
_has_torch_function = torch._C._has_torch_function
_is_compiling = torch.compiler.is_compiling
_fast_gather_tokens = _C._gather_tokens
_fast_scatter_add_weighted = _C._scatter_add_weighted
_fast_scatter_add_weighted_ = _C._scatter_add_weighted_

#: Kernel families and the ops each one implements (csrc/<backend>/<family>.*).
FAMILIES = {
    "route": ("topk_route", "threshold_route"),
    "rows": (
        "gather_tokens",
        "gather_tokens_backward",
        "scatter_add_weighted",
        "scatter_add_weighted_",
        "scatter_add_weighted_backward",
    ),
    "router_logits": ("router_logits",),
}


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels (as the dispatcher sees
    it: ``gather_tokens`` has a CUDA kernel)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mod_ext::gather_tokens", "CUDA")


def _cuda_version(v: Optional[int]) -> Optional[str]:
    return None if v is None else f"{v // 1000}.{(v % 1000) // 10}"


def build_info() -> dict:
    """What was compiled, read back from ``mod_ext._C`` itself (JSON-serialisable).

    Keys: ``backend`` ("cuda" or "cpu"); ``reason`` (why it is CPU-only, when it is);
    ``built_with_torch`` (the torch version the library was compiled against);
    ``build_system`` ("setuptools" or "cmake"); ``cuda_home``; ``cuda_arch_list`` (the
    TORCH_CUDA_ARCH_LIST used; default ``csrc/cuda_arch_list.txt``);
    ``cuda_archs_compiled`` (what nvcc compiled device code for, e.g. [800, 900]);
    ``cuda_runtime_built`` (the CUDA runtime version compiled against, e.g. "13.0");
    ``openmp``, ``openmp_version``, ``openmp_max_threads`` (threads OpenMP offers);
    ``aten_num_threads``; ``families`` ({family: {"cpu": bool, "cuda": bool}}, whether
    each kernel family of :data:`FAMILIES` was compiled in); and the run-time facts
    ``cuda_kernels_registered`` (:func:`cuda_built`), ``cuda_available``, ``torch``.
    Values that do not apply (no CUDA, no OpenMP) are None.
    """
    c = _C.build_info()
    archs = c["cuda_archs_compiled"]
    info = {
        "backend": "cuda" if c["cuda_built"] else "cpu",
        "reason": c["cpu_only_reason"] or "built with the CUDA kernels",
        "built_with_torch": c["torch_version_built"],
        "build_system": c["build_system"],
        "cuda_home": c["cuda_home"] or None,
        "cuda_arch_list": c["cuda_arch_list_requested"] or None,
        "cuda_archs_compiled": [int(a) for a in archs.split(",") if a.strip()] if archs is not None else None,
        "cuda_runtime_built": _cuda_version(c["cuda_runtime_version_built"]),
        "openmp": c["openmp"],
        "openmp_version": c["openmp_version"],
        "openmp_max_threads": c["openmp_max_threads"],
        "aten_num_threads": c["aten_num_threads"],
        "families": c["families"],
    }
    info["cuda_kernels_registered"] = cuda_built()
    info["cuda_available"] = torch.cuda.is_available()
    info["torch"] = torch.__version__
    return info


def _as_capacity(capacity, op: str):
    """capacity as an int (Python or NumPy integer) or a SymInt; bool and float rejected.
    Python ints and SymInts pass through untouched (converting a SymInt would specialise
    it under torch.compile)."""
    if isinstance(capacity, bool):
        raise TypeError(f"mod_ext: {op}: capacity must be an int, got bool {capacity!r}")
    if isinstance(capacity, (int, torch.SymInt)):
        return capacity
    if not hasattr(type(capacity), "__index__"):
        raise TypeError(f"mod_ext: {op}: capacity must be an int, got {type(capacity).__name__} {capacity!r}")
    return operator.index(capacity)  # NumPy integers


# --------------------------------------------------------------------------------------
# vmap helpers: the vmapped dim is moved to the front and folded into the batch dim B.
# --------------------------------------------------------------------------------------


def _front(t: Optional[Tensor], bdim: Optional[int], n: int) -> Optional[Tensor]:
    """t with its vmapped dim first (size n); an unbatched t is expanded to n copies."""
    if t is None:
        return None
    if bdim is None:
        return t.unsqueeze(0).expand(n, *t.shape)
    return t.movedim(bdim, 0)


def _fold(t: Optional[Tensor]) -> Optional[Tensor]:
    """(n, B, ...) -> (n * B, ...); a tensor of another rank is passed on as is, so the
    op raises its usual error about the argument's shape."""
    if t is None or t.dim() < 2:
        return t
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unfold(t: Tensor, n: int) -> Tensor:
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def _dims(in_dims, count):
    return tuple(in_dims) + (None,) * (count - len(in_dims))


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


def topk_route(
    router_logits: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Expert-choice top-k routing over the sequence (MoD paper, Sections 3.1-3.3).

    Args:
        router_logits: (B, S) float32, bfloat16 or float16. Any strides.
        capacity: number of slots C per row, ``1 <= C <= S`` (see
            :func:`mod_ext.capacity_for`): a Python or NumPy integer, or a symbolic
            size under ``torch.compile`` / ``torch.export`` (not specialised).
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
        TypeError: capacity not an integer (``True`` and ``2.0`` are rejected).
        RuntimeError: capacity outside [1, S], router_logits not 2-D or of another
            dtype, valid not bool (B, S) or on another device than router_logits
            (the meta device included).

    Source: ``csrc/cpu/route.cpp``, ``csrc/cuda/route.cu``; oracle
    :func:`mod_ext.reference.topk_route_ref`.
    """
    capacity = _as_capacity(capacity, "topk_route")
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
        capacity: slots C per row, ``1 <= C <= S``; an integer as in :func:`topk_route`.
        valid: optional (B, S) bool; None means all valid.

    Returns:
        ``(indices, slot_mask)`` as in :func:`topk_route`: indices (B, C) int64
        ascending; slot_mask (B, C) bool, True for routed tokens, False for padding.

    Raises:
        TypeError, RuntimeError: as :func:`topk_route` (the argument is named ``scores``).

    Source: ``csrc/cpu/route.cpp``, ``csrc/cuda/route.cu``; oracle
    :func:`mod_ext.reference.threshold_route_ref`.
    """
    capacity = _as_capacity(capacity, "threshold_route")
    return _ops.threshold_route.default(scores, capacity, valid)


def _route_fake_for(name: str):
    """The fake kernel of a routing op whose logits argument is called ``name``."""

    def fake(logits, capacity, valid=None):
        torch._check(logits.dim() == 2, lambda: f"mod_ext: {name} must have shape (B, S), got {tuple(logits.shape)}")
        S = logits.shape[1]
        msg = lambda: f"mod_ext: capacity must satisfy 1 <= capacity <= S = {S}, got {capacity}"  # noqa: E731
        if isinstance(capacity, torch.SymInt) or isinstance(S, torch.SymInt):
            # Symbolic: raise only when the bound is known to fail; a guard here would
            # constrain (or specialise) the sequence length. The kernel checks the
            # concrete values at run time.
            torch._check(not statically_known_true(capacity < 1), msg)
            torch._check(not statically_known_true(capacity > S), msg)
        else:
            torch._check(1 <= capacity <= S, msg)
        if valid is not None:
            torch._check(valid.dtype == torch.bool,
                         lambda: f"mod_ext: valid must be a bool tensor of shape (B, S), got {valid.dtype}")
            torch._check(valid.shape == logits.shape,
                         lambda: f"mod_ext: valid must have shape (B, S) = {tuple(logits.shape)}, got {tuple(valid.shape)}")
            # A meta `valid` beside real logits (or the reverse) dispatches here: refuse it.
            torch._check(valid.device == logits.device,
                         lambda: f"mod_ext: {name} and valid must be on the same device, got {logits.device} and {valid.device}")
        B = logits.shape[0]
        return (
            logits.new_empty((B, capacity), dtype=torch.int64),
            logits.new_empty((B, capacity), dtype=torch.bool),
        )

    return fake


torch.library.register_fake("mod_ext::topk_route")(_route_fake_for("router_logits"))
torch.library.register_fake("mod_ext::threshold_route")(_route_fake_for("scores"))


def _route_vmap(op):
    def rule(info, in_dims, logits, capacity, valid=None):
        ld, _, vd = _dims(in_dims, 3)
        n = info.batch_size
        lg = _front(logits, ld, n)
        idx, mask = op(_fold(lg), capacity, _fold(_front(valid, vd, n)))
        return (_unfold(idx, n), _unfold(mask, n)), (0, 0)

    return rule


torch.library.register_vmap("mod_ext::topk_route", _route_vmap(_ops.topk_route.default))
torch.library.register_vmap("mod_ext::threshold_route", _route_vmap(_ops.threshold_route.default))


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

    Autograd is registered in C++ (``csrc/autograd.cpp``); double backward is exact.
    Source: ``csrc/cpu/rows.cpp``, ``csrc/cuda/rows.cu``; oracle
    :func:`mod_ext.reference.gather_tokens_ref`.
    """
    if not _has_torch_function((x, indices)) and not _is_compiling():
        out = _fast_gather_tokens(x, indices)
        if out is not NotImplemented:
            return out
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


@torch.library.register_vmap("mod_ext::gather_tokens")
def _gather_tokens_vmap(info, in_dims, x, indices):
    n = info.batch_size
    xd, idd = _dims(in_dims, 2)
    out = _ops.gather_tokens.default(_fold(_front(x, xd, n)), _fold(_front(indices, idd, n)))
    return _unfold(out, n), 0


@torch.library.register_vmap("mod_ext::gather_tokens_backward")
def _gather_tokens_backward_vmap(info, in_dims, grad_output, indices, seq_len):
    n = info.batch_size
    gd, idd, _ = _dims(in_dims, 3)
    out = _ops.gather_tokens_backward.default(_fold(_front(grad_output, gd, n)), _fold(_front(indices, idd, n)), seq_len)
    return _unfold(out, n), 0


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

    Autograd is registered in C++ (``csrc/autograd.cpp``); double backward is exact.
    Source: ``csrc/cpu/rows.cpp``, ``csrc/cuda/rows.cu``; oracle
    :func:`mod_ext.reference.scatter_add_weighted_ref`.
    """
    if not _has_torch_function((x, y, indices, weights)) and not _is_compiling():
        out = _fast_scatter_add_weighted(x, y, indices, weights)
        if out is not NotImplemented:
            return out
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
    (B, S, D) hidden state. Same arguments (shapes, dtypes) and checks as
    :func:`scatter_add_weighted`. Like PyTorch's in-place ops it bumps x's version
    counter (``x._version``), so a graph that saved x for its backward and then sees it
    overwritten fails at backward with autograd's "modified by an inplace operation"
    error instead of computing a wrong gradient.

    Not differentiable: it raises when grad mode is on and x, y or weights requires grad
    (use :func:`scatter_add_weighted` for training); it runs under ``torch.no_grad()``,
    ``torch.inference_mode()``, or in grad mode on tensors that do not require grad.

    Raises:
        RuntimeError: as :func:`scatter_add_weighted`; also when y or weights share
            memory with x, x has internal overlap (an expanded view), or an input
            requires grad in grad mode.

    Source: ``csrc/cpu/rows.cpp``, ``csrc/cuda/rows.cu`` (kernels), ``csrc/autograd.cpp``
    (the version bump and the grad-mode check).
    """
    if _has_torch_function((x, y, indices, weights)) or _is_compiling() or (
        _fast_scatter_add_weighted_(x, y, indices, weights) is NotImplemented
    ):
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


@torch.library.register_vmap("mod_ext::scatter_add_weighted")
def _scatter_add_weighted_vmap(info, in_dims, x, y, indices, weights):
    n = info.batch_size
    args = [_fold(_front(t, d, n)) for t, d in zip((x, y, indices, weights), _dims(in_dims, 4))]
    return _unfold(_ops.scatter_add_weighted.default(*args), n), 0


@torch.library.register_vmap("mod_ext::scatter_add_weighted_backward")
def _scatter_add_weighted_backward_vmap(info, in_dims, grad_output, y, indices, weights):
    n = info.batch_size
    args = [_fold(_front(t, d, n)) for t, d in zip((grad_output, y, indices, weights), _dims(in_dims, 4))]
    gy, gw = _ops.scatter_add_weighted_backward.default(*args)
    return (_unfold(gy, n), _unfold(gw, n)), (0, 0)


# --------------------------------------------------------------------------------------
# Router logits
# --------------------------------------------------------------------------------------


def router_logits(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The router logits of a MoD layer: ``z[b, s] = <x[b, s, :], weight> (+ bias)``
    (MoD paper Section 3.1; MOD_SPEC 1.1: in float32 even for bfloat16/float16 x).

    Args:
        x: (B, S, D) hidden states, float32, float64, bfloat16 or float16, any strides.
        weight: (D,) router weight, any floating dtype (converted to the accumulation
            dtype; it is small).
        bias: None, or a tensor with one element (shape () or (1,)), any floating dtype.

    Returns:
        (B, S) float32 (float64 when x is float64), contiguous. Accumulated in float32
        (float64) without a float32 copy of a bfloat16/float16 x. For float32 x it is
        bit-identical to ``torch.matmul(x.to(torch.float32), weight.to(torch.float32))
        + bias.float().reshape(())`` (it calls ``at::matmul``; so is float64 x with
        float64); for bfloat16/float16 x a kernel of ours sums the products in another
        order (within float32 rounding of that expression). Differentiable in x
        (gradient in x.dtype), weight and bias (in their dtypes); gradients of gradients
        are exact (the backward is made of differentiable ops when create_graph=True).

    Raises:
        RuntimeError: x not 3-D or not floating (or a float8 dtype); weight not of shape
            (D,) or not floating; bias not one element or not floating; weight or bias
            on another device than x.

    Source: ``csrc/cpu/router_logits.cpp``, ``csrc/cuda/router_logits.cu``,
    ``csrc/autograd.cpp`` (backward); oracle :func:`mod_ext.reference.router_logits_ref`.
    """
    return _ops.router_logits.default(x, weight, bias)


@torch.library.register_fake("mod_ext::router_logits")
def _router_logits_fake(x, weight, bias=None):
    torch._check(x.dim() == 3, lambda: f"mod_ext: x must have shape (B, S, D) (3 dims), got {tuple(x.shape)}")
    torch._check(x.dtype.is_floating_point, lambda: f"mod_ext: x must be a floating-point tensor, got {x.dtype}")
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[2],
                 lambda: f"mod_ext: router_logits: weight must have shape (D,) = ({x.shape[2]},), got {tuple(weight.shape)}")
    torch._check(weight.dtype.is_floating_point, lambda: f"mod_ext: weight must be a floating-point tensor, got {weight.dtype}")
    # A meta weight / bias beside a real x (or the reverse) dispatches here: refuse it.
    torch._check(weight.device == x.device,
                 lambda: f"mod_ext: x and weight must be on the same device, got {x.device} and {weight.device}")
    if bias is not None:
        torch._check(bias.numel() == 1, lambda: f"mod_ext: router_logits: bias must be None or a tensor with one element, got shape {tuple(bias.shape)}")
        torch._check(bias.dtype.is_floating_point, lambda: f"mod_ext: bias must be a floating-point tensor, got {bias.dtype}")
        torch._check(bias.device == x.device,
                     lambda: f"mod_ext: x and bias must be on the same device, got {x.device} and {bias.device}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[:2], dtype=acc)


@torch.library.register_vmap("mod_ext::router_logits")
def _router_logits_vmap(info, in_dims, x, weight, bias=None):
    n = info.batch_size
    xd, wd, bd = _dims(in_dims, 3)
    xs = _front(x, xd, n)
    if wd is None and bd is None:  # per-sample weights would not fold into B
        return _unfold(_ops.router_logits.default(_fold(xs), weight, bias), n), 0
    ws, bs = _front(weight, wd, n), _front(bias, bd, n)
    outs = [_ops.router_logits.default(xs[i], ws[i], None if bs is None else bs[i]) for i in range(n)]
    return torch.stack(outs), 0
