"""Sampling from :class:`mod_ext.models.MoDTransformer`: the model's KV cache, prefill,
a batched, capacity-bounded decode step, sampling, stop tokens and CUDA-graph capture.

This module sits on top of the model (ops -> layer + kv_cache -> models -> generation)
and owns its own state: the CUDA graphs of ``generate(cuda_graph=True)`` are kept here,
keyed weakly by model (:func:`clear_decode_graphs`), and ``generate`` returns the cache
when asked (``return_cache=True``) instead of leaving it on the model.

Semantics (docs/MOD_SPEC.md sections 2-4; Raposo et al. 2024, arXiv 2404.02258, Sections
3.1, 3.5 and 5):

* **Cache.** A dense layer caches the key and value of every *column* (a token's index in
  the left-padded batch): a :class:`~mod_ext.kv_cache.DenseLayerCache` of (B, max_len)
  entries. A MoD layer caches only the tokens it routed: a
  :class:`~mod_ext.kv_cache.MoDLayerCache` of ``slots`` cache slots per sequence plus a
  scratch slot, ``min(max_len, K)`` by default, with ``K = capacity_for(block_size,
  capacity_factor)`` the causal capacity (the most tokens the causal rule ever routes),
  so the cache never fills before the rule does; ``min(capacity_for(max_len,
  cache_capacity_factor), K)`` when a factor is given.
* **Prefill** (:meth:`mod_ext.MoDBlock.prefill`) routes the prompt causally (the rule of
  ``forward(routing="causal")``) and caches the routed tokens.
* **Decode step** (:meth:`mod_ext.MoDBlock.decode`): at each MoD layer the B new tokens
  that want it (causal score > 0, sequence active, cache not full) compete by top-k over
  the batch for ``decode_capacity`` block slots; the winners run the block against their
  own sequence's cached routed tokens; the rest are dropped.
* **Drops.** ``MoDKVCache.drops`` (n_mod_layers, B) counts wanted-but-dropped tokens;
  ``MoDKVCache.overflow`` only those a full recompute would not drop (decode capacity, or
  a cache smaller than K, ran out): while it is 0 the logits equal a full recompute's.

With a static cache (the default on CUDA) :func:`decode_step` is static-shaped and free
of host syncs, so one step (embedding -> logits) is captured in a CUDA graph and replayed
(``generate(..., cuda_graph=True)``). On the CPU the default is the dynamic path: a MoD
layer runs its block on the routed rows only and skips it when none is routed.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_cache import DenseLayerCache, MoDLayerCache
from ._args import as_int, as_real
from .layer import MoDBlock, capacity_for, default_decode_capacity
from .models import check_token_ids

if TYPE_CHECKING:  # pragma: no cover
    from .models import MoDTransformer

__all__ = [
    "MoDKVCache",
    "GenerationOutput",
    "DecodeGraph",
    "default_decode_capacity",
    "allocate_cache",
    "prefill",
    "decode_step",
    "sample_next",
    "apply_stop_tokens",
    "generate",
    "clear_decode_graphs",
]

LayerCache = Union[MoDLayerCache, DenseLayerCache]


class MoDKVCache:
    """Static KV cache of a :class:`MoDTransformer` for B sequences of up to max_len columns.

    Create it with :func:`allocate_cache` (or ``model.allocate_cache``). All tensors keep
    their addresses for the cache's life (a CUDA graph of the decode step reads them).

    Attributes:
        layers: one :class:`~mod_ext.kv_cache.MoDLayerCache` (MoD layers) or
            :class:`~mod_ext.kv_cache.DenseLayerCache` per layer, in depth order.
        key_valid: (B, max_len) bool, True where a column holds a real token (False for
            left padding and for columns not written yet); the dense layers' key mask.
        col: (1,) int64 the next column to write (= columns written so far).
        pos: (B,) int64 the next token's true position in each sequence.
        active: (B,) bool sequences still generating; finished ones never route.
        batch, max_len, decode_capacity (block slots per MoD layer and step), slots (MoD
        cache slots per sequence, without the scratch slot), n_written (host-side
        mirror of ``col``), static (the decode path: True = static-shaped and sync-free,
        False = eager dynamic path), cfg, device, dtype (of the model it was allocated for).
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
        rule = [m.causal_capacity(cfg.block_size) for m in model.mod_layers]  # K of each MoD layer
        if cache_capacity_factor is None:
            self.slots = min(max_len, max(rule)) if rule else capacity_for(max_len, cfg.capacity_factor)
        else:  # never more than K: slots beyond it could never be filled
            self.slots = capacity_for(max_len, cache_capacity_factor)
            if rule:
                self.slots = min(self.slots, max(rule))
        self.device, self.dtype = device, dtype
        kw = dict(dtype=dtype, device=device)
        self.layers: List[LayerCache] = [
            MoDLayerCache(batch, self.slots, layer.causal_capacity(cfg.block_size), nh, hs, **kw)
            if isinstance(layer, MoDBlock) else DenseLayerCache(batch, max_len, nh, hs, **kw)
            for layer in model.layers
        ]
        self.mod_layer_ids = [i for i, lc in enumerate(self.layers) if isinstance(lc, MoDLayerCache)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.col = torch.zeros(1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.n_written = 0

    @property
    def mod_layers(self) -> List[MoDLayerCache]:
        """The MoD layers' caches, in depth order."""
        return [lc for lc in self.layers if isinstance(lc, MoDLayerCache)]

    def _stack(self, name: str) -> Tensor:
        mods = self.mod_layers
        if not mods:
            return torch.zeros(0, self.batch, dtype=torch.int64, device=self.device)
        return torch.stack([getattr(lc, name) for lc in mods])

    @property
    def drops(self) -> Tensor:
        """(n_mod_layers, B) int64 wanted-but-dropped tokens per MoD layer and sequence (a copy)."""
        return self._stack("drops")

    @property
    def overflow(self) -> Tensor:
        """(n_mod_layers, B) int64 the drops a full recompute would not make (a copy)."""
        return self._stack("overflow")

    def fill_counts(self) -> Tensor:
        """(n_mod_layers, B) int64 routed tokens held by each MoD layer's cache (a copy)."""
        return self._stack("fill")

    def reset(self) -> None:
        """Forget every sequence (in place; keys/values are left, they are masked out)."""
        self.key_valid.zero_()
        self.col.zero_()
        self.pos.zero_()
        self.active.fill_(True)
        for lc in self.layers:
            lc.reset()
        self.n_written = 0

    def drops_per_layer(self) -> Dict[int, int]:
        """{layer depth: routed-but-dropped tokens summed over the batch} (one host sync)."""
        return dict(zip(self.mod_layer_ids, self.drops.sum(1).tolist()))

    def bytes_per_seq(self) -> int:
        """KV-cache bytes per sequence over all layers (keys, values, fill counts)."""
        return sum(lc.bytes_per_seq() for lc in self.layers)

    def layer_bytes_per_seq(self) -> List[int]:
        """KV-cache bytes per sequence of each layer, in depth order."""
        return [lc.bytes_per_seq() for lc in self.layers]


class GenerationOutput(NamedTuple):
    """What :func:`generate` returns with ``return_cache=True``."""

    tokens: Tensor  #: (B, T + max_new_tokens) int64: the prompts and the sampled tokens
    #: the KV cache the tokens were decoded with (drops, overflow, fill counts); None
    #: with use_cache=False or max_new_tokens=0. With cuda_graph=True it is the graph's
    #: cache, reused (reset) by the next generate call with the same graph.
    cache: Optional[MoDKVCache]


def normalize_stop_tokens(stop_tokens, pad_token, vocab_size: int) -> Tuple[Optional[List[int]], Optional[int]]:
    """(stop token list or None, pad token) with every id checked against the vocabulary
    [0, vocab_size); a single int is one stop token; pad_token defaults to the first stop
    token."""
    def as_id(v, name):
        return as_int(v, name, 0, vocab_size, where="generate")

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


def allocate_cache(
    model: "MoDTransformer", batch: int, max_len: Optional[int] = None, *,
    cache_capacity_factor: Optional[float] = None, decode_capacity: Optional[int] = None,
    static: Optional[bool] = None,
) -> MoDKVCache:
    """A fixed-size KV cache for ``batch`` sequences of up to ``max_len`` columns
    (a column is one token position of the left-padded batch).

    Dense layers hold (batch, max_len, n_head, head_size) keys and values; each MoD
    layer holds only its routed tokens in a fixed number of cache slots per sequence
    (see cache_capacity_factor; +1 scratch slot) and a fill count. The cache lives on
    the model's device in the model's dtype (move/cast the model first).

    Args:
        model: the :class:`~mod_ext.models.MoDTransformer` to decode.
        batch: B, sequences decoded together.
        max_len: columns (prompt + generated tokens, left padding included); default and
            maximum ``block_size``.
        cache_capacity_factor: MoD cache slots as a fraction of max_len, in (0, 1]:
            ``capacity_for(max_len, cache_capacity_factor)`` slots, at most the causal
            capacity K = ``capacity_for(block_size, capacity_factor)`` (more could never be
            filled). Default: ``min(max_len, K)`` slots, so the cache never fills before
            the causal rule does and decoding matches a full recompute (at max_len =
            block_size that is about capacity_factor of a dense layer's memory; a shorter
            max_len saves less in proportion). A smaller factor saves memory but drops
            tokens the recompute would route (counted in ``cache.overflow``).
        decode_capacity: block slots per MoD layer in one decode step (an int in [1, B]);
            default :func:`mod_ext.default_decode_capacity` (ceil(c*B) plus three binomial
            standard deviations of headroom).
        static: which decode path the cache's steps take (the storage is fixed-size
            either way). True = static path: static-shaped, sync-free steps (each MoD
            layer runs its block on decode_capacity rows, padding included; needed for
            CUDA graphs and torch.compile). False = dynamic path, eager only: the block
            runs on the routed rows only and is skipped when none is routed (same
            results; one host read of the routing decision per MoD layer). Default: True
            on CUDA, False on the CPU.

    Raises:
        ValueError: an argument out of range (the message names it).
    """
    cfg = model.cfg
    batch = as_int(batch, "batch", 1, where="allocate_cache")
    max_len = cfg.block_size if max_len is None else max_len
    max_len = as_int(max_len, "max_len (at most block_size, the rotary table's length)", 1, cfg.block_size + 1,
                     where="allocate_cache")
    if cache_capacity_factor is not None:
        capacity_for(1, cache_capacity_factor)  # validates (ValueError naming capacity_factor)
        if cache_capacity_factor > 1:
            raise ValueError(f"allocate_cache: cache_capacity_factor must be in (0, 1], got {cache_capacity_factor!r}")
    if static is not None and not isinstance(static, bool):
        raise ValueError(f"allocate_cache: static must be True, False or None (device default), got {static!r}")
    if decode_capacity is None:
        decode_capacity = default_decode_capacity(batch, min(1.0, cfg.capacity_factor))
    decode_capacity = as_int(decode_capacity, f"decode_capacity (at most batch = {batch})", 1, batch + 1,
                             where="allocate_cache")
    p = model.wte.weight  # the cache lives on the model's device, in its dtype
    if static is None:
        static = p.device.type != "cpu"
    ccf = None if cache_capacity_factor is None else float(cache_capacity_factor)
    return MoDKVCache(model, batch, max_len, ccf, decode_capacity, p.device, p.dtype, bool(static))


def check_cache_matches(model: "MoDTransformer", cache: MoDKVCache, where: str) -> None:
    """ValueError when the model was moved or cast after the cache was allocated."""
    if not isinstance(cache, MoDKVCache):
        raise ValueError(f"{where}: cache must be a MoDKVCache (allocate_cache(...)), got {type(cache).__name__}")
    p = model.wte.weight
    if p.device != cache.device or p.dtype != cache.dtype or model.cfg != cache.cfg:
        raise ValueError(
            f"{where}: the cache was allocated for a model on {cache.device} in {cache.dtype} with "
            f"config {cache.cfg}; this model is on {p.device} in {p.dtype} with config {model.cfg}: "
            "allocate a new cache with model.allocate_cache(...)"
        )


def _check_valid_prompt(idx: Tensor, valid: Optional[Tensor], where: str) -> Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64 or idx.shape[1] < 1:
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"{where}: idx must be a (B, T) int64 prompt with T >= 1, got {got}")
    if valid is None:
        return torch.ones_like(idx, dtype=torch.bool)
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != idx.shape:
        got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"{where}: valid must be a bool tensor of shape (B, T) = {tuple(idx.shape)}, got {got}")
    # Left padding: in each row the valid tokens are a non-empty suffix. (One host sync,
    # at prefill time only.)
    v = valid.long()
    if not bool((v.diff(dim=1) >= 0).all() & valid[:, -1].all()):
        raise ValueError(f"{where}: valid must mark left-padded prompts: per row False...False True...True, "
                         "at least one True")
    return valid


@torch.no_grad()
def prefill(model: "MoDTransformer", idx: Tensor, cache: MoDKVCache, valid: Optional[Tensor] = None) -> Tensor:
    """Run the prompt idx (B, T) int64 through the model with causal routing and fill
    the cache (resetting it first); returns the last column's logits (B, V).

    MoD layers route causally (:meth:`mod_ext.MoDBlock.prefill`, the rule of
    ``forward(routing="causal")``) and cache only the routed tokens. ``valid`` (B, T)
    bool marks left-padded prompts (False...False True...True per row); true positions
    count valid tokens only.

    Raises:
        ValueError: shapes, batch or device that do not match the cache, T > max_len,
            token ids outside the vocabulary, or a valid mask that is not left padding.
    """
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
    slot_mask_dense = None if bool(valid.all()) else valid
    x = model.wte(idx)  # (B, T, D), this function's own buffer: MoD layers update it in place
    for layer, lc in zip(model.layers, cache.layers):
        if isinstance(layer, MoDBlock):
            x = layer.prefill(x, lc, valid, positions, inplace=True, static=cache.static).output
        else:
            x = x + layer(x, positions, slot_mask_dense, lc.prefill_write())
    cache.key_valid[:, :T] = valid
    cache.col.fill_(T)
    cache.pos.copy_(valid.long().sum(1))
    cache.n_written = T
    return model.lm_head(model.norm_f(x[:, -1]))  # (B, V)


@torch.no_grad()
def _step(model: "MoDTransformer", tokens: Tensor, cache: MoDKVCache) -> Tensor:
    """One decode step without the argument checks and the host-side column count
    (what a CUDA graph captures). Static-shaped and free of host syncs with a static cache."""
    B = cache.batch
    x = model.wte(tokens).view(B, 1, -1)  # (B, 1, D), this step's own buffer
    cache.key_valid.index_fill_(1, cache.col, True)
    pos = cache.pos[:, None]  # (B, 1)
    for layer, lc in zip(model.layers, cache.layers):
        if isinstance(layer, MoDBlock):
            x = layer.decode(x, lc, pos, cache.active, decode_capacity=cache.decode_capacity,
                             static=cache.static, inplace=True)
        else:
            write, read = lc.decode_kv(cache.col, cache.key_valid)
            x = x + layer.forward_cached(x, pos, write, read)
    cache.col.add_(1)
    cache.pos.add_(1)
    return model.lm_head(model.norm_f(x[:, 0]))  # (B, V)


def check_decode_inputs(tokens: Tensor, cache: MoDKVCache) -> None:
    """ValueError for tokens that are not (B,) int64 on the cache's device, or a cache
    that is empty (not prefilled) or full."""
    if not isinstance(tokens, torch.Tensor) or tokens.shape != (cache.batch,) or tokens.dtype != torch.int64:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"decode_step: tokens must be an int64 tensor of shape (B,) = ({cache.batch},), got {got}")
    if tokens.device != cache.device:
        raise ValueError(f"decode_step: tokens are on {tokens.device}, the cache on {cache.device}")
    if cache.n_written == 0:
        raise ValueError("decode_step: the cache is empty; call prefill(idx, cache) first")
    if cache.n_written >= cache.max_len:
        raise ValueError(f"decode_step: the cache is full (max_len = {cache.max_len} columns written)")


@torch.no_grad()
def decode_step(model: "MoDTransformer", tokens: Tensor, cache: MoDKVCache) -> Tensor:
    """Advance every sequence by one token: tokens (B,) int64 -> logits (B, V).

    Dense layers append the token's key/value at the next column and attend to the
    row's valid columns. At each MoD layer (:meth:`mod_ext.MoDBlock.decode`) the B
    tokens are routed causally (score > 0, cache not full, sequence active); the
    ``cache.decode_capacity`` highest-scoring of them run the block against their own
    cached routed tokens and the rest are dropped and counted in ``cache.drops``. With a
    static cache (``cache.static``, the default on CUDA) the step is static-shaped and
    free of host syncs (CUDA-graph capturable; see ``generate(cuda_graph=True)``), and
    ``torch.compile(model.decode_step, fullgraph=True)`` compiles it; with a dynamic one
    (the CPU default) MoD layers run their block on the routed rows only.

    Raises:
        ValueError: tokens not (B,) int64 on the cache's device, token ids outside the
            vocabulary (checked on the CPU only: on CUDA it would be a host sync), an
            empty (not prefilled) cache, a full one (max_len columns written), or a
            cache allocated for another model configuration, device or dtype.
    """
    check_cache_matches(model, cache, "decode_step")
    check_decode_inputs(tokens, cache)
    # Free on the CPU; on CUDA (and inside torch.compile) it would be a host sync.
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        check_token_ids(tokens, model.cfg.vocab_size, "decode_step", "tokens")
    logits = _step(model, tokens, cache)
    cache.n_written += 1
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next tokens (B,) int64 from logits (B, V). No host sync.

    temperature == 0: greedy (argmax). Otherwise softmax(logits / temperature) over the
    top_k most likely tokens only (all tokens when top_k is None): exactly top_k tokens
    (ties broken by torch.topk) can be sampled at every temperature; at temperature inf
    the draw is uniform among them (among the tokens with a finite logit). Logits are
    shifted by their row maximum first, so a tiny temperature gives the best token (0)
    and -inf, never inf - inf = NaN.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    allowed = logits > float("-inf")
    if top_k is not None and top_k < logits.shape[-1]:
        top = torch.topk(logits, top_k, dim=-1).indices  # (B, top_k)
        allowed = allowed & torch.zeros_like(allowed).scatter(-1, top, True)
    if math.isinf(temperature):
        scaled = torch.zeros_like(logits)
    else:
        scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    scaled = scaled.masked_fill(~allowed, float("-inf"))
    probs = F.softmax(scaled, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def apply_stop_tokens(nxt: Tensor, finished: Tensor, stops: Optional[Tensor], pad_token: Optional[int]) -> Tensor:
    """Tokens (B,) with finished sequences' replaced by pad_token; marks the sequences
    that just emitted a stop token as finished (in place: ``finished`` is the caller's
    own state). No-op without stop tokens."""
    if stops is None:
        return nxt
    nxt = torch.where(finished, pad_token, nxt)
    finished |= torch.isin(nxt, stops)
    return nxt


class DecodeGraph:
    """A CUDA graph of one decode step on one static cache (static token buffer and logits).

    Captured on an empty cache (warm-up steps run on a side stream first, then the
    cache is reset), so the caller prefills after construction and replays per token.
    Keeps no reference to the model (the graph does not need it once captured).
    """

    def __init__(self, model: "MoDTransformer", cache: MoDKVCache):
        if not cache.static:
            raise ValueError("DecodeGraph: the cache must be static (allocate_cache(..., static=True))")
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, dtype=torch.int64, device=cache.device)
        cache.reset()
        stream = torch.cuda.Stream(device=cache.device)
        stream.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up: lazy inits (cuBLAS handles, kernel attributes)
                _step(model, self.tokens, cache)
        torch.cuda.current_stream(cache.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = _step(model, self.tokens, cache)
        cache.reset()

    def step(self, tokens: Tensor) -> Tensor:
        """Replay one step with tokens (B,); returns the static logits buffer (B, V)."""
        check_decode_inputs(tokens, self.cache)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.n_written += 1
        return self.logits


# model -> {(B, max_len, decode_capacity, cache_capacity_factor, device, dtype): DecodeGraph}.
# Weak keys: a model that is garbage-collected takes its graphs with it.
_decode_graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def clear_decode_graphs(model: Optional["MoDTransformer"] = None) -> None:
    """Drop the CUDA graphs (and their caches) kept by ``generate(cuda_graph=True)`` for
    ``model`` (all models when None). Call it after moving the model or replacing (not
    updating in place) its parameters."""
    if model is None:
        _decode_graphs.clear()
    else:
        _decode_graphs.pop(model, None)


def _decode_graph(model: "MoDTransformer", B: int, max_len: int, decode_capacity: Optional[int],
                  cache_capacity_factor: Optional[float], device: torch.device) -> DecodeGraph:
    if decode_capacity is None:  # key on the resolved value: None and the default are one graph
        decode_capacity = default_decode_capacity(B, min(1.0, model.cfg.capacity_factor))
    ccf = None if cache_capacity_factor is None else float(cache_capacity_factor)
    key = (B, max_len, decode_capacity, ccf, str(device), model.wte.weight.dtype)
    graphs = _decode_graphs.setdefault(model, {})
    if key not in graphs:
        cache = allocate_cache(model, B, max_len, cache_capacity_factor=cache_capacity_factor,
                               decode_capacity=decode_capacity, static=True)
        graphs[key] = DecodeGraph(model, cache)
    return graphs[key]


@torch.no_grad()
def generate(
    model: "MoDTransformer",
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    routing: str = "causal",
    generator: Optional[torch.Generator] = None,
    *,
    valid: Optional[Tensor] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    pad_token: Optional[int] = None,
    use_cache: bool = True,
    cuda_graph: bool = False,
    max_len: Optional[int] = None,
    decode_capacity: Optional[int] = None,
    cache_capacity_factor: Optional[float] = None,
    static: Optional[bool] = None,
    return_cache: bool = False,
    check_every: int = 16,
) -> Union[Tensor, GenerationOutput]:
    """Sample max_new_tokens tokens after idx (B, T) int64.

    With ``use_cache=True`` (default) the prompt is prefilled into a :class:`MoDKVCache`
    and every further token costs one decode step (MoD layers cache only their routed
    tokens; docs/MOD_SPEC.md section 4). With ``use_cache=False`` the whole context
    (cropped to block_size) is recomputed for every token.

    Args:
        model: the :class:`~mod_ext.models.MoDTransformer`.
        idx: (B, T) int64 prompts, left-padded when ``valid`` is given.
        max_new_tokens: tokens to sample (an int >= 0).
        temperature: 0 = greedy (argmax); else the softmax temperature (> 0; inf
            samples uniformly among the allowed tokens). See :func:`sample_next`.
        top_k: sample among the top_k most likely tokens only, at every temperature.
        routing: "causal" (default; the only choice with the cache) or "topk" (full
            recompute only; not causal).
        generator: torch.Generator for reproducible sampling.
        valid: (B, T) bool, False for left padding (prompts of different lengths).
        stop_tokens: a token id or ids that end a sequence (the stop token is kept);
            later positions get pad_token (an id in the vocabulary; default: the
            first stop token). A finished sequence stops routing.
        use_cache: KV-cache decoding (True) or full recompute (False).
        cuda_graph: capture the decode step in a CUDA graph once per (model, B, max_len,
            decode_capacity, cache_capacity_factor, device, dtype) and replay it (CUDA
            only; the graph and its cache are kept in this module until
            :func:`clear_decode_graphs` or until the model is garbage-collected).
        max_len: cache columns (default block_size); needs T + max_new_tokens - 1 <= max_len.
        decode_capacity, cache_capacity_factor, static: see :func:`allocate_cache`
            (cuda_graph=True always uses a static cache). max_len and these apply to
            the cache only (ValueError with use_cache=False).
        return_cache: also return the cache (its ``drops``, ``overflow`` and
            ``fill_counts()``), as a :class:`GenerationOutput`.
        check_every: with stop tokens, check every this many tokens (one host sync)
            whether all sequences have finished, to stop early.

    Returns:
        (B, T + max_new_tokens) int64 tokens; with ``return_cache=True`` a
        :class:`GenerationOutput` ``(tokens, cache)``.

    Raises:
        ValueError: bad prompt / valid mask, token ids outside the vocabulary (idx,
            stop_tokens, pad_token), a prompt + new tokens that do not fit the cache,
            cuda_graph=True off CUDA, routing="topk" with the cache, cache options
            without the cache, a negative or NaN temperature, a bad top_k.
    """
    def done(tokens, cache=None):
        return GenerationOutput(tokens, cache) if return_cache else tokens

    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.int64:
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"generate: idx must be a (B, T) int64 prompt with T >= 1, got {got}")
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", 0, where="generate")
    if top_k is not None:
        top_k = as_int(top_k, "top_k", 1, where="generate")
    temperature = as_real(temperature, "temperature", "generate", low=0.0, what="a number >= 0 (0 = greedy)")
    if routing not in ("causal", "topk"):
        raise ValueError(f"generate: routing must be 'causal' or 'topk', got {routing!r}")
    check_token_ids(idx, model.cfg.vocab_size, "generate", "idx")
    if valid is not None:
        valid = _check_valid_prompt(idx, valid, "generate")
    if pad_token is not None and stop_tokens is None:
        raise ValueError("generate: pad_token only fills the positions after a stop token; pass stop_tokens too")
    stop_tokens, pad_token = normalize_stop_tokens(stop_tokens, pad_token, model.cfg.vocab_size)
    check_every = as_int(check_every, "check_every", 1, where="generate")
    if max_new_tokens == 0:
        return done(idx.clone())
    B, T = idx.shape
    stops = None if stop_tokens is None else torch.tensor(stop_tokens, dtype=torch.int64, device=idx.device)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)

    if not use_cache:
        cache_opts = dict(max_len=max_len, decode_capacity=decode_capacity,
                          cache_capacity_factor=cache_capacity_factor, static=static)
        given = [k for k, v in cache_opts.items() if v is not None]
        if given:
            raise ValueError(f"generate: {', '.join(given)}: cache options, valid only with use_cache=True")
        if cuda_graph:
            raise ValueError("generate: cuda_graph=True needs use_cache=True")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -model.cfg.block_size:]
            valid_cond = None if valid is None else valid[:, -model.cfg.block_size:]
            logits = model(idx_cond, routing=routing, valid=valid_cond).logits
            nxt = apply_stop_tokens(sample_next(logits[:, -1, :], temperature, top_k, generator), finished, stops,
                                    pad_token)  # (B,)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            if valid is not None:
                valid = torch.cat((valid, torch.ones_like(valid[:, :1])), dim=1)
        return done(idx)

    if routing != "causal":
        raise ValueError("generate: routing='topk' looks at future tokens and cannot use the KV cache; "
                         "pass use_cache=False")
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
        graph = _decode_graph(model, B, max_len, decode_capacity, cache_capacity_factor, idx.device)
        cache, step = graph.cache, graph.step
    else:
        cache = allocate_cache(model, B, max_len, cache_capacity_factor=cache_capacity_factor,
                               decode_capacity=decode_capacity, static=static)

        def step(tokens):
            return decode_step(model, tokens, cache)

    logits = prefill(model, idx, cache, valid)
    out = torch.full((B, max_new_tokens), pad_token if pad_token is not None else 0, dtype=torch.int64,
                     device=idx.device)
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
    return done(torch.cat([idx, out], dim=1), cache)
