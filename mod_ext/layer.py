"""The Mixture-of-Depths layer on top of the routing ops.

``mod_block`` is the functional form (one MoD layer around any block update ``f``);
``MoDBlock`` is the ``nn.Module`` that owns the router, the predictor and a user block,
with ``forward`` (training / full sequences), ``prefill`` and ``decode`` (sampling
through a :class:`mod_ext.kv_cache.MoDLayerCache`). The routing maths (router logits,
route, router weights, gather, scatter) lives here once and all three use it.

Semantics: docs/MOD_SPEC.md sections 1-4; Raposo et al. 2024 (arXiv 2404.02258),
Sections 3.1-3.5. Nothing here synchronises with the host (except the dynamic decode
path, which is eager-only by design), so it traces with ``torch.compile(fullgraph=True)``
and captures in CUDA graphs.

Terms (one name per concept):

* *router logits* ``z = x @ w_r (+ b)``, (B, S) float32 (float64 for float64 x).
* *routing*: ``"topk"`` (expert-choice top-k over the sequence; training) or
  ``"causal"`` (a token is routed when its causal score > 0 and fewer than the
  capacity earlier tokens of its row were routed; sampling). The op of causal routing
  is :func:`mod_ext.threshold_route`.
* *causal scores*: what causal routing thresholds: the predictor's logits, or the
  router logits (``causal_router="router"``).
* *slot*: one of the C positions of a routed row; a *padding* slot holds no routed
  token (slot_mask False, router weight 0). A token that wants the block but gets no
  slot is *dropped* (it skips the layer).
* *capacity* C (layer capacity): slots per row of one call, ``capacity_for(S, c)`` for
  capacity factor c in top-k mode.
* *causal capacity* K: the most tokens causal routing routes per sequence,
  ``capacity_for(max_seq_len, c)``, fixed by ``max_seq_len`` so that a token's decision
  never depends on the input length.
* *decode capacity*: block slots per MoD layer in one decode step (B new tokens
  compete for them by top-k over the batch).
* *cache slots*: routed tokens a MoD layer's KV cache holds per sequence
  (:class:`mod_ext.kv_cache.MoDLayerCache`).
"""

from __future__ import annotations

import fractions
import math
import numbers
import operator
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import MoDLayerCache
from ._args import as_int, as_real
from .ops import gather_tokens, router_logits, scatter_add_weighted, scatter_add_weighted_, threshold_route, topk_route

__all__ = [
    "MoDOutput",
    "MoDBlockOutput",
    "RoutingMetrics",
    "capacity_for",
    "default_decode_capacity",
    "mod_block",
    "router_aux_loss",
    "topk_targets",
    "routing_metrics",
    "calibrated_threshold",
    "MoDPredictor",
    "MoDBlock",
]

BlockFn = Callable[[Tensor, Tensor, Tensor], Tensor]
ROUTING_MODES = ("topk", "causal")
#: router weight r = act(z) of a routed token's router logit z: "sigmoid" (bounded, in
#: (0, 1)), "scaled_sigmoid" (2 * sigmoid(z), in (0, 2) and exactly 1 at z = 0, so a
#: zero-initialised router leaves the block's update unchanged: what mod_ext.hf.convert
#: uses on pretrained models) or "identity" (the paper's raw scalar r = z).
ROUTER_ACTIVATIONS = ("sigmoid", "scaled_sigmoid", "identity")


def _router_weights(logits: Tensor, router_activation: str) -> Tensor:
    if router_activation == "sigmoid":
        return torch.sigmoid(logits)
    if router_activation == "scaled_sigmoid":
        return 2.0 * torch.sigmoid(logits)
    return logits


class MoDOutput(NamedTuple):
    """What :func:`mod_block` returns."""

    output: Tensor  #: (B, S, D), dtype of x: the residual stream after the layer
    router_logits: Tensor  #: (B, S) float32 (float64 for float64 x), differentiable
    indices: Tensor  #: (B, C) int64, ascending token positions of the slots
    slot_mask: Tensor  #: (B, C) bool, False for padding slots
    router_weights: Tensor  #: (B, C) float32 (float64 for float64 x), act(router logit); 0 for padding slots


class MoDBlockOutput(NamedTuple):
    """What :meth:`MoDBlock.forward` and :meth:`MoDBlock.prefill` return."""

    output: Tensor  #: (B, S, D), dtype of x: the residual stream after the layer (= routing.output)
    #: scalar loss that trains causal routing (the predictor's BCE, or the router's
    #: auxiliary BCE with causal_router="router") in top-k mode; None in causal mode
    aux_loss: Optional[Tensor]
    routing: MoDOutput  #: router logits, indices, slot mask and router weights of the call
    causal_scores: Tensor  #: (B, S) detached causal scores (> 0 routes causally), for routing_metrics


def capacity_for(seq_len, capacity_factor) -> int:
    """Capacity ``C = min(S, max(1, ceil(c * S)))`` of a MoD layer (docs/MOD_SPEC.md section 1.2).

    Args:
        seq_len: S, the sequence length: an int >= 1 (a Python or numpy integer, or a
            ``torch.SymInt`` under ``torch.compile(dynamic=True)`` / ``torch.export``).
        capacity_factor: c > 0, the fraction of tokens routed (paper: 0.125); a
            Python or numpy real number.

    Returns:
        int in [1, S] (a SymInt for a symbolic S, with the same value at every size).
        Depends only on shapes, so every MoD shape is static. ``c * S`` is rounded to
        9 decimals before the ceiling, so 0.7 * 10 gives 7, not 8.

    Raises:
        ValueError: seq_len not an int >= 1, or capacity_factor not a positive finite number.
    """
    # Python ints and SymInts (Dynamo shows a symbolic size as an int) pass as they are, so
    # a symbolic size is never specialised; other integers (numpy) go through __index__.
    if isinstance(seq_len, bool):
        raise ValueError(f"mod_ext.capacity_for: seq_len must be an int >= 1, got {seq_len!r}")
    if not isinstance(seq_len, (int, torch.SymInt)):
        try:
            seq_len = operator.index(seq_len)
        except TypeError:
            raise ValueError(f"mod_ext.capacity_for: seq_len must be an int >= 1, got {seq_len!r}") from None
    if seq_len < 1:
        raise ValueError(f"mod_ext.capacity_for: seq_len must be an int >= 1, got {seq_len!r}")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real):
        raise ValueError(
            f"mod_ext.capacity_for: capacity_factor must be a positive number, got {capacity_factor!r}"
        )
    c = float(capacity_factor)
    if not 0 < c < math.inf:  # comparisons, not math.isfinite: c may be a SymFloat under torch.compile
        raise ValueError(
            f"mod_ext.capacity_for: capacity_factor must be a positive number, got {capacity_factor!r}"
        )
    # sym_min / sym_max are min / max for ints and stay symbolic (no guard) for SymInts.
    if isinstance(seq_len, torch.SymInt) and type(c) is float:
        # A symbolic length: the same value as an integer ceiling division by the factor's
        # fraction (0.7 -> 7/10), an expression the shape solver can bound (export proves
        # its guards with it; a float ceil of a rounded product it cannot).
        frac = fractions.Fraction(c).limit_denominator(10**9)
        k = (frac.numerator * seq_len + frac.denominator - 1) // frac.denominator
        if frac <= 1:  # then 1 <= k <= S already: no min/max, which the solver handles worse
            return k
        return torch.sym_min(seq_len, torch.sym_max(1, k))
    return torch.sym_min(seq_len, torch.sym_max(1, math.ceil(round(c * seq_len, 9))))


def default_decode_capacity(batch: int, capacity_factor: float) -> int:
    """Default decode capacity: block slots per MoD layer in a decode step of ``batch`` tokens.

    ``min(batch, ceil(c * B + 3 * sqrt(B * c * (1 - c))))``: the expected number of routed
    tokens ``c * B`` plus three standard deviations of a Binomial(B, c) as headroom, so a
    predictor that routes a fraction c of tokens independently overflows in well under
    1% of steps (B = 64, c = 0.125: 16 slots; B = 8: 4; B = 1: 1).

    Raises:
        ValueError: batch not an int >= 1, or capacity_factor not in (0, 1].
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"default_decode_capacity: batch must be an int >= 1, got {batch!r}")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real) or not (
        0 < float(capacity_factor) <= 1
    ):
        raise ValueError(f"default_decode_capacity: capacity_factor must be in (0, 1], got {capacity_factor!r}")
    c = float(capacity_factor)
    return min(batch, max(1, math.ceil(round(c * batch + 3 * math.sqrt(batch * c * (1 - c)), 9))))


#: Learning-rate multiplier of the router aux loss's Platt parameters (MoDBlock.aux_log_scale,
#: aux_offset), by reparametrisation: the logits use m * parameter.
PLATT_LR_MULT = 20.0


class _ScaleGrad(torch.autograd.Function):
    """Identity on x (a view); its backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def _router_logits(x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor] = None) -> Tensor:
    """Router logits ``x @ w_r (+ b)``, (B, S) in float32 (float64 for float64 x).

    The one place the router logits are computed (mod_block, MoDBlock.causal_scores,
    MoDBlock.decode), so the routing decision is the same on every path.
    """
    if router_bias is not None and router_bias.device != x.device:
        router_bias = router_bias.to(x.device)  # e.g. a Python number given as router_bias
    # float32 accumulation straight from x's dtype: no float32 copy of the hidden state
    return router_logits(x, router_weight, router_bias)


def _as_bias(router_bias):
    """router_bias as a tensor (a Python/numpy number is accepted), or a clear error."""
    if router_bias is None or isinstance(router_bias, torch.Tensor):
        return router_bias
    if isinstance(router_bias, bool) or not isinstance(router_bias, numbers.Real):
        raise ValueError(
            f"mod_ext.mod_block: router_bias must be a scalar tensor or a real number, got {router_bias!r}"
        )
    return torch.tensor(float(router_bias), dtype=torch.float32)


def _check_capacity(capacity):
    if capacity is None or (isinstance(capacity, (int, torch.SymInt)) and not isinstance(capacity, bool)):
        return capacity  # an int or SymInt as it is (no specialisation of a symbolic capacity)
    if isinstance(capacity, bool):
        raise ValueError(f"mod_ext.mod_block: capacity must be an int in [1, S] or None, got {capacity!r}")
    try:
        return operator.index(capacity)
    except TypeError:
        raise ValueError(f"mod_ext.mod_block: capacity must be an int in [1, S] or None, got {capacity!r}") from None


def _check_routing(routing, where: str) -> None:
    if routing == "threshold":
        raise ValueError(
            f"{where}: routing='threshold' was renamed to routing='causal' (the op keeps the name "
            "mod_ext.threshold_route)"
        )
    if routing not in ROUTING_MODES:
        raise ValueError(f"{where}: routing must be 'topk' or 'causal', got {routing!r}")


def _check_valid(where: str, valid, B: int, S: int) -> None:
    """valid: None or a (B, S) bool tensor (the message names the expected shape)."""
    if valid is not None and (
        not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != (B, S)
    ):
        got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{where}: valid must be a bool tensor of shape (B, S) = ({B}, {S}), got {got}")


def _check_mod_block_args(x, router_weight, router_bias, valid, scores, routing, router_activation):
    if not isinstance(x, torch.Tensor) or not isinstance(router_weight, torch.Tensor):
        raise ValueError("mod_ext.mod_block: x and router_weight must be torch tensors")
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"mod_ext.mod_block: x must be a floating-point tensor of shape (B, S, D), got "
            f"{x.dtype} {tuple(x.shape)}"
        )
    B, S, D = x.shape
    if router_weight.shape != (D,):
        raise ValueError(
            f"mod_ext.mod_block: router_weight must have shape (D,) = ({D},), got {tuple(router_weight.shape)}"
        )
    if router_bias is not None and router_bias.numel() != 1:
        raise ValueError(
            f"mod_ext.mod_block: router_bias must be a scalar tensor, got shape {tuple(router_bias.shape)}"
        )
    _check_valid("mod_ext.mod_block", valid, B, S)
    _check_routing(routing, "mod_ext.mod_block")
    if router_activation not in ROUTER_ACTIVATIONS:
        raise ValueError(
            f"mod_ext.mod_block: router_activation must be one of {ROUTER_ACTIVATIONS}, got {router_activation!r}"
        )
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or scores.shape != (B, S):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"mod_ext.mod_block: scores must be a tensor of shape (B, S) = ({B}, {S}), got {got}")


def _check_inplace(where: str, *tensors: Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(
            f"{where}: inplace=True is for inference only (the in-place update is not differentiable), but "
            "grad mode is on and an input, the router or the block requires grad: use inplace=False, or run "
            "under torch.no_grad() / torch.inference_mode()"
        )


def _apply(x: Tensor, router_logits: Tensor, indices: Tensor, slot_mask: Tensor, block_fn: BlockFn,
           router_activation: str, inplace: bool, where: str) -> MoDOutput:
    """Router weights, gather, block, scatter: ``x' = x + r * f(x~)`` on the slots (B, C)."""
    logits_sel = router_logits.gather(1, indices)  # (B, C)
    r = _router_weights(logits_sel, router_activation)
    r = torch.where(slot_mask, r, 0.0)  # padding slots: router weight 0

    x_sel = gather_tokens(x, indices)  # (B, C, D)
    f = block_fn(x_sel, indices, slot_mask)
    if not isinstance(f, torch.Tensor) or f.shape != x_sel.shape:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(
            f"{where}: block_fn must return the update of shape (B, C, D) = "
            f"{tuple(x_sel.shape)} as a tensor, got {got}"
        )
    # A padding slot's update must change nothing, even if the block returned NaN/inf
    # there: with f = -0.0 and r = 0 the update is 0 * -0.0 = -0.0, and x + -0.0 == x
    # bit for bit for every x (including -0.0 and NaN).
    f = torch.where(slot_mask.unsqueeze(-1), f.to(x.dtype), -0.0)
    if inplace:  # inference: update the C routed rows of x, no copy of the hidden state
        _check_inplace(where, x, f, r)
        out = scatter_add_weighted_(x, f, indices, r)
    else:
        out = scatter_add_weighted(x, f, indices, r)
    return MoDOutput(out, router_logits, indices, slot_mask, r)


def mod_block(
    x: Tensor,
    router_weight: Tensor,
    block_fn: BlockFn,
    *,
    capacity: Optional[int] = None,
    capacity_factor: float = 0.125,
    router_bias: Optional[Tensor] = None,
    valid: Optional[Tensor] = None,
    router_activation: str = "sigmoid",
    routing: str = "topk",
    scores: Optional[Tensor] = None,
    inplace: bool = False,
) -> MoDOutput:
    """One Mixture-of-Depths layer: ``x' = x + r * f(x~)`` on the routed tokens only.

    Steps (docs/MOD_SPEC.md section 1; paper Sections 3.1-3.4): router logits ``z = x @
    router_weight (+ bias)`` in float32 (float64 for float64 x; the routing decision
    itself is always made on the float32-rounded logits, so two float64 logits closer
    than float32 resolution tie and go to the lower position); route C = capacity
    tokens per row; gather them in position order; run ``f = block_fn(x_sel,
    positions, slot_mask)``; add ``r * f`` back onto the routed rows, with ``r =
    act(z)`` for routed slots and 0 for padding slots. Tokens that are not routed pass
    through bit for bit.

    Args:
        x: (B, S, D) hidden states (residual stream), any floating dtype.
        router_weight: (D,) router projection ``w_r``.
        block_fn: ``f(x_sel (B, C, D), positions (B, C) int64, slot_mask (B, C) bool)
            -> (B, C, D)``: the block's *update* (attention + MLP output, without the
            residual). Attention inside it must be causal in slot order (= position
            order), use ``positions`` for rotary encodings, and ignore keys whose
            slot_mask is False. Its output is cast to x.dtype.
        capacity: slots per row C, 1 <= C <= S (an int, or a SymInt when tracing).
            Default ``capacity_for(S, capacity_factor)``.
        capacity_factor: c, used when capacity is None (paper: 0.125).
        router_bias: optional scalar bias added to the router logits (a 1-element
            tensor, differentiable, or a Python number).
        valid: optional (B, S) bool tensor; invalid tokens are never routed (padding).
        router_activation: "sigmoid" (bounded router weight), "scaled_sigmoid"
            (``2 * sigmoid(z)``: 1 at logit 0, so a zero router changes nothing) or
            "identity" (the paper's raw scalar ``r = w_r . x``).
        routing: "topk" (expert-choice top-k over the sequence; training) or "causal"
            (first come first served by ``scores > 0``, at most C per row; sampling;
            the op is :func:`mod_ext.threshold_route`). For a decision that does not
            depend on the input length pass a capacity fixed by the longest input
            (:meth:`MoDBlock.causal_capacity` does).
        scores: optional (B, S) scores that choose the tokens instead of the router
            logits: causal scores (predictor logits) for routing="causal"; for
            routing="topk", e.g. random scores (the paper's random-routing baseline,
            ``MoDBlock(random_routing=True)``). The router weights ``act(z)`` still
            scale the routed updates. Default: the router logits.
        inplace: False (default): x is never modified, ``output`` is a new tensor.
            True (inference only): the update is written into the C routed rows of x
            (:func:`mod_ext.scatter_add_weighted_`) and ``output`` is x itself, so
            serving never copies the (B, S, D) hidden state.

    Returns:
        :class:`MoDOutput` ``(output, router_logits, indices, slot_mask, router_weights)``.
        Routing itself is not differentiable; gradients reach x, router_weight,
        router_bias and the block through ``r * f`` (paper Section 3.4).

    Raises:
        ValueError: bad shapes, dtypes or option strings (the message names the
            argument); routing="threshold" (renamed to "causal"); inplace=True in grad
            mode when x, the router or the block requires grad.
        RuntimeError: from the ops, e.g. capacity outside [1, S].
    """
    router_bias = _as_bias(router_bias)
    capacity = _check_capacity(capacity)
    _check_mod_block_args(x, router_weight, router_bias, valid, scores, routing, router_activation)
    if not callable(block_fn):
        raise ValueError(f"mod_ext.mod_block: block_fn must be callable as block_fn(x_sel, positions, "
                         f"slot_mask), got {type(block_fn).__name__}")
    if not isinstance(inplace, bool):
        raise ValueError(f"mod_ext.mod_block: inplace must be True or False, got {inplace!r}")
    if inplace:
        _check_inplace("mod_ext.mod_block", x)
    S = x.shape[1]
    router_logits = _router_logits(x, router_weight, router_bias)  # (B, S)
    if capacity is None:
        capacity = capacity_for(S, capacity_factor)

    # Routing decisions are made on float32 logits (MOD_SPEC 1.1) and carry no gradient.
    if routing == "topk":
        src = router_logits if scores is None else scores
        indices, slot_mask = topk_route(src.detach().float(), capacity, valid)
    else:
        src = router_logits if scores is None else scores
        indices, slot_mask = threshold_route(src.detach().float(), capacity, valid)
    return _apply(x, router_logits, indices, slot_mask, block_fn, router_activation, inplace, "mod_ext.mod_block")


def calibrated_threshold(logits: Tensor, rate: float, valid: Optional[Tensor] = None, *,
                         where: str = "mod_ext.calibrated_threshold") -> float:
    """The threshold a fraction ``rate`` of the (valid) ``logits`` exceed: half way between
    the ``ceil(rate * n)``-th and the next largest value (below every value at rate 1).
    Reads the logits on the host (a calibration step, not a training-step op).

    Args:
        logits: (B, S) float causal logits (predictor or router) of training text.
        rate: the fraction to route, in (0, 1] (the capacity factor, for causal routing).
        valid: optional (B, S) bool; padding is left out.

    Raises:
        ValueError: logits not (B, S) floating point, a valid mask of another shape,
            rate outside (0, 1], no (valid) logits, or non-finite logits.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{where}: logits must be a floating-point tensor of shape (B, S), got {got}")
    _check_valid(where, valid, *logits.shape)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate <= 1:
        raise ValueError(f"{where}: rate must be a number in (0, 1], got {rate!r}")
    values = logits.detach().float().flatten() if valid is None else logits.detach().float()[valid]
    n = values.numel()
    if n == 0:
        raise ValueError(f"{where}: no valid logits to calibrate on")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: the logits hold NaN/inf (the router or predictor has diverged)")
    k = min(n, max(1, math.ceil(round(rate * n, 9))))  # values to route
    if k == n:
        return float(values.min()) - 1.0
    top = torch.topk(values, k + 1).values  # descending
    return 0.5 * (float(top[k - 1]) + float(top[k]))


def topk_targets(router_logits: Tensor, indices: Tensor) -> Tensor:
    """(B, S) float 0/1 targets: 1 at the positions in ``indices`` (per row), else 0.

    Built per row with ``scatter`` on dim 1, never on a flattened (B*S) tensor
    (docs/MOD_SPEC.md section 6).
    """
    return torch.zeros_like(router_logits).scatter(1, indices, 1.0)


def _masked_mean(values: Tensor, valid: Optional[Tensor]) -> Tensor:
    if valid is None:
        return values.mean()
    # where, not values * valid: a NaN at a padding token (0 * NaN = NaN) must not leak in
    return torch.where(valid, values, 0).sum() / valid.to(values.dtype).sum().clamp_min(1.0)


def _check_targets(where: str, name: str, logits, indices, valid) -> None:
    """Shared checks of (B, S) logits/scores, (B, C) int64 indices in [0, S) and a (B, S)
    bool valid mask. The index range is checked on the CPU in eager mode only (on CUDA,
    or while compiling, it would be a host sync)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{where}: {name} must be a floating-point tensor of shape (B, S), got {got}")
    B, S = logits.shape
    if (not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != B
            or indices.dtype != torch.int64):
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"{where}: indices must be an int64 tensor of shape (B, C) with B = {B}, got {got}")
    _check_valid(where, valid, B, S)
    if indices.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= S:
            raise ValueError(f"{where}: indices must lie in [0, S) = [0, {S}), got min {lo}, max {hi}")


def router_aux_loss(router_logits: Tensor, indices: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Auxiliary BCE loss that makes the router logits causal-usable (paper Section 3.5).

    Mean binary cross-entropy with logits between ``router_logits`` and the per-row
    top-k membership targets (1 at ``indices``, 0 elsewhere), over valid tokens. At
    sampling time a token is then routed when its logit is above the layer's causal
    threshold (0, or calibrated: :meth:`MoDBlock.calibrate_causal_threshold`). Also the predictor's loss
    (pass the predictor logits as ``router_logits``).

    Args:
        router_logits: (B, S) float logits (router or predictor).
        indices: (B, C) int64 top-k positions in [0, S) from :func:`mod_ext.topk_route`.
        valid: optional (B, S) bool; invalid tokens are left out of the mean.

    Returns:
        Scalar tensor, dtype of router_logits.

    Raises:
        ValueError: shapes or dtypes that do not match; indices outside [0, S) (checked
            on the CPU in eager mode only: on CUDA it would be a host sync).
    """
    _check_targets("mod_ext.router_aux_loss", "router_logits", router_logits, indices, valid)
    return _aux_bce(router_logits, indices, valid)


def _aux_bce(router_logits: Tensor, indices: Tensor, valid: Optional[Tensor]) -> Tensor:
    """router_aux_loss without the argument checks (indices from the routing ops are
    valid by construction; the checks would read the indices on the host)."""
    targets = topk_targets(router_logits, indices)
    bce = F.binary_cross_entropy_with_logits(router_logits, targets, reduction="none")
    return _masked_mean(bce, valid)


class RoutingMetrics(NamedTuple):
    """How well causal routing finds the top-k tokens (0-d float32 tensors).

    All four compare the decisions causal routing actually makes (``threshold_route``:
    score > 0, first come first served, at most ``capacity`` per row) with top-k
    membership, over valid tokens.
    """

    accuracy: Tensor  #: fraction of valid tokens where the causal decision == top-k membership
    recall: Tensor  #: fraction of top-k tokens that causal routing also routes
    routed_fraction: Tensor  #: fraction of valid tokens that causal routing routes
    precision: Tensor  #: fraction of causally routed tokens that are in the top-k (1 when none routes)


def routing_metrics(
    scores: Tensor, indices: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> RoutingMetrics:
    """Compare causal routing by ``scores`` with expert-choice top-k ``indices``.

    Causal routing is the rule sampling uses (:func:`mod_ext.threshold_route`: a token
    is routed when its score > 0 and fewer than ``capacity`` earlier tokens of its row
    were), so a token the capacity cap turns away counts as not routed. At capacity
    factor 0.125 a rule that never routes is already 87.5% accurate, so recall (the
    fraction of top-k tokens causal routing also routes) and precision are reported
    beside accuracy (paper Section 3.5 / Figure 6 reports the predictor's accuracy).
    Computed on device, no host sync (the index-range check runs on the CPU in eager
    mode only). Sums over the batch: average over batches weighted by their valid
    token counts for an exact mean.

    Args:
        scores: (B, S) float causal scores (``MoDBlockOutput.causal_scores``: predictor
            or router logits minus the calibrated threshold).
        indices: (B, C) int64 top-k positions (the targets; padding slots of a padded
            row repeat a routed position, which changes nothing here).
        capacity: causal routing's capacity (slots per row, an int in [1, S]).
        valid: optional (B, S) bool; padding tokens are left out.

    Returns:
        :class:`RoutingMetrics` ``(accuracy, recall, routed_fraction, precision)``.

    Raises:
        ValueError: shapes or dtypes that do not match (the message names the argument).
    """
    _check_targets("mod_ext.routing_metrics", "scores", scores, indices, valid)
    S = scores.shape[1]
    if isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt)) or (
            isinstance(capacity, int) and not 1 <= capacity <= S):
        raise ValueError(f"mod_ext.routing_metrics: capacity must be an int in [1, S = {S}], got {capacity!r}")
    targets = topk_targets(scores.float(), indices) > 0.5
    if valid is not None:
        targets = targets & valid
    c_idx, c_mask = threshold_route(scores.detach().float(), capacity, valid)
    causal = torch.zeros_like(targets).scatter(1, c_idx, c_mask)
    agree = (causal == targets).float()
    hits = (causal & targets).float().sum()
    n_routed = causal.float().sum()
    return RoutingMetrics(
        accuracy=_masked_mean(agree, valid),
        recall=hits / targets.float().sum().clamp_min(1.0),
        routed_fraction=_masked_mean(causal.float(), valid),
        precision=torch.where(n_routed > 0, hits / n_routed.clamp_min(1.0), torch.ones_like(hits)),
    )


class MoDPredictor(nn.Module):
    """Small MLP that predicts top-k membership causally (paper Section 3.5).

    Reads the router's input with a stop-gradient, so training it never changes the
    language-model loss. ``forward(x (B, S, D)) -> logits (B, S)`` float32 (float64
    for float64 x, so its BCE is float64-exact there); a token is routed at sampling
    time when its logit, rounded to float32, is above the layer's ``causal_threshold``.
    """

    def __init__(self, d_model: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or max(16, d_model // 4)
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x.detach()).squeeze(-1)  # (B, S)
        return z.to(torch.promote_types(z.dtype, torch.float32))  # float32 (float64 for float64 x)

    def loss(self, x: Tensor, indices: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """BCE of the predictor logits against top-k membership (stop-gradient on x)."""
        return router_aux_loss(self(x), indices, valid)


class MoDBlock(nn.Module):
    """Turn a transformer block into a Mixture-of-Depths block in one line.

    ``MoDBlock(block, d_model)`` owns the router (``router_weight`` (D,),
    ``router_bias`` (1,)), the predictor and ``block``. ``block(x_sel, positions,
    slot_mask)`` gets the routed tokens (B, C, D), their true positions (B, C) and the
    slot mask (B, C), and returns the update ``f`` (B, C, D) without the residual (or
    ``x_sel + f`` when ``block_returns_residual=True``; f is then recovered by
    subtraction, which costs precision in low-precision dtypes). To sample through a KV
    cache (:meth:`prefill`, :meth:`decode`) the block implements the block protocol,
    :class:`mod_ext.kv_cache.CachedBlock`.

    Routing (``routing`` argument, or the ``routing`` attribute, default "topk"):
      * ``"topk"`` (training): expert-choice top-k at ``capacity_factor`` (capacity
        ``capacity_for(S, c)``); the call returns the aux loss that trains causal
        routing (the predictor's BCE, or the router's auxiliary BCE when
        ``causal_router="router"``), for the training loop to add to its loss.
      * ``"causal"`` (sampling): routes token by token by predictor logit (or router
        logit) above ``causal_threshold`` (0 until calibrated:
        :meth:`calibrate_causal_threshold`), first come first served, at most the causal capacity ``K =
        capacity_for(max_seq_len, capacity_factor)`` tokens per row (all tokens of
        shorter inputs may route), so a token's decision never depends on later tokens
        or on the input length.

    The module keeps no state between calls (everything a call computes is returned),
    so it survives ``copy.deepcopy``, ``state_dict`` round trips and activation
    checkpointing, and it never modifies its input unless ``inplace=True``.

    Args:
        block: the residual function f, or None when every call passes its own
            ``block=`` (the Hugging Face integration does: its block is a view of a
            decoder layer built per call).
        d_model: D (an int >= 1).
        capacity_factor: c (paper: 0.125).
        router_activation: "sigmoid", "scaled_sigmoid" or "identity" (see :func:`mod_block`).
        causal_router: "predictor" or "router". With "router" the aux BCE (and causal
            routing) use the Platt-scaled router logits ``exp(m * aux_log_scale) * (z -
            m * aux_offset)``, ``m = mod_ext.layer.PLATT_LR_MULT`` (20), two (1,)
            parameters the aux loss learns (0 at init: the identity).
        max_seq_len: the longest input (an int >= 1); it fixes the causal capacity,
            and causal mode requires it (ValueError otherwise).
        predictor_hidden: predictor MLP width.
        block_returns_residual: see above.
        random_routing: top-k over fresh uniform scores instead of the router logits
            (the paper's baseline).
        router_aux_grad_scale: with causal_router="router", the share of the aux BCE's
            gradient that reaches the hidden states, in [0, 1] (default 0.3); the router
            weight and the Platt parameters get all of it. 1 is the paper's aux loss; a
            smaller share costs the language model less for the same recall
            (benchmarks/RESULTS.md, "Router aux loss: Platt scaling and the hidden
            states' share").

    Raises:
        ValueError: an argument out of range or an unknown option string.
    """

    def __init__(
        self,
        block: nn.Module,
        d_model: int,
        *,
        capacity_factor: float = 0.125,
        router_activation: str = "sigmoid",
        causal_router: str = "predictor",
        max_seq_len: Optional[int] = None,
        predictor_hidden: Optional[int] = None,
        block_returns_residual: bool = False,
        random_routing: bool = False,
        router_aux_grad_scale: float = 0.3,
    ):
        super().__init__()
        d_model = as_int(d_model, "d_model", 1, where="MoDBlock")
        max_seq_len = as_int(max_seq_len, "max_seq_len", 1, where="MoDBlock", allow_none=True)
        predictor_hidden = as_int(predictor_hidden, "predictor_hidden", 1, where="MoDBlock", allow_none=True)
        if causal_router not in ("predictor", "router"):
            raise ValueError(f"MoDBlock: causal_router must be 'predictor' or 'router', got {causal_router!r}")
        if router_activation not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"MoDBlock: router_activation must be one of {ROUTER_ACTIVATIONS}, got {router_activation!r}"
            )
        capacity_for(1, capacity_factor)  # validates capacity_factor
        self.block = block
        self.d_model = d_model
        self.capacity_factor = capacity_factor
        self.router_activation = router_activation
        self.causal_router = causal_router
        self.max_seq_len = max_seq_len
        self.block_returns_residual = block_returns_residual
        self.router_weight = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))
        # (1,), not 0-d: FSDP2's fully_shard refuses scalar parameters
        self.router_bias = nn.Parameter(torch.zeros(1))
        self.predictor = MoDPredictor(d_model, predictor_hidden) if causal_router == "predictor" else None
        if not isinstance(random_routing, bool):
            raise ValueError(f"MoDBlock: random_routing must be True or False, got {random_routing!r}")
        self.random_routing = random_routing
        self.router_aux_grad_scale = as_real(router_aux_grad_scale, "router_aux_grad_scale", "MoDBlock",
                                             low=0.0, high=1.0, what="a number in [0, 1]")
        # causal_router="router": the aux BCE and causal routing use the Platt-scaled router
        # logits exp(m * aux_log_scale) * (z - m * aux_offset), m = PLATT_LR_MULT, both
        # learned by the aux loss alone (0 at init: the plain BCE on z). m makes Adam move
        # them m times faster than the model's learning rate: at 1x they barely leave the
        # identity in the demo's run, and recall rises with m (0.86 / 0.89 / 0.93 at
        # 1 / 5 / 20; benchmarks/RESULTS.md, "Router aux loss: Platt scaling and the
        # hidden states' share").
        if causal_router == "router":
            self.aux_log_scale = nn.Parameter(torch.zeros(1))
            self.aux_offset = nn.Parameter(torch.zeros(1))
        else:
            self.register_parameter("aux_log_scale", None)
            self.register_parameter("aux_offset", None)
        # Causal routing routes a token when its causal logit > causal_threshold (0 until
        # calibrated: calibrate_causal_threshold). A buffer, so state dicts carry it;
        # always float32 (see _apply), the precision routing decisions are made in.
        self.register_buffer("causal_threshold", torch.zeros(1))
        self.routing = "topk"

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() must not round the threshold: keep it float32
        before = self.causal_threshold
        super()._apply(fn, recurse)
        after = self.causal_threshold
        if after.is_floating_point() and after.dtype != torch.float32:
            self.causal_threshold = (before if before.dtype == torch.float32 else after).to(
                device=after.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the bias became (1,) hold a 0-d router_bias.
        key = prefix + "router_bias"
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        # ... and no causal_threshold (then uncalibrated: 0).
        if prefix + "causal_threshold" not in state_dict and prefix + "router_weight" in state_dict:
            state_dict[prefix + "causal_threshold"] = torch.zeros_like(self.causal_threshold)
        # ... and, for causal_router="router", no Platt scaling (then the identity: 0, 0).
        if self.aux_log_scale is not None and prefix + "router_weight" in state_dict:
            for name in ("aux_log_scale", "aux_offset"):
                if prefix + name not in state_dict:
                    state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ helpers

    def _block(self, block, where: str):
        """The block of one call: ``block`` when given, else the module's own."""
        block = self.block if block is None else block
        if block is None or not callable(block):
            raise ValueError(
                f"{where}: no block to run: this MoDBlock was built with block=None, so every call needs "
                "block=... (a callable with the block protocol, mod_ext.kv_cache.CachedBlock)"
            )
        return block

    def _block_fn(self, positions: Optional[Tensor], write=None, block=None) -> BlockFn:
        """The block as a mod_block block_fn; positions (B, S) are gathered at the
        routed indices (None: the indices are the positions)."""
        block = self.block if block is None else block

        def f(x_sel: Tensor, indices: Tensor, slot_mask: Tensor) -> Tensor:
            pos = indices if positions is None else positions.gather(1, indices)
            if write is None:
                out = block(x_sel, pos, slot_mask)
            else:
                out = block(x_sel, pos, slot_mask, write(slot_mask))
            return out - x_sel if self.block_returns_residual else out

        return f

    def causal_capacity(self, seq_len: int) -> int:
        """Slots per row in causal mode for an input of length seq_len.

        ``min(seq_len, K)`` with the causal capacity ``K = capacity_for(max_seq_len,
        capacity_factor)``: fixed by ``max_seq_len``, not by the input length, so a
        prefix routes exactly as it does inside a longer input (with seq_len <= K the
        cap cannot bind). ``causal_capacity(max_seq_len)`` is K.

        Raises:
            ValueError: max_seq_len was not set, or seq_len exceeds it.
        """
        if self.max_seq_len is None:
            raise ValueError(
                "MoDBlock: causal routing needs max_seq_len (MoDBlock(..., max_seq_len=N)): "
                "a capacity that followed the input length would let later tokens change "
                "earlier routing decisions"
            )
        if seq_len > self.max_seq_len:
            raise ValueError(f"MoDBlock: input length {seq_len} exceeds max_seq_len = {self.max_seq_len}")
        return torch.sym_min(seq_len, capacity_for(self.max_seq_len, self.capacity_factor))

    def causal_logits(self, x: Tensor) -> Tensor:
        """(B, S) causal logits of x (B, S, D), what the aux loss trains towards top-k
        membership: the predictor's logits, or the router logits with
        ``causal_router="router"`` (float32; float64 for float64 x)."""
        if self.predictor is not None:
            return self.predictor(x)
        return self._platt(_router_logits(x, self.router_weight, self.router_bias))

    def _platt(self, z: Tensor) -> Tensor:
        """Platt-scaled router logits ``exp(m * aux_log_scale) * (z - m * aux_offset)``,
        ``m = PLATT_LR_MULT`` (z's dtype)."""
        m = PLATT_LR_MULT
        return (z - m * self.aux_offset.to(z.dtype)) * (m * self.aux_log_scale.to(z.dtype)).exp()

    def causal_scores(self, x: Tensor) -> Tensor:
        """(B, S) causal scores of x (B, S, D): ``causal_logits(x) - causal_threshold``;
        a token is routed causally when its score > 0. Decisions are made on the float32
        rounding."""
        return self.causal_logits(x) - self.causal_threshold.to(torch.float32)

    @torch.no_grad()
    def calibrate_causal_threshold(self, logits: Tensor, valid: Optional[Tensor] = None,
                                   rate: Optional[float] = None) -> float:
        """Set ``causal_threshold`` so that a fraction ``rate`` (default the capacity
        factor) of the given causal logits exceeds it: their ``1 - rate`` quantile.

        A causal rule trained by BCE (the predictor, or the router's aux loss) sits at
        logit 0 only if its classes are balanced; the positives are c of the tokens, so
        its threshold is calibrated to the capacity on training data instead (paper
        Section 3.5 trains the rule; the calibration is mod_ext's, measured in
        benchmarks/RESULTS.md "Causal routing").

        Args:
            logits: (B, S) float causal logits (:meth:`causal_logits`, or
                ``MoDBlockOutput.causal_scores + causal_threshold``) of training text in
                top-k mode.
            valid: optional (B, S) bool; padding is left out.
            rate: the fraction to route, in (0, 1]; default ``min(1, capacity_factor)``.

        Returns:
            The threshold as stored in the buffer (float32), as a float.

        Raises:
            ValueError: logits not (B, S) floating point, a valid mask of another shape,
                rate outside (0, 1], no (valid) logits, or non-finite logits.
        """
        thr = calibrated_threshold(logits, min(1.0, float(self.capacity_factor)) if rate is None else rate, valid,
                                   where="MoDBlock.calibrate_causal_threshold")
        self.causal_threshold.fill_(thr)
        return float(self.causal_threshold)

    def _check_x(self, x: Tensor, where: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: x must have shape (B, S, D) with D = d_model = {self.d_model}, got {got}")

    @staticmethod
    def _check_positions(positions: Optional[Tensor], shape, where: str) -> None:
        if positions is not None and (
            not isinstance(positions, torch.Tensor) or positions.shape != shape or positions.dtype != torch.int64
        ):
            got = (f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, torch.Tensor)
                   else type(positions).__name__)
            raise ValueError(f"{where}: positions must be an int64 tensor of shape {tuple(shape)}, got {got}")

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        valid: Optional[Tensor] = None,
        routing: Optional[str] = None,
        positions: Optional[Tensor] = None,
        *,
        inplace: bool = False,
        block=None,
    ) -> MoDBlockOutput:
        """One MoD layer over full sequences (training, evaluation, causal recompute).

        Args:
            x: (B, S, D) hidden states, any floating dtype.
            valid: optional (B, S) bool, False for padding tokens (never routed).
            routing: "topk" or "causal" (default: the ``routing`` attribute).
            positions: optional (B, S) int64 true positions of the tokens (default
                ``arange(S)``), for a window that does not start at 0 or left-padded
                rows: the block then gets ``positions.gather(1, indices)``.
            inplace: see :func:`mod_block` (inference only; default False: x is
                never modified).
            block: the block of this call, instead of the module's own (e.g. the
                Hugging Face integration, whose block is built per call from the
                decoder layer's arguments); required when the module was built with
                ``block=None``.

        Returns:
            :class:`MoDBlockOutput` ``(output (B, S, D), aux_loss (scalar in topk mode,
            else None), routing (MoDOutput), causal_scores (B, S) detached)``.

        Raises:
            ValueError: bad shapes or options (named), causal mode without
                max_seq_len or with S > max_seq_len, routing="threshold" (renamed).
        """
        mode = routing or self.routing
        _check_routing(mode, "MoDBlock")
        self._check_x(x, "MoDBlock")
        self._check_positions(positions, x.shape[:2], "MoDBlock")
        block_fn = self._block_fn(positions, block=self._block(block, "MoDBlock"))
        pred = self.predictor(x) if self.predictor is not None else None  # (B, S), x detached
        thr = self.causal_threshold.to(torch.float32)
        z_aux = None
        if mode == "topk" and pred is None and self.router_aux_grad_scale != 1 and torch.is_grad_enabled():
            # The aux BCE's gradient reaches the router weight whole but the hidden states
            # only scaled by router_aux_grad_scale (a view of x: no copy of the hidden
            # state is kept for backward). Before mod_block: inplace may write x.
            z_aux = _router_logits(_ScaleGrad.apply(x, self.router_aux_grad_scale), self.router_weight,
                                   self.router_bias)
        if mode == "topk":
            # Random routing (the paper's baseline): top-k over fresh uniform scores.
            rand = torch.rand(x.shape[:2], device=x.device) if self.random_routing else None
            out = mod_block(
                x, self.router_weight, block_fn,
                capacity_factor=self.capacity_factor, router_bias=self.router_bias, valid=valid,
                router_activation=self.router_activation, routing="topk", scores=rand, inplace=inplace,
            )
            # Trains causal routing: the predictor (stop-gradient) or the router itself.
            logits = pred if pred is not None else self._platt(out.router_logits if z_aux is None else z_aux)
            aux = _aux_bce(logits, out.indices, valid)
            scores = logits.detach() - thr
        else:
            logits = pred if pred is not None else self.causal_logits(x)
            scores = logits.detach() - thr
            out = mod_block(
                x, self.router_weight, block_fn,
                capacity=self.causal_capacity(x.shape[1]), router_bias=self.router_bias, valid=valid,
                router_activation=self.router_activation, routing="causal", scores=scores, inplace=inplace,
            )
            aux = None
        return MoDBlockOutput(out.output, aux, out, scores)

    # ------------------------------------------------------------------ sampling

    def _check_cache(self, cache, where: str, batch: int, x: Tensor, block) -> None:
        if not isinstance(cache, MoDLayerCache):
            raise ValueError(f"{where}: cache must be a mod_ext.kv_cache.MoDLayerCache, got {type(cache).__name__}")
        if cache.batch != batch:
            raise ValueError(f"{where}: x has batch {batch}, the cache was allocated for batch {cache.batch}")
        if cache.device != x.device:
            raise ValueError(f"{where}: x is on {x.device}, the cache on {cache.device}")
        if not callable(getattr(block, "forward_cached", None)):
            raise ValueError(
                f"{where}: the block ({type(block).__name__}) does not implement the block protocol "
                "(mod_ext.kv_cache.CachedBlock: block(x, positions, slot_mask, write) and "
                "block.forward_cached(x, positions, write, read))"
            )

    def prefill(
        self,
        x: Tensor,
        cache: MoDLayerCache,
        valid: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        *,
        inplace: bool = False,
        block=None,
        static: bool = True,
    ) -> MoDBlockOutput:
        """Causal routing over a prompt, caching the routed tokens' keys and values.

        The rule of ``forward(routing="causal")`` (paper Section 3.5), capped at the
        cache's ``limit = min(slots, K)`` routed tokens per sequence: the routed tokens'
        keys/values go to cache slots 0..fill-1 in position order, padding slots write
        the scratch slot. The cache's sequences start here: fill is set to the routed
        count and drops/overflow to this prompt's (tokens that wanted the layer but did
        not fit; docs/MOD_SPEC.md section 4).

        Args:
            x: (B, T, D) the prompt's hidden states.
            cache: this layer's :class:`~mod_ext.kv_cache.MoDLayerCache` for B sequences.
            valid: optional (B, T) bool, False for (left) padding.
            positions: optional (B, T) int64 true positions (default ``arange(T)``).
            inplace: see :func:`mod_block`.
            block: the block of this call (see :meth:`forward`).
            static: True: the block runs on ``min(causal capacity, cache.limit)`` slots
                per row, padding included (static-shaped, no host sync). False (eager
                only; ignored under torch.compile): on as many slots as the row that
                routes most needs, read on the host: the same routed tokens and
                results, without running the block on padding slots (a prompt shorter
                than the causal capacity would otherwise run every token).

        Returns:
            :class:`MoDBlockOutput` (aux_loss None; with static=False the routing's
            slot dimension is the dynamic one).

        Raises:
            ValueError: bad shapes, a cache of another batch or device, a block without
                the block protocol, T > max_seq_len, no max_seq_len.
        """
        where = "MoDBlock.prefill"
        self._check_x(x, where)
        B, T, _ = x.shape
        block = self._block(block, where)
        self._check_cache(cache, where, B, x, block)
        self._check_positions(positions, (B, T), where)
        C = min(self.causal_capacity(T), cache.limit)
        _check_valid(where, valid, B, T)  # before the mask is used below
        scores = self.causal_scores(x)  # (B, T)
        want = scores.detach().float() > 0  # the causal rule's candidates (threshold_route's)
        if valid is not None:
            want = want & valid
        wanted = want.long().sum(1)
        if not static and not torch.compiler.is_compiling():
            # Each row routes min(wanted, C) tokens first come first served, so C' = the
            # largest of those routes the same tokens with fewer padding slots.
            C = max(1, int(wanted.clamp_max(C).max()))
        out = mod_block(
            x, self.router_weight, self._block_fn(positions, cache.prefill_write, block), capacity=C,
            router_bias=self.router_bias, valid=valid, router_activation=self.router_activation,
            routing="causal", scores=scores, inplace=inplace,
        )
        cache.record_prefill(out.slot_mask, wanted)
        return MoDBlockOutput(out.output, None, out, scores.detach())

    def decode(
        self,
        x: Tensor,
        cache: MoDLayerCache,
        positions: Tensor,
        active: Optional[Tensor] = None,
        *,
        decode_capacity: Optional[int] = None,
        static: bool = True,
        inplace: bool = False,
        block=None,
    ) -> Tensor:
        """One decode step of B sequences: each gets one new token, routed causally.

        A new token *wants* the layer when its causal score > 0 and its sequence is
        active; the candidates are those whose sequence holds fewer than ``cache.limit``
        routed tokens. They compete by expert-choice top-k over the batch (by causal
        score, :func:`mod_ext.topk_route`) for ``decode_capacity`` block slots; the
        winners run ``block.forward_cached`` against their own sequence's cached routed
        tokens (and append their key/value); unused block slots are padding, the others
        are dropped (counted in ``cache.drops``, and in ``cache.overflow`` when a full
        recompute would have routed them). With enough decode capacity and cache slots
        the result equals a full causal recompute (docs/MOD_SPEC.md sections 2-4).

        Args:
            x: (B, 1, D) the new tokens' hidden states.
            cache: this layer's :class:`~mod_ext.kv_cache.MoDLayerCache`.
            positions: (B, 1) int64 true positions of the new tokens.
            active: optional (B,) bool, False for finished sequences (never routed).
            decode_capacity: block slots, an int in [1, B]; default
                :func:`default_decode_capacity` ``(B, min(1, capacity_factor))``.
            static: True: static-shaped and free of host syncs (the block runs on
                decode_capacity rows, padding included; for CUDA graphs and
                torch.compile). False: the dynamic path, eager only: the block runs on
                the routed rows only and is skipped when none is routed (same results;
                reads the routing decision on the host). Under torch.compile the static
                path is always taken.
            inplace: see :func:`mod_block` (the decode loop of
                :mod:`mod_ext.generation` passes True under no_grad).
            block: the block of this call (see :meth:`forward`).

        Returns:
            (B, 1, D) the new tokens after the layer.

        Raises:
            ValueError: bad shapes, a cache of another batch or device, a block without
                the block protocol, decode_capacity outside [1, B].
        """
        where = "MoDBlock.decode"
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: x must have shape (B, 1, D) with D = d_model = {self.d_model}, got {got}")
        B, _, D = x.shape
        block = self._block(block, where)
        self._check_cache(cache, where, B, x, block)
        self._check_positions(positions, (B, 1), where)
        if decode_capacity is None:
            decode_capacity = default_decode_capacity(B, min(1.0, float(self.capacity_factor)))
        if isinstance(decode_capacity, bool) or not isinstance(decode_capacity, int) or not 1 <= decode_capacity <= B:
            raise ValueError(f"{where}: decode_capacity must be an int in [1, B = {B}], got {decode_capacity!r}")
        if active is not None and (
            not isinstance(active, torch.Tensor) or active.shape != (B,) or active.dtype != torch.bool
        ):
            got = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, torch.Tensor) else type(active).__name__
            raise ValueError(f"{where}: active must be a bool tensor of shape (B,) = ({B},), got {got}")

        scores = self.causal_scores(x)[:, 0].detach().float()  # (B,)
        want = scores > 0
        if active is not None:
            want = want & active
        candidate = cache.decode_candidates(want)
        idx, slot_mask = topk_route(scores.view(1, B), decode_capacity, candidate.view(1, B))  # (1, Dc) each
        selected = torch.zeros_like(want).scatter(0, idx[0], slot_mask[0])  # (B,)
        cache.record_decode(want, selected)
        if not static and not torch.compiler.is_compiling():
            # Dynamic path (eager): run the block on the routed rows only and skip it
            # when none is routed. Reading the mask is a host sync on a GPU, which is why
            # static decoding (the default there, and what CUDA graphs need) never does this.
            idx = idx[slot_mask].view(1, -1)
            if idx.shape[1] == 0:
                return x if inplace else x.clone()
            slot_mask = torch.ones_like(idx, dtype=torch.bool)
        n = idx.shape[1]
        rows, row_mask = idx[0], slot_mask[0]  # (n,)
        pos_sel = positions[:, 0].gather(0, rows)[:, None]  # (n, 1) true positions
        write, read = cache.decode_kv(rows, row_mask)

        def block_fn(x_sel: Tensor, indices: Tensor, mask: Tensor) -> Tensor:  # (1, n, D)
            xs = x_sel.view(n, 1, D)
            f = block.forward_cached(xs, pos_sel, write, read)  # (n, 1, D)
            if self.block_returns_residual:
                f = f - xs
            return f.reshape(1, n, D)

        z = _router_logits(x.view(1, B, D), self.router_weight, self.router_bias)  # (1, B)
        out = _apply(x.view(1, B, D), z, idx, slot_mask, block_fn, self.router_activation, inplace, where)
        return out.output.view(B, 1, D)
