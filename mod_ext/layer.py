"""The Mixture-of-Depths layer on top of the routing ops.

``mod_block`` is the functional form (one MoD layer around any block update ``f``);
``MoDBlock`` is the ``nn.Module`` that owns the router, the predictor and a user block.
Semantics: docs/MOD_SPEC.md sections 1-3; Raposo et al. 2024 (arXiv 2404.02258),
Sections 3.1-3.5. Nothing here synchronises with the host, so it traces with
``torch.compile(fullgraph=True)`` and captures in CUDA graphs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import gather_tokens, scatter_add_weighted, scatter_add_weighted_, threshold_route, topk_route

__all__ = [
    "MoDOutput",
    "RoutingMetrics",
    "capacity_for",
    "mod_block",
    "router_aux_loss",
    "topk_targets",
    "routing_metrics",
    "MoDPredictor",
    "MoDBlock",
]

BlockFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class MoDOutput(NamedTuple):
    """What :func:`mod_block` returns."""

    output: Tensor  #: (B, S, D), dtype of x: the residual stream after the layer
    router_logits: Tensor  #: (B, S) float32 (float64 for float64 x), differentiable
    indices: Tensor  #: (B, C) int64, ascending token positions of the slots
    slot_mask: Tensor  #: (B, C) bool, False for padding slots
    router_weights: Tensor  #: (B, C) float32 (float64 for float64 x), act(router logit); 0 for padding slots


def capacity_for(seq_len: int, capacity_factor: float) -> int:
    """Capacity ``k = min(S, max(1, ceil(c * S)))`` of a MoD layer (docs/MOD_SPEC.md section 1.2).

    Args:
        seq_len: S, the sequence length (int >= 1).
        capacity_factor: c > 0, the fraction of tokens routed (paper: 0.125).

    Returns:
        int in [1, S]. Depends only on shapes, so every MoD shape is static. ``c * S``
        is rounded to 9 decimals before the ceiling, so 0.7 * 10 gives 7, not 8.

    Raises:
        ValueError: seq_len < 1 or capacity_factor not a positive finite number.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"mod_ext.capacity_for: seq_len must be an int >= 1, got {seq_len!r}")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise ValueError(
            f"mod_ext.capacity_for: capacity_factor must be a positive number, got {capacity_factor!r}"
        )
    c = float(capacity_factor)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(
            f"mod_ext.capacity_for: capacity_factor must be a positive number, got {capacity_factor!r}"
        )
    seq_len = int(seq_len)
    return min(seq_len, max(1, math.ceil(round(c * seq_len, 9))))


def _check_mod_block_args(x, router_weight, router_bias, valid, scores, routing, router_activation, capacity):
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
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)):
        raise ValueError(f"mod_ext.mod_block: capacity must be an int in [1, S] or None, got {capacity!r}")
    if router_bias is not None and router_bias.numel() != 1:
        raise ValueError(
            f"mod_ext.mod_block: router_bias must be a scalar tensor, got shape {tuple(router_bias.shape)}"
        )
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (B, S)):
        raise ValueError(
            f"mod_ext.mod_block: valid must be a bool tensor of shape (B, S) = ({B}, {S}), got "
            f"{valid.dtype} {tuple(valid.shape)}"
        )
    if routing not in ("topk", "threshold"):
        raise ValueError(f"mod_ext.mod_block: routing must be 'topk' or 'threshold', got {routing!r}")
    if router_activation not in ("sigmoid", "identity"):
        raise ValueError(
            f"mod_ext.mod_block: router_activation must be 'sigmoid' or 'identity', got {router_activation!r}"
        )
    if scores is not None:
        if routing != "threshold":
            raise ValueError("mod_ext.mod_block: scores are only used with routing='threshold'")
        if scores.shape != (B, S):
            raise ValueError(
                f"mod_ext.mod_block: scores must have shape (B, S) = ({B}, {S}), got {tuple(scores.shape)}"
            )


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
) -> MoDOutput:
    """One Mixture-of-Depths layer: ``x' = x + r * f(x~)`` on the routed tokens only.

    Steps (docs/MOD_SPEC.md section 1): router logits ``z = x @ router_weight (+ bias)``
    in float32 (float64 for float64 x; the routing decision itself is always made on
    the float32-rounded logits, so two float64 logits closer than float32 resolution
    tie and go to the lower position); route C = capacity tokens per row; gather them in position order; run
    ``f = block_fn(x_sel, positions, slot_mask)``; add ``r * f`` back onto the routed
    rows, with ``r = act(z)`` for routed slots and 0 for padding slots. Tokens that
    are not routed pass through bit for bit.

    Args:
        x: (B, S, D) hidden states (residual stream), any floating dtype.
        router_weight: (D,) router projection ``w_r``.
        block_fn: ``f(x_sel (B, C, D), positions (B, C) int64, slot_mask (B, C) bool)
            -> (B, C, D)``: the block's *update* (attention + MLP output, without the
            residual). Attention inside it must be causal in slot order (= position
            order), use ``positions`` for rotary encodings, and ignore keys whose
            slot_mask is False. Its output is cast to x.dtype.
        capacity: slots per row C, 1 <= C <= S. Default ``capacity_for(S, capacity_factor)``.
        capacity_factor: c, used when capacity is None (paper: 0.125).
        router_bias: optional scalar bias added to the router logits (a 1-element
            tensor, differentiable, or a Python number).
        valid: optional (B, S) bool; invalid tokens are never routed (padding).
        router_activation: "sigmoid" (bounded router weight) or "identity" (the
            paper's raw scalar ``r = w_r . x``).
        routing: "topk" (expert-choice top-k over the sequence; training) or
            "threshold" (causal first-come-first-served by ``scores > 0``; sampling).
        scores: (B, S) causal routing scores (predictor logits) for
            routing="threshold"; the router logits when None.

    Returns:
        :class:`MoDOutput` ``(output, router_logits, indices, slot_mask, router_weights)``.
        Under ``torch.no_grad()`` / ``torch.inference_mode()`` the update is written
        into x in place (:func:`mod_ext.scatter_add_weighted_`) and ``output`` is x
        itself, so serving never copies the (B, S, D) hidden state; pass ``x.clone()``
        to keep x. With grad mode on, x is never modified.
        Routing itself is not differentiable; gradients reach x, router_weight,
        router_bias and the block through ``r * f`` (paper Section 3.4).

    Raises:
        ValueError: bad shapes, dtypes or option strings (the message names the argument).
        RuntimeError: from the ops, e.g. capacity outside [1, S].
    """
    if router_bias is not None and not isinstance(router_bias, torch.Tensor):
        router_bias = torch.as_tensor(router_bias, dtype=torch.float32)
    _check_mod_block_args(x, router_weight, router_bias, valid, scores, routing, router_activation, capacity)
    B, S, D = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    router_logits = torch.matmul(x.to(acc), router_weight.to(acc))  # (B, S)
    if router_bias is not None:
        router_logits = router_logits + router_bias.to(device=x.device, dtype=acc).reshape(())
    if capacity is None:
        capacity = capacity_for(S, capacity_factor)

    # Routing decisions are made on float32 logits (MOD_SPEC 1.1) and carry no gradient.
    if routing == "topk":
        indices, slot_mask = topk_route(router_logits.detach().float(), capacity, valid)
    else:
        src = router_logits if scores is None else scores
        indices, slot_mask = threshold_route(src.detach().float(), capacity, valid)

    logits_sel = router_logits.gather(1, indices)  # (B, C)
    r = torch.sigmoid(logits_sel) if router_activation == "sigmoid" else logits_sel
    r = torch.where(slot_mask, r, torch.zeros_like(r))  # padding slots: router weight 0

    x_sel = gather_tokens(x, indices)  # (B, C, D)
    f = block_fn(x_sel, indices, slot_mask)
    if not isinstance(f, torch.Tensor) or f.shape != x_sel.shape:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(
            f"mod_ext.mod_block: block_fn must return the update of shape (B, C, D) = "
            f"{tuple(x_sel.shape)} as a tensor, got {got}"
        )
    # A padding slot's update must change nothing, even if the block returned NaN/inf
    # there: with f = -0.0 and r = 0 the update is 0 * -0.0 = -0.0, and x + -0.0 == x
    # bit for bit for every x (including -0.0 and NaN).
    f = torch.where(slot_mask.unsqueeze(-1), f.to(x.dtype), torch.full_like(x_sel, -0.0))
    if torch.is_grad_enabled():
        out = scatter_add_weighted(x, f, indices, r)
    else:  # inference: update the C routed rows of x in place, no copy of the hidden state
        out = scatter_add_weighted_(x, f, indices, r)
    return MoDOutput(out, router_logits, indices, slot_mask, r)


def topk_targets(router_logits: Tensor, indices: Tensor) -> Tensor:
    """(B, S) float 0/1 targets: 1 at the positions in ``indices`` (per row), else 0.

    Built per row with ``scatter`` on dim 1, never on a flattened (B*S) tensor
    (docs/MOD_SPEC.md section 6).
    """
    return torch.zeros_like(router_logits).scatter(1, indices, 1.0)


def _masked_mean(values: Tensor, valid: Optional[Tensor]) -> Tensor:
    if valid is None:
        return values.mean()
    v = valid.to(values.dtype)
    return (values * v).sum() / v.sum().clamp_min(1.0)


def router_aux_loss(router_logits: Tensor, indices: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Auxiliary BCE loss that makes the router logits causal-usable (Section 3.5).

    Mean binary cross-entropy with logits between ``router_logits`` and the per-row
    top-k membership targets (1 at ``indices``, 0 elsewhere), over valid tokens. At
    sampling time a token is then routed when its logit > 0. Also the predictor's loss
    (pass the predictor logits as ``router_logits``).

    Args:
        router_logits: (B, S) float logits (router or predictor).
        indices: (B, C) int64 top-k positions from :func:`mod_ext.topk_route`.
        valid: optional (B, S) bool; invalid tokens are left out of the mean.

    Returns:
        Scalar tensor, dtype of router_logits.

    Raises:
        ValueError: shapes that do not match.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"mod_ext.router_aux_loss: router_logits must be (B, S), got {tuple(router_logits.shape)}")
    if indices.dim() != 2 or indices.shape[0] != router_logits.shape[0]:
        raise ValueError(
            f"mod_ext.router_aux_loss: indices must be (B, C) with B = {router_logits.shape[0]}, got {tuple(indices.shape)}"
        )
    if valid is not None and valid.shape != router_logits.shape:
        raise ValueError(
            f"mod_ext.router_aux_loss: valid must have shape (B, S) = {tuple(router_logits.shape)}, got {tuple(valid.shape)}"
        )
    targets = topk_targets(router_logits, indices)
    bce = F.binary_cross_entropy_with_logits(router_logits, targets, reduction="none")
    return _masked_mean(bce, valid)


class RoutingMetrics(NamedTuple):
    """How well a causal score predicts top-k membership (0-d float tensors)."""

    accuracy: Tensor  #: fraction of valid tokens where (score > 0) == top-k membership
    recall: Tensor  #: fraction of top-k tokens that the causal rule (threshold_route) also routes
    routed_fraction: Tensor  #: fraction of valid tokens that the causal rule routes


def routing_metrics(
    scores: Tensor, indices: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> RoutingMetrics:
    """Compare causal routing by ``scores`` with expert-choice top-k ``indices``.

    At capacity 0.125 a score that never routes is already 87.5% accurate, so recall
    (the fraction of top-k tokens the causal rule also routes) is reported beside
    accuracy. Computed on device, no host sync.

    Args:
        scores: (B, S) predictor or router logits.
        indices: (B, C) top-k positions (the targets).
        capacity: the causal rule's capacity (slots per row).
        valid: optional (B, S) bool.
    """
    targets = topk_targets(scores.float(), indices) > 0.5
    if valid is not None:
        targets = targets & valid
    agree = ((scores > 0) == targets).float()
    c_idx, c_mask = threshold_route(scores.detach().float(), capacity, valid)
    causal = torch.zeros_like(targets).scatter(1, c_idx, c_mask)
    hits = (causal & targets).float().sum()
    recall = hits / targets.float().sum().clamp_min(1.0)
    return RoutingMetrics(
        accuracy=_masked_mean(agree, valid),
        recall=recall,
        routed_fraction=_masked_mean(causal.float(), valid),
    )


class MoDPredictor(nn.Module):
    """Small MLP that predicts top-k membership causally (paper Section 3.5).

    Reads the router's input with a stop-gradient, so training it never changes the
    language-model loss. ``forward(x (B, S, D)) -> logits (B, S) float32``; a token is
    routed at sampling time when its logit > 0.
    """

    def __init__(self, d_model: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or max(16, d_model // 4)
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.detach()).squeeze(-1).float()  # (B, S)

    def loss(self, x: Tensor, indices: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """BCE of the predictor logits against top-k membership (stop-gradient on x)."""
        return router_aux_loss(self(x), indices, valid)


class MoDBlock(nn.Module):
    """Turn a transformer block into a Mixture-of-Depths block in one line.

    ``MoDBlock(block, d_model)`` owns the router (``router_weight`` (D,),
    ``router_bias`` ()), the predictor and ``block``. ``block(x_sel, positions,
    slot_mask)`` gets the routed tokens (B, C, D), their true positions (B, C) and the
    slot mask (B, C), and returns the update ``f`` (B, C, D) without the residual (or
    ``x_sel + f`` when ``block_returns_residual=True``; f is then recovered by
    subtraction, which costs precision in low-precision dtypes).

    Modes (``routing`` argument or the ``routing`` attribute):
      * ``"topk"`` (training): expert-choice top-k at ``capacity_factor``; after each
        call ``aux_loss`` holds the scalar loss that trains causal routing (the
        predictor's BCE, or the router's auxiliary BCE when ``causal_router="router"``)
        and ``last_output`` the :class:`MoDOutput`; ``last_scores`` holds the (B, S)
        causal scores (predictor or router logits) of the same call, for
        :func:`routing_metrics`.
      * ``"causal"`` (sampling): routes token by token by predictor logit > 0 (or
        router logit > 0), first come first served, at most ``capacity_for(max_seq_len,
        capacity_factor)`` tokens per row (all tokens of shorter inputs may route),
        so a token's decision never depends on later tokens or on the input length.

    Args:
        block: the residual function f.
        d_model: D.
        capacity_factor: c (paper: 0.125).
        router_activation: "sigmoid" or "identity".
        causal_router: "predictor" or "router".
        max_seq_len: the longest input; it fixes the causal capacity, and causal mode
            requires it (ValueError otherwise).
        predictor_hidden: predictor MLP width.
        block_returns_residual: see above.

    ``forward(x (B, S, D), valid=None, routing=None, positions=None) -> (B, S, D)``;
    ``positions`` (B, S) int64 are the tokens' true positions (default ``arange(S)``),
    for a window that does not start at 0 or left-padded rows: the block then gets
    ``positions.gather(1, indices)``.
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
    ):
        super().__init__()
        if causal_router not in ("predictor", "router"):
            raise ValueError(f"MoDBlock: causal_router must be 'predictor' or 'router', got {causal_router!r}")
        if router_activation not in ("sigmoid", "identity"):
            raise ValueError(
                f"MoDBlock: router_activation must be 'sigmoid' or 'identity', got {router_activation!r}"
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
        self.router_bias = nn.Parameter(torch.zeros(()))
        self.predictor = MoDPredictor(d_model, predictor_hidden) if causal_router == "predictor" else None
        self.routing = "topk"
        self.aux_loss: Optional[Tensor] = None
        self.last_output: Optional[MoDOutput] = None
        self.last_scores: Optional[Tensor] = None

    def _block_fn(self, positions: Optional[Tensor]):
        def f(x_sel: Tensor, indices: Tensor, slot_mask: Tensor) -> Tensor:
            pos = indices if positions is None else positions.gather(1, indices)
            out = self.block(x_sel, pos, slot_mask)
            return out - x_sel if self.block_returns_residual else out

        return f

    def causal_capacity(self, seq_len: int) -> int:
        """Slots per row in causal mode for an input of length seq_len.

        ``min(seq_len, capacity_for(max_seq_len, capacity_factor))``: fixed by
        ``max_seq_len``, not by the input length, so a prefix routes exactly as it does
        inside a longer input (with seq_len <= the fixed capacity the cap cannot bind).

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
        return min(seq_len, capacity_for(self.max_seq_len, self.capacity_factor))

    def causal_scores(self, x: Tensor) -> Tensor:
        """(B, S) float32 scores that route causally (> 0 routes)."""
        if self.predictor is not None:
            return self.predictor(x)
        z = torch.matmul(x.float(), self.router_weight.float()) + self.router_bias.float()
        return z

    def forward(
        self,
        x: Tensor,
        valid: Optional[Tensor] = None,
        routing: Optional[str] = None,
        positions: Optional[Tensor] = None,
    ) -> Tensor:
        mode = routing or self.routing
        if mode not in ("topk", "causal"):
            raise ValueError(f"MoDBlock: routing must be 'topk' or 'causal', got {mode!r}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoDBlock: x must have shape (B, S, D) with D = d_model = {self.d_model}, got {tuple(x.shape)}"
            )
        if positions is not None and (positions.shape != x.shape[:2] or positions.dtype != torch.int64):
            raise ValueError(
                f"MoDBlock: positions must be an int64 tensor of shape (B, S) = {tuple(x.shape[:2])}, "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        block_fn = self._block_fn(positions)
        pred = self.predictor(x) if self.predictor is not None else None  # (B, S), x detached
        if mode == "topk":
            out = mod_block(
                x, self.router_weight, block_fn,
                capacity_factor=self.capacity_factor, router_bias=self.router_bias, valid=valid,
                router_activation=self.router_activation, routing="topk",
            )
            # Trains causal routing: the predictor (stop-gradient) or the router itself.
            scores = pred if pred is not None else out.router_logits
            self.aux_loss = router_aux_loss(scores, out.indices, valid)
        else:
            out = mod_block(
                x, self.router_weight, block_fn,
                capacity=self.causal_capacity(x.shape[1]), router_bias=self.router_bias, valid=valid,
                router_activation=self.router_activation, routing="threshold", scores=pred,
            )
            scores = pred if pred is not None else out.router_logits
            self.aux_loss = None
        self.last_output = out
        self.last_scores = scores.detach()
        return out.output
