"""Fast sampling for :class:`mod_ext.models.MoDTransformer`: a MoD-aware static KV cache,
a batched, capacity-bounded decode step, and CUDA-graph capture of that step.

Semantics (docs/MOD_SPEC.md sections 2-4; Raposo et al. 2024, arXiv 2404.02258, Sections
3.1, 3.5 and 5):

* **Cache.** A dense layer caches the key and value of every token: (B, max_len) entries
  per layer, one per *column* (a column is a token's index in the left-padded batch).
  A MoD layer caches only the tokens it routed, in a fixed number of slots per sequence
  plus a per-sequence fill count: ``min(max_len, K)`` slots by default, with ``K =
  capacity_for(block_size, capacity_factor)`` the most tokens the model's causal rule
  ever routes, so the cache never fills before the rule does (its memory is then
  ``K / max_len`` of a dense layer's: 0.125 at max_len = block_size, c = 0.125);
  ``min(capacity_for(max_len, cache_capacity_factor), K)`` when a factor is given. One
  extra scratch slot per sequence takes the writes of padding slots, so every write is
  static-shaped.
* **Causal routing.** Prefill and decode route by the causal rule of
  :class:`mod_ext.MoDBlock` (predictor or router logit > 0, first come first served):
  a token is routed at a MoD layer when its score is > 0 and its sequence has fewer than
  ``limit = min(cache slots, K)`` routed tokens there; with the default slots this is
  exactly the full-recompute rule, so decoding with the cache gives the full
  recompute's logits unless the decode capacity overflows.
* **Decode capacity.** In a decode step the B new tokens compete, at each MoD layer, for
  ``decode_capacity`` block slots (rows of the block's input, distinct from cache slots) (expert-choice top-k over the batch by causal score,
  ``mod_ext.topk_route``). Unused slots are padding (router weight 0, no cache write);
  routed tokens beyond it are *dropped*: they skip the layer as if their score were <= 0.
* **Drops.** A token *wants* a MoD layer when its causal score is > 0 (and its sequence
  has not finished). A wanted token that does not run the block is counted in
  ``MoDKVCache.drops`` (n_mod_layers, B). Drops the full recompute makes too (the
  sequence already has K routed tokens: the causal rule's own capacity) are normal; the
  others (a cache smaller than K filled up, or the token lost the decode-capacity top-k)
  are also counted in ``MoDKVCache.overflow``: while it is 0 the logits equal a full
  recompute's.

With a static cache (the default on CUDA) everything in :func:`decode_step` is
static-shaped and free of host syncs, so one step (embedding -> logits) is captured in a
CUDA graph and replayed (``generate(..., cuda_graph=True)``). On the CPU the default is
the dynamic path of the same function: a MoD layer runs its block on the routed rows only
and skips it when none is routed (at B = 1 that is most steps), with the same results.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .layer import MoDBlock, capacity_for, mod_block
from .ops import gather_tokens, scatter_add_weighted_, topk_route

if TYPE_CHECKING:  # pragma: no cover
    from .models import MoDTransformer

__all__ = [
    "LayerCache",
    "MoDKVCache",
    "default_decode_capacity",
    "allocate_cache",
    "prefill",
    "decode_step",
    "sample_next",
    "generate_cached",
]


def default_decode_capacity(batch: int, capacity_factor: float) -> int:
    """Default block slots per MoD layer in a decode step of ``batch`` tokens.

    ``min(batch, ceil(c * B + 3 * sqrt(B * c * (1 - c))))``: the expected number of routed
    tokens ``c * B`` plus three standard deviations of a Binomial(B, c) as headroom, so a
    predictor that routes a fraction c of tokens independently overflows in well under
    1% of steps (B = 64, c = 0.125: 16 slots; B = 8: 4; B = 1: 1).

    Raises:
        ValueError: batch < 1 or capacity_factor not in (0, 1].
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"default_decode_capacity: batch must be an int >= 1, got {batch!r}")
    c = float(capacity_factor)
    if not (0 < c <= 1):
        raise ValueError(f"default_decode_capacity: capacity_factor must be in (0, 1], got {capacity_factor!r}")
    return min(batch, max(1, math.ceil(round(c * batch + 3 * math.sqrt(batch * c * (1 - c)), 9))))


class LayerCache:
    """Keys and values of one layer.

    Attributes:
        k, v: (B, L, nh, hs) in the model's dtype (rotary already applied to k). Dense
            layer: L = max_len, entry j holds column j. MoD layer: L = slots + 1, entries
            0..fill-1 hold the sequence's routed tokens in position order, entry L-1 is
            a scratch slot that is never attended to.
        fill: (B,) int64 routed tokens held (MoD layers), else None.
        rule_limit: K, the most the model's causal rule routes per sequence (MoD layers),
            else None.
        limit (derived): most routed tokens a sequence can hold here, min(slots, K).
    """

    def __init__(self, k: Tensor, v: Tensor, fill: Optional[Tensor] = None, rule_limit: Optional[int] = None):
        self.k, self.v, self.fill, self.rule_limit = k, v, fill, rule_limit

    @property
    def limit(self) -> Optional[int]:
        return None if self.rule_limit is None else min(self.scratch, self.rule_limit)

    @property
    def is_mod(self) -> bool:
        return self.fill is not None

    @property
    def scratch(self) -> int:
        """Index of the scratch slot (MoD layers)."""
        return self.k.shape[1] - 1

    def bytes_per_seq(self) -> int:
        """Bytes of keys + values (+ fill count) per sequence, scratch slot included."""
        b = self.k.shape[0]
        n = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        if self.fill is not None:
            n += self.fill.numel() * self.fill.element_size()
        return n // b


class MoDKVCache:
    """Static KV cache of a :class:`MoDTransformer` for B sequences of up to max_len columns.

    Create it with :meth:`MoDTransformer.allocate_cache`. All tensors keep their
    addresses for the cache's life (a CUDA graph of :func:`decode_step` reads them).

    Attributes:
        layers: one :class:`LayerCache` per layer, in depth order.
        key_valid: (B, max_len) bool, True where a column holds a real token (False for
            left padding and for columns not written yet).
        col: (1,) int64 the next column to write (= columns written so far).
        pos: (B,) int64 the next token's true position in each sequence.
        active: (B,) bool sequences still generating; finished ones never route.
        drops: (n_mod_layers, B) int64 routed-but-dropped tokens per MoD layer and sequence.
        overflow: (n_mod_layers, B) int64 the drops a full recompute would not make
            (cache slots or decode capacity ran out before the causal rule's capacity K).
        batch, max_len, decode_capacity, slots (MoD cache slots per sequence, without
        the scratch slot), n_written (host-side mirror of ``col``).
        static: True = the decode step is static-shaped and sync-free (every MoD layer
            runs its block on decode_capacity rows, padding included); False = eager
            dynamic path: the block runs on the routed rows only and is skipped when
            none is routed (same results; reads the routing decision on the host).
    """

    def __init__(
        self, model: "MoDTransformer", batch: int, max_len: int, cache_capacity_factor: Optional[float],
        decode_capacity: int, device: torch.device, dtype: torch.dtype, static: bool = True,
    ):
        cfg = model.cfg
        nh, hs = cfg.n_head, cfg.d_model // cfg.n_head
        self.batch, self.max_len, self.decode_capacity = batch, max_len, decode_capacity
        self.static = static
        self.cfg = cfg
        self.cache_capacity_factor = cache_capacity_factor
        rule = [m.causal_capacity(cfg.block_size) for m in model.layers if isinstance(m, MoDBlock)]
        if cache_capacity_factor is None:
            self.slots = min(max_len, max(rule)) if rule else capacity_for(max_len, cfg.capacity_factor)
        else:  # never more than K: slots beyond it could never be filled
            self.slots = capacity_for(max_len, cache_capacity_factor)
            if rule:
                self.slots = min(self.slots, max(rule))
        self.device, self.dtype = device, dtype
        self.layers: List[LayerCache] = []
        for layer in model.layers:
            if isinstance(layer, MoDBlock):
                shape = (batch, self.slots + 1, nh, hs)
                fill = torch.zeros(batch, dtype=torch.int64, device=device)
                self.layers.append(LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                              torch.zeros(shape, dtype=dtype, device=device), fill,
                                              layer.causal_capacity(cfg.block_size)))
            else:
                shape = (batch, max_len, nh, hs)
                self.layers.append(LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                              torch.zeros(shape, dtype=dtype, device=device)))
        self.mod_layer_ids = [i for i, lc in enumerate(self.layers) if lc.is_mod]  # depth of each MoD layer
        n_mod = len(self.mod_layer_ids)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.col = torch.zeros(1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.drops = torch.zeros(n_mod, batch, dtype=torch.int64, device=device)
        self.overflow = torch.zeros(n_mod, batch, dtype=torch.int64, device=device)
        self.n_written = 0
        # Constant helpers (kept here so a captured step allocates nothing new per call).
        self.batch_arange = torch.arange(batch, device=device)
        self.mod_slot_arange = torch.arange(self.slots + 1, device=device)

    @property
    def mod_layers(self) -> List[LayerCache]:
        return [lc for lc in self.layers if lc.is_mod]

    def reset(self) -> None:
        """Forget every sequence (in place; keys/values are left, they are masked out)."""
        self.key_valid.zero_()
        self.col.zero_()
        self.pos.zero_()
        self.active.fill_(True)
        self.drops.zero_()
        self.overflow.zero_()
        for lc in self.layers:
            if lc.fill is not None:
                lc.fill.zero_()
        self.n_written = 0

    def fill_counts(self) -> Tensor:
        """(n_mod_layers, B) int64 routed tokens held by each MoD layer's cache."""
        return torch.stack([lc.fill for lc in self.mod_layers]) if self.mod_layers else self.drops.new_zeros(0, self.batch)

    def drops_per_layer(self) -> Dict[int, int]:
        """{layer depth: routed-but-dropped tokens summed over the batch} (one host sync)."""
        return dict(zip(self.mod_layer_ids, self.drops.sum(1).tolist()))

    def bytes_per_seq(self) -> int:
        """KV-cache bytes per sequence over all layers (keys, values, fill counts)."""
        return sum(lc.bytes_per_seq() for lc in self.layers)

    def layer_bytes_per_seq(self) -> List[int]:
        """KV-cache bytes per sequence of each layer, in depth order."""
        return [lc.bytes_per_seq() for lc in self.layers]


def allocate_cache(
    model: "MoDTransformer", batch: int, max_len: Optional[int] = None, *,
    cache_capacity_factor: Optional[float] = None, decode_capacity: Optional[int] = None,
    static: Optional[bool] = None,
) -> MoDKVCache:
    """See :meth:`MoDTransformer.allocate_cache`."""
    cfg = model.cfg
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"allocate_cache: batch must be an int >= 1, got {batch!r}")
    max_len = cfg.block_size if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= cfg.block_size:
        raise ValueError(
            f"allocate_cache: max_len must be an int in [1, block_size = {cfg.block_size}] (the rotary "
            f"table's length), got {max_len!r}"
        )
    if cache_capacity_factor is not None:
        capacity_for(1, cache_capacity_factor)  # validates (ValueError naming capacity_factor)
        if cache_capacity_factor > 1:
            raise ValueError(f"allocate_cache: cache_capacity_factor must be in (0, 1], got {cache_capacity_factor!r}")
    if static is not None and not isinstance(static, bool):
        raise ValueError(f"allocate_cache: static must be True, False or None (device default), got {static!r}")
    if decode_capacity is None:
        decode_capacity = default_decode_capacity(batch, min(1.0, cfg.capacity_factor))
    if isinstance(decode_capacity, bool) or not isinstance(decode_capacity, int) or not 1 <= decode_capacity <= batch:
        raise ValueError(
            f"allocate_cache: decode_capacity must be an int in [1, batch = {batch}], got {decode_capacity!r}"
        )
    p = model.wte.weight  # the cache lives on the model's device, in its dtype
    if static is None:
        static = p.device.type != "cpu"
    ccf = None if cache_capacity_factor is None else float(cache_capacity_factor)
    return MoDKVCache(model, batch, max_len, ccf, decode_capacity, p.device, p.dtype, bool(static))


def check_cache_matches(model: "MoDTransformer", cache: MoDKVCache, where: str) -> None:
    """ValueError when the model was moved or cast after the cache was allocated."""
    p = model.wte.weight
    if p.device != cache.device or p.dtype != cache.dtype or model.cfg != cache.cfg:
        raise ValueError(
            f"{where}: the cache was allocated for a model on {cache.device} in {cache.dtype} with "
            f"config {cache.cfg}; this model is on {p.device} in {p.dtype} with config {model.cfg}: "
            "allocate a new cache with model.allocate_cache(...)"
        )


def check_token_ids(tokens: Tensor, vocab_size: int, where: str, name: str) -> None:
    """ValueError for ids outside [0, vocab_size) (a host sync: prompt time, or CPU only)."""
    if tokens.numel() and bool((tokens.min() < 0) | (tokens.max() >= vocab_size)):
        raise ValueError(f"{where}: {name} holds token ids outside [0, vocab_size = {vocab_size}): "
                         f"min {int(tokens.min())}, max {int(tokens.max())}")


def as_int(value, name: str, low: int, high: Optional[int] = None, where: str = "generate") -> int:
    """value as a Python int (numpy and torch integers accepted) in [low, high), else a
    ValueError that names the argument."""
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    if isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}")
    try:
        i = operator.index(value)
    except TypeError:
        raise ValueError(f"{where}: {name} must be {expected}, got {value!r}") from None
    if i < low or (high is not None and i >= high):
        raise ValueError(f"{where}: {name} must be {expected}, got {i}")
    return i


def normalize_stop_tokens(stop_tokens, pad_token, vocab_size: int) -> Tuple[Optional[List[int]], Optional[int]]:
    """(stop token list or None, pad token) with every id checked against the vocabulary
    [0, vocab_size); a single int is one stop token; pad_token defaults to the first stop
    token."""
    def as_id(v, name):
        return as_int(v, name, 0, vocab_size)

    stops = None
    if stop_tokens is not None:
        if isinstance(stop_tokens, torch.Tensor):
            stop_tokens = stop_tokens.flatten().tolist()
        elif not isinstance(stop_tokens, (list, tuple, set, frozenset, range)):
            stop_tokens = [stop_tokens]
        stops = [as_id(v, "stop_tokens entry") for v in stop_tokens] or None  # [] = no stop tokens
    if pad_token is not None:
        pad_token = as_id(pad_token, "pad_token")
    elif stops:
        pad_token = stops[0]
    return stops, pad_token


def _check_valid_prompt(idx: Tensor, valid: Optional[Tensor], where: str) -> Tensor:
    if idx.dim() != 2 or idx.dtype != torch.int64 or idx.shape[1] < 1:
        raise ValueError(f"{where}: idx must be a (B, T) int64 prompt with T >= 1, got {idx.dtype} {tuple(idx.shape)}")
    if valid is None:
        return torch.ones_like(idx, dtype=torch.bool)
    if valid.dtype != torch.bool or valid.shape != idx.shape:
        raise ValueError(
            f"{where}: valid must be a bool tensor of shape (B, T) = {tuple(idx.shape)}, got "
            f"{valid.dtype} {tuple(valid.shape)}"
        )
    # Left padding: in each row the valid tokens are a non-empty suffix. (One host sync,
    # at prefill time only.)
    v = valid.long()
    if not bool((v.diff(dim=1) >= 0).all() & valid[:, -1].all()):
        raise ValueError(f"{where}: valid must mark left-padded prompts: per row False...False True...True, "
                         "at least one True")
    return valid


@torch.no_grad()
def prefill(model: "MoDTransformer", idx: Tensor, cache: MoDKVCache, valid: Optional[Tensor] = None) -> Tensor:
    """See :meth:`MoDTransformer.prefill`."""
    valid = _check_valid_prompt(idx, valid, "prefill")
    check_cache_matches(model, cache, "prefill")
    check_token_ids(idx, model.cfg.vocab_size, "prefill", "idx")
    B, T = idx.shape
    if B != cache.batch:
        raise ValueError(f"prefill: idx has batch {B}, the cache was allocated for batch {cache.batch}")
    if T > cache.max_len:
        raise ValueError(f"prefill: prompt length {T} exceeds the cache's max_len = {cache.max_len}")
    if idx.device != cache.device:
        raise ValueError(f"prefill: idx is on {idx.device}, the cache on {cache.device}")
    cache.reset()
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)  # (B, T) true positions
    all_valid = bool(valid.all())
    slot_mask_dense = None if all_valid else valid
    x = model.wte(idx)  # (B, T, D)
    m = 0
    for layer, lc in zip(model.layers, cache.layers):
        if isinstance(layer, MoDBlock):
            x = _prefill_mod_layer(layer, lc, x, valid, positions, cache, m)
            m += 1
        else:
            def write(k, v, lc=lc):
                lc.k[:, :T] = k
                lc.v[:, :T] = v
            x = x + layer(x, positions, slot_mask_dense, write)
    cache.key_valid[:, :T] = valid
    cache.col.fill_(T)
    cache.pos.copy_(valid.long().sum(1))
    cache.n_written = T
    return model.lm_head(model.norm_f(x[:, -1]))  # (B, V)


def _prefill_mod_layer(layer: MoDBlock, lc: LayerCache, x: Tensor, valid: Tensor, positions: Tensor,
                       cache: MoDKVCache, m: int) -> Tensor:
    """Causal routing over the prompt; the routed tokens' keys/values go to slots 0..fill-1."""
    B, T, _ = x.shape
    C = min(T, lc.limit)
    scores = layer.causal_scores(x)  # (B, T) float32
    rows = cache.batch_arange[:, None].expand(B, C)

    def block_fn(x_sel: Tensor, indices: Tensor, slot_mask: Tensor) -> Tensor:
        # Routed slots get cache slots 0, 1, ... in position order; padding slots write
        # the scratch slot.
        slot = torch.where(slot_mask, slot_mask.long().cumsum(1) - 1, torch.full_like(indices, lc.scratch))

        def write(k, v):
            lc.k[rows, slot] = k
            lc.v[rows, slot] = v

        return layer.block(x_sel, positions.gather(1, indices), slot_mask, write)

    out = mod_block(
        x, layer.router_weight, block_fn, capacity=C, router_bias=layer.router_bias, valid=valid,
        router_activation=layer.router_activation, routing="threshold",
        scores=scores if layer.predictor is not None else None,
    )
    routed = out.slot_mask.long().sum(1)
    lc.fill.copy_(routed)
    wanted = ((scores > 0) & valid).long().sum(1)
    cache.drops[m] += wanted - routed
    cache.overflow[m] += wanted.clamp_max(lc.rule_limit) - routed  # what the causal rule alone routes
    return out.output


def _decode_mod_layer(layer: MoDBlock, lc: LayerCache, x: Tensor, cache: MoDKVCache, m: int) -> Tensor:
    """One MoD layer for B new tokens (B, 1, D): top-k over the batch, block on the winners."""
    B, _, D = x.shape
    Dc = cache.decode_capacity
    scores = layer.causal_scores(x)[:, 0]  # (B,) float32
    want = (scores > 0) & cache.active
    candidate = want & (lc.fill < lc.limit)
    idx, slot_mask = topk_route(scores.view(1, B), Dc, candidate.view(1, B))  # (1, Dc) each
    selected = torch.zeros_like(want).scatter(0, idx[0], slot_mask[0])  # (B,)
    dropped = want & ~selected
    cache.drops[m] += dropped.long()
    cache.overflow[m] += (dropped & (lc.fill < lc.rule_limit)).long()
    idx1, mask1 = idx[0], slot_mask[0]  # (Dc,)
    if not cache.static and not torch.compiler.is_compiling():
        # Dynamic path (eager, CPU by default): run the block on the routed rows only and
        # skip it when none is routed. Reading the mask is a host sync on a GPU, which is
        # why static caches (the default there, and what CUDA graphs need) never do this.
        idx1 = idx1[mask1]
        if idx1.numel() == 0:
            return x
        mask1 = torch.ones_like(idx1, dtype=torch.bool)
    n = idx1.shape[0]

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = torch.matmul(x[:, 0].to(acc), layer.router_weight.to(acc)) + layer.router_bias.to(acc)  # (B,)
    z_sel = z.gather(0, idx1)
    r = torch.sigmoid(z_sel) if layer.router_activation == "sigmoid" else z_sel
    r = torch.where(mask1, r, 0.0)  # (n,) padding slots: router weight 0

    x_sel = gather_tokens(x.view(1, B, D), idx1.view(1, n)).view(n, 1, D)
    pos_sel = cache.pos.gather(0, idx1)[:, None]  # (n, 1) true positions
    fill_sel = lc.fill.gather(0, idx1)  # (n,) before this token
    slot = torch.where(mask1, fill_sel, lc.scratch)

    def write(k, v):  # (n, 1, nh, hs)
        lc.k[idx1, slot] = k[:, 0]
        lc.v[idx1, slot] = v[:, 0]
        lc.fill.scatter_add_(0, idx1, mask1.long())

    def read():
        keys, values = lc.k.index_select(0, idx1), lc.v.index_select(0, idx1)  # (n, L, nh, hs)
        count = fill_sel + mask1.long()
        ar = cache.mod_slot_arange[None, :]
        # A routed token sees its sequence's routed tokens (itself included); a padding
        # slot sees only the scratch slot it wrote (keeps the softmax finite).
        key_mask = (ar < count[:, None]) | ((ar == lc.scratch) & ~mask1[:, None])
        return keys, values, key_mask

    f = layer.block.forward_cached(x_sel, pos_sel, write, read)  # (n, 1, D)
    f = torch.where(mask1[:, None, None], f.to(x.dtype), -0.0)
    return scatter_add_weighted_(x.view(1, B, D), f.view(1, n, D), idx1.view(1, n), r.view(1, n).to(acc)).view(B, 1, D)


@torch.no_grad()
def decode_step(model: "MoDTransformer", tokens: Tensor, cache: MoDKVCache) -> Tensor:
    """See :meth:`MoDTransformer.decode_step` (which also checks the inputs and advances
    ``cache.n_written``). Static-shaped and free of host syncs with a static cache."""
    B = cache.batch
    x = model.wte(tokens).view(B, 1, -1)  # (B, 1, D)
    cache.key_valid.index_fill_(1, cache.col, True)
    pos = cache.pos[:, None]  # (B, 1)
    m = 0
    for layer, lc in zip(model.layers, cache.layers):
        if isinstance(layer, MoDBlock):
            x = _decode_mod_layer(layer, lc, x, cache, m)
            m += 1
        else:
            def write(k, v, lc=lc):  # (B, 1, nh, hs) -> column col
                lc.k.index_copy_(1, cache.col, k)
                lc.v.index_copy_(1, cache.col, v)

            def read(lc=lc):
                return lc.k, lc.v, cache.key_valid

            x = x + layer.forward_cached(x, pos, write, read)
    cache.col.add_(1)
    cache.pos.add_(1)
    return model.lm_head(model.norm_f(x[:, 0]))  # (B, V)


def check_decode_inputs(tokens: Tensor, cache: MoDKVCache) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.shape != (cache.batch,) or tokens.dtype != torch.int64:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"decode_step: tokens must be an int64 tensor of shape (B,) = ({cache.batch},), got {got}")
    if tokens.device != cache.device:
        raise ValueError(f"decode_step: tokens are on {tokens.device}, the cache on {cache.device}")
    if cache.n_written == 0:
        raise ValueError("decode_step: the cache is empty; call prefill(idx, cache) first")
    if cache.n_written >= cache.max_len:
        raise ValueError(f"decode_step: the cache is full (max_len = {cache.max_len} columns written)")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next tokens (B,) int64 from logits (B, V): greedy when temperature == 0, else
    softmax(logits / temperature) restricted to the top_k most likely tokens. No host sync."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shift by the row maximum first: with a tiny temperature the scaled logits are then
    # 0 (the best token) or -inf, never inf - inf = NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def apply_stop_tokens(nxt: Tensor, finished: Tensor, stops: Optional[Tensor], pad_token: Optional[int]) -> Tensor:
    """Tokens (B,) with finished sequences' replaced by pad_token; marks the sequences
    that just emitted a stop token as finished (in place). No-op without stop tokens."""
    if stops is None:
        return nxt
    nxt = torch.where(finished, pad_token, nxt)
    finished |= torch.isin(nxt, stops)
    return nxt


class DecodeGraph:
    """A CUDA graph of :func:`decode_step` on one cache (static token buffer and logits).

    Captured on an empty cache (warm-up steps run on a side stream first, then the
    cache is reset), so the caller prefills after construction and replays per token.
    """

    def __init__(self, model: "MoDTransformer", cache: MoDKVCache):
        if not cache.static:
            raise ValueError("DecodeGraph: the cache must be static (allocate_cache(..., static=True))")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, dtype=torch.int64, device=cache.device)
        cache.reset()
        stream = torch.cuda.Stream(device=cache.device)
        stream.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up: lazy inits (cuBLAS handles, kernel attributes)
                decode_step(model, self.tokens, cache)
        torch.cuda.current_stream(cache.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = decode_step(model, self.tokens, cache)
        cache.reset()

    def step(self, tokens: Tensor) -> Tensor:
        """Replay one step with tokens (B,); returns the static logits buffer (B, V)."""
        check_decode_inputs(tokens, self.cache)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.n_written += 1
        return self.logits


@torch.no_grad()
def generate_cached(
    model: "MoDTransformer", idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: Optional[int] = None, generator: Optional[torch.Generator] = None, valid: Optional[Tensor] = None,
    stop_tokens: Optional[Sequence[int]] = None, pad_token: Optional[int] = None, cuda_graph: bool = False,
    max_len: Optional[int] = None, decode_capacity: Optional[int] = None,
    cache_capacity_factor: Optional[float] = None, static: Optional[bool] = None, check_every: int = 16,
) -> Tensor:
    """See :meth:`MoDTransformer.generate` (use_cache=True)."""
    B, T = idx.shape
    max_len = model.cfg.block_size if max_len is None else max_len
    if T + max_new_tokens - 1 > max_len:
        raise ValueError(
            f"generate: prompt length {T} + max_new_tokens {max_new_tokens} - 1 exceeds the cache's "
            f"max_len = {max_len} (<= block_size = {model.cfg.block_size}); use a shorter prompt or "
            "use_cache=False (full recompute over a sliding window)"
        )
    if cuda_graph:
        if idx.device.type != "cuda":
            raise ValueError("generate: cuda_graph=True needs the model and idx on a CUDA device")
        if decode_capacity is None:  # key on the resolved value: None and the default are one graph
            decode_capacity = default_decode_capacity(B, min(1.0, model.cfg.capacity_factor))
        ccf = None if cache_capacity_factor is None else float(cache_capacity_factor)
        key = (B, max_len, decode_capacity, ccf, str(idx.device), model.wte.weight.dtype)
        graphs: Dict[Tuple, DecodeGraph] = model._decode_graphs
        if key not in graphs:
            cache = allocate_cache(model, B, max_len, cache_capacity_factor=cache_capacity_factor,
                                   decode_capacity=decode_capacity, static=True)
            graphs[key] = DecodeGraph(model, cache)
        graph = graphs[key]
        cache = graph.cache
        step = graph.step
    else:
        cache = allocate_cache(model, B, max_len, cache_capacity_factor=cache_capacity_factor,
                               decode_capacity=decode_capacity, static=static)

        def step(tokens):
            return model.decode_step(tokens, cache)

    # stop_tokens / pad_token arrive checked (normalize_stop_tokens).
    stops = None if stop_tokens is None else torch.tensor(stop_tokens, dtype=torch.int64, device=idx.device)
    logits = prefill(model, idx, cache, valid)
    out = torch.full((B, max_new_tokens), pad_token if pad_token is not None else 0, dtype=torch.int64,
                     device=idx.device)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for t in range(max_new_tokens):
        nxt = apply_stop_tokens(sample_next(logits, temperature, top_k, generator), finished, stops, pad_token)
        out[:, t] = nxt
        if t == max_new_tokens - 1:
            break
        if stops is not None:
            if (t + 1) % check_every == 0 and bool(finished.all()):  # one host sync per check_every tokens
                break
            cache.active.copy_(~finished)
        logits = step(nxt)
    model.last_decode_cache = cache
    return torch.cat([idx, out], dim=1)
