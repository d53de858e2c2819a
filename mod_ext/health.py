"""Router health signals of the MoD layers, accumulated on device, read at logging intervals.

A Mixture-of-Depths router can fail without the loss showing it for a long time. The
signals :class:`RouterHealth` accumulates per MoD layer, and what each one catches:

* **router logit mean / std / min / max** (valid tokens): a *dead router* (std near 0:
  every token gets the same logit, so top-k picks by position ties, i.e. the first C
  positions) or a router that drifts or blows up (mean, min/max far from 0).
* **positions_ever_routed** (fraction of the positions 0..seq_len-1 that were routed
  in at least one row of the interval) and **routed_position_entropy** (normalised
  entropy of the routed-position histogram, 1 = uniform over seq_len positions): *router
  collapse* onto a fixed set of positions (e.g. always the first or last C tokens),
  which a per-step routed fraction cannot see (it is C / S by construction).
  ``positions_ever_valid`` is the same fraction for the positions that held a valid
  token, the ceiling of positions_ever_routed for shorter windows or padded batches.
* **causal_predicted_rate** (mean sigmoid of the causal score), **topk_rate**
  (fraction of valid tokens top-k routed), **calibration_gap** (their difference),
  **causal_positive_rate** (fraction with score > 0, what causal routing at sampling
  time would route before its capacity cap) and **calibration_ece** (expected
  calibration error, 10 equal-width bins of sigmoid(score) against top-k membership):
  an *overconfident or miscalibrated predictor* (or router, with
  ``causal_router="router"``), which makes sampling route far more or fewer tokens
  than training did.
* **nonfinite_router_logits / nonfinite_causal_scores / nonfinite_output** (NaN/inf
  counts over valid tokens): *NaN*. NaN router logits rank lowest in top-k (a row of
  NaN routes positions 0..C-1 whatever its tokens), so routing degrades silently where
  they are not routed; NaN causal scores are never > 0 (never routed at sampling time).
  :meth:`RouterHealth.report` raises :class:`RouterHealthError` naming the layer and
  the quantity.

Padding never counts: tokens with ``valid`` False and slots with ``slot_mask`` False
are left out of every signal.

Cost model: :meth:`RouterHealth.update` does no host sync (only device-side tensor ops
into one preallocated float64 buffer: no ``.item()``, ``bool(tensor)``, ``nonzero``,
boolean-mask indexing or data-dependent Python branches), so it can be called eagerly
every step (or micro-batch) next to a compiled model without stalling the GPU's queue;
it runs a few dozen small kernels per MoD layer, one of which reads the layer's
(B, S, D) output once. :meth:`RouterHealth.report` is the single
host read per logging interval: one device-to-host copy of the buffer, then a reset.

Usage::

    health = RouterHealth(model.mod_layer_ids, cfg.block_size, device="cuda")
    for step, (x, y) in enumerate(batches):
        out = model(x, y, return_routing=True)
        out.loss.backward(); opt.step(); opt.zero_grad()
        health.update(out.mod_layer_outputs, step=step)
        if step % 100 == 99:
            log(health.report())  # raises RouterHealthError on NaN/inf
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ._args import as_int

__all__ = ["RouterHealth", "RouterHealthError", "ECE_BINS"]

#: number of equal-width probability bins of ``calibration_ece``
ECE_BINS = 10

# Per-layer scalar accumulators: column of each in the (L, K) float64 buffer. Counts are
# stored as float64 too (exact up to 2**53), so the whole state is read in one copy.
_N_VALID = 0  # valid tokens
_LOGIT_N = 1  # finite router logits of valid tokens
_LOGIT_SUM = 2
_LOGIT_SUMSQ = 3
_LOGIT_MIN = 4  # +inf when none
_LOGIT_MAX = 5  # -inf when none
_SCORE_N = 6  # finite causal scores of valid tokens
_PROB_SUM = 7  # sum of sigmoid(score) over those
_POSITIVE_N = 8  # score > 0 among those
_TOPK_N = 9  # valid tokens in the top-k (real slots)
_NONFINITE_LOGITS = 10
_NONFINITE_SCORES = 11
_NONFINITE_OUTPUT = 12
_OUTPUT_VALUES = 13  # values of output checked: valid tokens * D
_ROUTED_SLOTS = 14  # real slots (slot_mask True)
_N_SCALARS = 15

# (field name in the report, column of its count, column of its total, what it is)
_NONFINITE = (
    ("nonfinite_router_logits", _NONFINITE_LOGITS, _N_VALID, "router logits",
     "NaN router logits rank lowest in top-k (a row of NaN routes positions 0..C-1 whatever its tokens), "
     "so routing degrades silently where they are not routed, and a routed NaN logit makes that token's "
     "router weight and update NaN"),
    ("nonfinite_causal_scores", _NONFINITE_SCORES, _N_VALID,
     "causal scores (predictor logits, or the router logits with causal_router='router')",
     "causal routing at sampling time thresholds them at 0 (NaN is never > 0, so those tokens are never "
     "routed) and the aux BCE that trains them is NaN/inf"),
    ("nonfinite_output", _NONFINITE_OUTPUT, _OUTPUT_VALUES, "values of the hidden states output",
     "the residual stream after this layer is broken and the loss is, or soon will be, NaN/inf"),
)

_ADVICE = ("Lower the learning rate (or clip gradients), use router_activation='sigmoid' (bounded router "
           "weights), or train in float32 or bfloat16 autocast rather than float16.")


class RouterHealthError(RuntimeError):
    """NaN/inf in a MoD layer's router logits, causal scores or output (raised by
    :meth:`RouterHealth.report`). The message names the first such MoD layer by depth
    index and the quantity; ``report`` holds the report dict of the interval and
    ``layer_id`` / ``quantity`` the first failure."""

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None,
                 layer_id: Optional[int] = None, quantity: Optional[str] = None):
        super().__init__(message)
        self.report = report
        self.layer_id = layer_id
        self.quantity = quantity


def _shape_error(where: str, name: str, expected: str, t) -> ValueError:
    got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
    return ValueError(f"{where}: {name} must be {expected}, got {got}")


class RouterHealth:
    """Router health signals of the MoD layers ``layer_ids`` over a logging interval.

    Args:
        layer_ids: depth index of each MoD layer (``model.mod_layer_ids``), a sequence
            of distinct ints >= 0, in the order :meth:`update` gets the layers' outputs.
        seq_len: the longest sequence (window) the model sees, an int >= 1
            (``cfg.block_size``): the length of the routed-position histogram.
        device: where the accumulators live (a ``torch.device`` or string); None: the
            device of the first :meth:`update`'s tensors.

    Raises:
        ValueError: layer_ids not a sequence of distinct ints >= 0, seq_len not an int
            >= 1, or an invalid device (the message names the argument).
    """

    def __init__(self, layer_ids: Sequence[int], seq_len: int, device=None):
        where = "mod_ext.health.RouterHealth"
        if isinstance(layer_ids, (str, bytes)) or not isinstance(layer_ids, Sequence):
            raise ValueError(f"{where}: layer_ids must be a sequence of ints (model.mod_layer_ids), "
                             f"got {type(layer_ids).__name__}")
        ids = [as_int(i, f"layer_ids[{k}]", 0, where=where) for k, i in enumerate(layer_ids)]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: layer_ids must be distinct, got {ids}")
        self.layer_ids: List[int] = ids
        self.seq_len: int = as_int(seq_len, "seq_len", 1, where=where)
        if device is not None:
            try:
                device = torch.device(device)
            except (TypeError, RuntimeError) as e:
                raise ValueError(f"{where}: device must be a torch.device, a device string or None, "
                                 f"got {device!r}") from e
        self.device: Optional[torch.device] = device
        L, S = len(ids), self.seq_len
        self._pos = _N_SCALARS  # routed-position histogram (seq_len,)
        self._valid_pos = self._pos + S  # valid-token position histogram (seq_len,)
        self._bins = self._valid_pos + S  # ECE bins: count, sum of prob, sum of label (3 * ECE_BINS)
        self._width = self._bins + 3 * ECE_BINS
        self._acc: Optional[Tensor] = None  # (L, width) float64, allocated on the device
        self._n_updates = 0
        self._first_step: Optional[int] = None
        self._last_step: Optional[int] = None
        self._L = L
        if device is not None:
            self._allocate(device)

    # ------------------------------------------------------------------ state

    def _allocate(self, device: torch.device) -> None:
        with torch.inference_mode(False):  # a normal tensor even when first used under inference_mode
            self._acc = torch.zeros(self._L, self._width, dtype=torch.float64, device=device)
            self._reset()
        self.device = device

    def _reset(self) -> None:
        acc = self._acc
        acc.zero_()
        acc[:, _LOGIT_MIN].fill_(math.inf)
        acc[:, _LOGIT_MAX].fill_(-math.inf)
        self._n_updates = 0
        self._first_step = self._last_step = None

    # ------------------------------------------------------------------ update

    def _check(self, outputs, valid):
        where = "mod_ext.health.RouterHealth.update"
        if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence):
            raise ValueError(f"{where}: outputs must be a sequence of MoDBlockOutput (the model's "
                             f"mod_layer_outputs), got {type(outputs).__name__}")
        if len(outputs) != self._L:
            raise ValueError(f"{where}: outputs has {len(outputs)} entries, but this RouterHealth tracks "
                             f"{self._L} MoD layers (layer_ids {self.layer_ids}); pass the model's "
                             "mod_layer_outputs (forward(..., return_routing=True))")
        shape = None  # (B, S) of the first layer
        device = self.device
        for o, lid in zip(outputs, self.layer_ids):
            pre = f"outputs[layer {lid}]"
            routing = getattr(o, "routing", None)
            z = getattr(routing, "router_logits", None)
            idx = getattr(routing, "indices", None)
            mask = getattr(routing, "slot_mask", None)
            scores = getattr(o, "causal_scores", None)
            out = getattr(o, "output", None)
            if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
                raise _shape_error(where, f"{pre}.routing.router_logits", "a floating-point tensor of shape (B, S)", z)
            B, S = z.shape
            if S > self.seq_len:
                raise ValueError(f"{where}: {pre}.routing.router_logits has S = {S} > seq_len = {self.seq_len}")
            if shape is None:
                shape = (B, S)
            elif (B, S) != shape:
                raise ValueError(f"{where}: {pre}.routing.router_logits has shape {(B, S)}, but the first layer's "
                                 f"has {shape}")
            if (not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 2
                    or idx.shape[0] != B or idx.shape[1] > S):
                raise _shape_error(where, f"{pre}.routing.indices", f"an int64 tensor of shape (B, C) with "
                                   f"B = {B}, C <= S = {S}", idx)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != idx.shape:
                raise _shape_error(where, f"{pre}.routing.slot_mask", f"a bool tensor of shape (B, C) = "
                                   f"{tuple(idx.shape)}", mask)
            if not isinstance(scores, Tensor) or scores.shape != (B, S) or not scores.is_floating_point():
                raise _shape_error(where, f"{pre}.causal_scores", f"a floating-point tensor of shape (B, S) = "
                                   f"{(B, S)}", scores)
            if (not isinstance(out, Tensor) or out.dim() != 3 or out.shape[:2] != (B, S)
                    or not out.is_floating_point()):
                raise _shape_error(where, f"{pre}.output", f"a floating-point tensor of shape (B, S, D) with "
                                   f"(B, S) = {(B, S)}", out)
            for name, t in (("routing.router_logits", z), ("routing.indices", idx), ("routing.slot_mask", mask),
                            ("causal_scores", scores), ("output", out)):
                if device is None:
                    device = t.device
                if t.device != device:
                    raise ValueError(f"{where}: {pre}.{name} is on {t.device}, the accumulators on {device}")
        if valid is not None:
            if shape is None:
                raise ValueError(f"{where}: valid must be None when there are no MoD layers")
            if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != shape:
                raise _shape_error(where, "valid", f"a bool tensor of shape (B, S) = {shape}", valid)
            if valid.device != device:
                raise ValueError(f"{where}: valid is on {valid.device}, the accumulators on {device}")
        return device

    def update(self, outputs: Sequence[Any], valid: Optional[Tensor] = None, step: Optional[int] = None) -> None:
        """Accumulate one forward's routing (device-side only: no host sync).

        Args:
            outputs: one :class:`mod_ext.MoDBlockOutput` per MoD layer, in the order of
                ``layer_ids`` (``model(..., return_routing=True).mod_layer_outputs``):
                ``routing.router_logits`` (B, S) float (float32, bfloat16, float64...),
                ``routing.indices`` (B, C) int64, ``routing.slot_mask`` (B, C) bool,
                ``causal_scores`` (B, S) float, ``output`` (B, S, D) float, all with
                the same B and S <= seq_len. Read only, never modified; no gradient.
                Outputs of a causal-routing forward work too (``topk_rate`` is then the
                causally routed fraction).
            valid: optional (B, S) bool, False for padding tokens (left out of every
                signal), as given to the model's forward.
            step: optional training step (a Python int), remembered on the host for
                the report's ``steps`` and the error messages.

        Raises:
            ValueError: a wrong number of outputs, shapes/dtypes/devices that do not
                match, or a bad step (checked on metadata only, no data is read).
        """
        where = "mod_ext.health.RouterHealth.update"
        step = as_int(step, "step", 0, where=where, allow_none=True)
        device = self._check(outputs, valid)
        if self._acc is None:
            if device is None:  # no MoD layers and no device: nothing to accumulate on
                device = torch.device("cpu")
            self._allocate(device)
        with torch.no_grad():
            for row, o in enumerate(outputs):
                self._update_layer(row, o, valid)
        self._n_updates += 1
        if step is not None:
            if self._first_step is None:
                self._first_step = step
            self._last_step = step

    def _update_layer(self, row: int, o, valid: Optional[Tensor]) -> None:
        acc = self._acc[row]
        z = o.routing.router_logits.detach()
        idx = o.routing.indices.detach()
        slot = o.routing.slot_mask.detach()
        scores = o.causal_scores.detach()
        out = o.output.detach()
        B, S = z.shape
        f64 = torch.float64
        if valid is None:
            valid = torch.ones(B, S, dtype=torch.bool, device=z.device)
        v64 = valid.to(f64)

        # router logits (float64)
        z64 = z.to(f64)
        z_fin = torch.isfinite(z64)
        z_ok = z_fin & valid
        zm = torch.where(z_ok, z64, 0.0)
        # scores: sigmoid in float64; non-finite / padding tokens out (0 weight, bin 0)
        s64 = scores.detach().to(f64)
        s_fin = torch.isfinite(s64)
        s_ok = s_fin & valid
        s_ok64 = s_ok.to(f64)
        prob = torch.where(s_ok, torch.sigmoid(torch.where(s_fin, s64, 0.0)), 0.0)
        # top-k membership per row (real slots only; scatter_add so a padding slot that
        # shares an index with a real one cannot overwrite it)
        label = torch.zeros(B, S, dtype=f64, device=z.device).scatter_add_(1, idx, slot.to(f64)).clamp_max_(1.0)
        label = label * v64
        out_bad = (~torch.isfinite(out)).sum(-1)  # (B, S) int64
        n_valid = v64.sum()
        stats = torch.stack([
            n_valid,
            z_ok.to(f64).sum(),
            zm.sum(),
            (zm * zm).sum(),
            zm.new_zeros(()),  # min / max below
            zm.new_zeros(()),
            s_ok64.sum(),
            prob.sum(),
            ((s64 > 0) & s_ok).to(f64).sum(),
            label.sum(),
            (~z_fin & valid).to(f64).sum(),
            (~s_fin & valid).to(f64).sum(),
            (out_bad.to(f64) * v64).sum(),
            n_valid * out.shape[-1],
            slot.to(f64).sum(),
        ])
        acc[:_N_SCALARS].add_(stats)
        if z.numel():  # a shape, not a data read
            lo = torch.where(z_ok, z64, math.inf).amin()
            hi = torch.where(z_ok, z64, -math.inf).amax()
            acc[_LOGIT_MIN].copy_(torch.minimum(acc[_LOGIT_MIN], lo))
            acc[_LOGIT_MAX].copy_(torch.maximum(acc[_LOGIT_MAX], hi))

        # routed-position histogram (real slots only) and valid-position histogram
        hist = acc[self._pos:self._pos + self.seq_len]
        hist.scatter_add_(0, idx.reshape(-1).clamp(0, self.seq_len - 1), slot.reshape(-1).to(f64))
        acc[self._valid_pos:self._valid_pos + S].add_(v64.sum(0))

        # calibration bins: count, sum of prob, sum of label per bin of sigmoid(score)
        b = (prob * ECE_BINS).floor().clamp_(0, ECE_BINS - 1).long().reshape(-1)
        bins = acc[self._bins:self._bins + 3 * ECE_BINS].view(3, ECE_BINS)
        bins[0].scatter_add_(0, b, s_ok64.reshape(-1))
        bins[1].scatter_add_(0, b, prob.reshape(-1))
        bins[2].scatter_add_(0, b, (label * s_ok64).reshape(-1))

    # ------------------------------------------------------------------ report

    def report(self) -> Dict[str, Any]:
        """Read the interval's signals to the host (one copy), reset, and return them.

        Returns:
            ``{"steps": [first, last] or None, "layers": {str(layer_id): fields}}``,
            ``{"steps": None, "layers": {}}`` when there was no update since the last
            report. ``steps`` is None when no update got a ``step``. Per layer (Python
            floats/ints; None where the interval had nothing to average):

            * ``tokens``: valid tokens seen; ``routed_slots``: real (non-padding) slots.
            * ``router_logit_mean``, ``router_logit_std`` (population), ``router_logit_min``,
              ``router_logit_max``: over the finite router logits of valid tokens.
            * ``positions_ever_routed``: fraction of positions 0..seq_len-1 routed in
              at least one row; ``positions_ever_valid``: fraction that held a valid
              token (its ceiling); ``routed_position_entropy``: entropy of the routed
              positions' histogram / log(seq_len), in [0, 1] (1 = uniform; 1 for seq_len 1).
            * ``causal_predicted_rate`` (mean sigmoid(score)), ``topk_rate``,
              ``calibration_gap`` (= predicted - topk), ``causal_positive_rate``
              (score > 0), ``calibration_ece`` (10 equal-width bins of sigmoid(score)
              against top-k membership, weighted by bin size).
            * ``nonfinite_router_logits``, ``nonfinite_causal_scores``,
              ``nonfinite_output``: NaN/inf counts over valid tokens (output: over
              their B*S*D values).

        Raises:
            RouterHealthError: a non-finite count is > 0; the message names the first
                such MoD layer (depth index), the quantity and the counts. The state
                is reset before raising, and the exception carries the report.
        """
        if self._n_updates == 0 or self._acc is None:
            return {"steps": None, "layers": {}}
        acc = self._acc.to("cpu", copy=True)  # the one host read of the interval (a copy: reset below)
        steps = None if self._first_step is None else [self._first_step, self._last_step]
        n_updates = self._n_updates
        self._reset()
        layers: Dict[str, Dict[str, Any]] = {}
        S = self.seq_len
        for row, lid in enumerate(self.layer_ids):
            a = acc[row]
            layers[str(lid)] = self._layer_fields(a, S)
        result = {"steps": steps, "layers": layers}
        failing = [(lid, [(name, layers[str(lid)][name], int(acc[row, tot]), what, why)
                          for name, _, tot, what, why in _NONFINITE if layers[str(lid)][name] > 0])
                   for row, lid in enumerate(self.layer_ids)]
        failing = [(lid, bad) for lid, bad in failing if bad]
        if failing:
            lid, bad = failing[0]
            name, n, total, what, why = bad[0]
            if steps is None:
                when = f"{n_updates} update{'s' if n_updates != 1 else ''} since the last report"
            else:
                when = f"step {steps[0]}" if steps[0] == steps[1] else f"steps {steps[0]}-{steps[1]}"
            also = "".join(f"; also {m} of {t} {w}" for _, m, t, w, _ in bad[1:])
            more = (f" (MoD layers {', '.join(str(l2) for l2, _ in failing[1:])} too)"
                    if len(failing) > 1 else "")
            raise RouterHealthError(
                f"mod_ext: MoD layer {lid}: {n} of {total} {what} are NaN/inf ({when}){also}{more}; {why}. "
                f"{_ADVICE}",
                report=result, layer_id=lid, quantity=name,
            )
        return result

    @staticmethod
    def _layer_fields(a: Tensor, S: int) -> Dict[str, Any]:
        v = a[:_N_SCALARS].tolist()  # a is on the CPU already

        def ratio(num: float, den: float) -> Optional[float]:
            return num / den if den > 0 else None

        n_valid, n_logit, n_score, routed = v[_N_VALID], v[_LOGIT_N], v[_SCORE_N], v[_ROUTED_SLOTS]
        mean = ratio(v[_LOGIT_SUM], n_logit)
        std = None if mean is None else math.sqrt(max(v[_LOGIT_SUMSQ] / n_logit - mean * mean, 0.0))
        lo, hi = v[_LOGIT_MIN], v[_LOGIT_MAX]
        hist = a[_N_SCALARS:_N_SCALARS + S]
        valid_hist = a[_N_SCALARS + S:_N_SCALARS + 2 * S]
        entropy = None
        if routed > 0:
            if S == 1:
                entropy = 1.0
            else:
                p = hist[hist > 0] / hist.sum()
                entropy = min(max(-float((p * p.log()).sum()) / math.log(S), 0.0), 1.0)
        bins = a[_N_SCALARS + 2 * S:].view(3, ECE_BINS)
        predicted = ratio(v[_PROB_SUM], n_score)
        topk_rate = ratio(v[_TOPK_N], n_valid)
        ece = ratio(float((bins[1] - bins[2]).abs().sum()), n_score)
        return {
            "tokens": int(n_valid),
            "routed_slots": int(routed),
            "router_logit_mean": mean,
            "router_logit_std": std,
            "router_logit_min": lo if math.isfinite(lo) else None,
            "router_logit_max": hi if math.isfinite(hi) else None,
            "positions_ever_routed": float((hist > 0).sum()) / S,
            "positions_ever_valid": float((valid_hist > 0).sum()) / S,
            "routed_position_entropy": entropy,
            "causal_predicted_rate": predicted,
            "topk_rate": topk_rate,
            "calibration_gap": None if predicted is None or topk_rate is None else predicted - topk_rate,
            "causal_positive_rate": ratio(v[_POSITIVE_N], n_score),
            "calibration_ece": ece,
            "nonfinite_router_logits": int(v[_NONFINITE_LOGITS]),
            "nonfinite_causal_scores": int(v[_NONFINITE_SCORES]),
            "nonfinite_output": int(v[_NONFINITE_OUTPUT]),
        }
