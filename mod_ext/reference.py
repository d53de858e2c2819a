"""Plain-PyTorch references (oracles) for every mod_ext op.

Each function here states the semantics of the op of the same name in a few
lines of stock PyTorch, with no attempt at speed. The tests compare the compiled
kernels against these; readers should start here before reading ``csrc/``.
Source: ``docs/MOD_SPEC.md`` sections 1-3 (Raposo et al. 2024, arXiv 2404.02258,
Sections 3.1-3.5).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "topk_route_ref",
    "threshold_route_ref",
    "gather_tokens_ref",
    "scatter_add_weighted_ref",
    "router_logits_ref",
]


def _valid_or_all(scores: Tensor, valid: Optional[Tensor]) -> Tensor:
    if valid is None:
        return torch.ones_like(scores, dtype=torch.bool)
    return valid


def topk_route_ref(
    router_logits: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Expert-choice top-k: (indices (B, C) int64 ascending, slot_mask (B, C) bool).

    Order of preference within a row: valid numbers by value (largest first),
    then valid NaN, then invalid tokens; ties go to the lower position.
    """
    valid = _valid_or_all(router_logits, valid)
    value = router_logits.float()
    nan = torch.isnan(value)
    # class 0 = valid number, 1 = valid NaN, 2 = invalid (lower is better)
    cls = torch.where(valid, nan.long(), torch.full_like(nan, 2, dtype=torch.long))
    value = torch.where(cls == 0, value, torch.zeros_like(value))
    value = torch.where(value == 0, torch.zeros_like(value), value)  # -0.0 ties with +0.0
    # Lexicographic stable sort: by value (descending), then by class (ascending).
    order = torch.sort(value, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(cls.gather(1, order), dim=1, stable=True).indices)
    indices = torch.sort(order[:, :capacity], dim=1).values
    return indices, valid.gather(1, indices)


def threshold_route_ref(
    scores: Tensor, capacity: int, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Causal routing: token t is routed when scores[t] > 0, it is valid, and fewer
    than ``capacity`` earlier tokens of its row were routed. Unused slots are padded
    with the lowest-position unrouted tokens (slot_mask False)."""
    valid = _valid_or_all(scores, valid)
    want = valid & (scores.float() > 0)
    earlier = torch.cumsum(want.long(), dim=1) - want.long()
    routed = want & (earlier < capacity)
    n_routed = routed.long().sum(dim=1, keepdim=True)
    unrouted = ~routed
    unrouted_rank = torch.cumsum(unrouted.long(), dim=1) - unrouted.long()
    padding = unrouted & (unrouted_rank < capacity - n_routed)
    chosen = routed | padding  # exactly `capacity` per row
    # Positions of the chosen tokens, ascending: sort chosen first, stable by position.
    order = torch.sort((~chosen).long(), dim=1, stable=True).indices
    indices = order[:, :capacity]
    return indices, routed.gather(1, indices)


def gather_tokens_ref(x: Tensor, indices: Tensor) -> Tensor:
    """out[b, j] = x[b, indices[b, j]]; x (B, S, D), indices (B, C) -> (B, C, D)."""
    return torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_add_weighted_ref(x: Tensor, y: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """out = x; out[b, indices[b, j]] += weights[b, j] * y[b, j], computed in float32
    (float64 stays float64) and rounded once to x.dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    update = weights.to(acc).unsqueeze(-1) * y.to(acc)
    idx = indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    out = x.to(acc).scatter_add(1, idx, update).to(x.dtype)
    # Rows that no slot points at are passed through bit for bit.
    touched = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    touched.scatter_(1, indices, True)
    return torch.where(touched.unsqueeze(-1), out, x)


def router_logits_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z = x @ weight (+ bias) in float32 (float64 for float64 x): (B, S, D) -> (B, S).
    This is the expression mod_block computed its router logits with; for float32 x the
    op is bit-identical to it."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = torch.matmul(x.to(acc), weight.to(acc))
    return z if bias is None else z + bias.to(acc).reshape(())
