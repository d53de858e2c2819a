"""The KV cache of one layer: a MoD layer's cache of its routed tokens, a dense layer's
cache of every column, and the block protocol a block implements to be cached.

Semantics (docs/MOD_SPEC.md section 4; Raposo et al. 2024, arXiv 2404.02258, Sections 3.5
and 5): a token that skips a MoD layer writes no key or value there, so a MoD layer's
cache holds only the tokens it routed, per sequence, in a fixed number of *cache slots*
with a per-sequence fill count; sequences of a batch fill at different rates. One extra
*scratch slot* per sequence takes the writes of padding slots, so every write is
static-shaped and nothing here synchronises with the host (CUDA-graph capturable).

Model-agnostic: the classes take ``n_kv_heads``, ``head_dim``, ``dtype`` and ``device``
and know nothing of a model configuration; :class:`mod_ext.MoDBlock` drives a
:class:`MoDLayerCache` (``MoDBlock.prefill`` / ``MoDBlock.decode``), and
:mod:`mod_ext.generation` builds one cache per layer of the reference model.

Terms: a *column* is one token position of the left-padded batch; *K* (the causal
capacity) is the most tokens a MoD layer's causal rule routes per sequence, fixed by its
``max_seq_len`` (``MoDBlock.causal_capacity(max_seq_len)``); *cache slots* are the
routed tokens a MoD layer's cache can hold per sequence (a sequence holds at most
``limit = min(slots, K)``).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

from ._args import as_int

__all__ = ["KVWrite", "KVRead", "CachedBlock", "MoDLayerCache", "DenseLayerCache"]

#: ``write(k, v, positions=None)``: store the rotated keys and values (N, T, n_kv_heads,
#: head_dim) of the T tokens a block call processes, and optionally their true positions
#: (N, T) int64 (a MoD layer's cache keeps them, for sliding-window attention over the
#: routed tokens; see :class:`CachedBlock`).
KVWrite = Callable[..., None]
#: ``read() -> (keys (N, L, n_kv_heads, head_dim), values (N, L, n_kv_heads, head_dim),
#: key_mask (N, L) bool)``: the cache entries a new token attends to (see :class:`CachedBlock`).
KVRead = Callable[[], Tuple[Tensor, Tensor, Tensor]]


@runtime_checkable
class CachedBlock(Protocol):
    """What a block must implement to be cached (the block protocol).

    :meth:`mod_ext.MoDBlock.prefill` and :meth:`mod_ext.MoDBlock.decode` call their
    block through these two methods; the reference model's dense layers
    (:class:`mod_ext.models.Block`) implement the same protocol. The block returns its
    *update* f (attention + MLP output, without the residual), as in
    :func:`mod_ext.mod_block`.

    ``block(x, positions, slot_mask, write=None) -> (N, T, D)``
        Full-sequence call (training, and prefill of a prompt).
        x (N, T, D): the tokens (a MoD layer: its C routed tokens, in position order);
        positions (N, T) int64: their true positions (for rotary encodings);
        slot_mask (N, T) bool or None: False for padding slots, whose keys the block
        must ignore (None = every slot is real). Attention is causal in slot order.
        ``write``, when given, must be called exactly once with the attention's keys and
        values of all T tokens, ``write(k, v)`` with k, v (N, T, n_kv_heads, head_dim),
        rotary already applied to k, in the cache's dtype. Prefill passes it; the
        cache decides where each row goes (a MoD layer: routed slots to cache slots
        0..fill-1 in order, padding slots to the scratch slot; a dense layer: column t
        to entry t).

    ``block.forward_cached(x, positions, write, read) -> (N, 1, D)``
        One new token per row against the cache (decoding).
        x (N, 1, D): the new tokens; positions (N, 1) int64: their true positions.
        The block must first call ``write(k, v)`` once with the new token's key and
        value (N, 1, n_kv_heads, head_dim), then ``read()`` once, which returns
        ``(keys, values, key_mask)``: keys and values (N, L, n_kv_heads, head_dim) and
        key_mask (N, L) bool, the entries row n attends to. The new token's own entry
        is included (read sees the write), every row has at least one True (a padding
        row of a MoD layer sees only the scratch slot it wrote, which keeps the softmax
        finite), and entries with key_mask False hold stale values that must get
        exactly zero attention weight.
    """

    def __call__(
        self, x: Tensor, positions: Tensor, slot_mask: Optional[Tensor] = None, write: Optional[KVWrite] = None
    ) -> Tensor: ...

    def forward_cached(self, x: Tensor, positions: Tensor, write: KVWrite, read: KVRead) -> Tensor: ...


class _LayerKV:
    """Keys and values (B, entries, n_kv_heads, head_dim) of one layer: what the MoD and
    the dense layer caches share (allocation, argument checks, dtype, device, bytes)."""

    def __init__(self, where: str, batch: int, entries: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: Optional[torch.device]):
        self.batch = as_int(batch, "batch", 1, where=where)
        shape = (self.batch, entries, as_int(n_kv_heads, "n_kv_heads", 1, where=where),
                 as_int(head_dim, "head_dim", 1, where=where))
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def _kv_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class MoDLayerCache(_LayerKV):
    """The KV cache of one MoD layer: only its routed tokens, per sequence, in fixed slots.

    Args:
        batch: B, sequences cached together (int >= 1).
        slots: cache slots per sequence (int >= 1), without the scratch slot.
        causal_capacity: K, the most tokens the layer's causal rule routes per sequence
            (``MoDBlock.causal_capacity(max_seq_len)``); a sequence holds at most
            ``limit = min(slots, K)`` routed tokens.
        n_kv_heads, head_dim: the shape of one token's key (and value).
        dtype, device: of the keys and values.

    Attributes (all tensors keep their addresses for the cache's life, so a CUDA graph
    can read and write them):
        k, v: (B, slots + 1, n_kv_heads, head_dim). Entries 0..fill[b]-1 of row b hold
            sequence b's routed tokens in position order; entry ``scratch`` (= slots)
            is the scratch slot, written by padding slots and never attended to by a
            routed token.
        fill: (B,) int64, routed tokens held per sequence.
        drops: (B,) int64, tokens that wanted the layer (causal score > 0, sequence
            active) but did not run it: the causal rule's own capacity K, a full cache,
            or a lost decode-capacity top-k.
        overflow: (B,) int64, the drops a full recompute would not make (a cache
            smaller than K filled up, or the decode capacity ran out). While it is 0,
            decoding through this cache gives a full recompute's result.
        positions: (B, slots + 1) int64, the true positions of the cached tokens, where
            the block passed them to ``write`` (0 elsewhere); a padding slot writes its
            own position to the scratch slot.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self, batch: int, slots: int, causal_capacity: int, n_kv_heads: int, head_dim: int, *,
        dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
    ):
        where = "MoDLayerCache"
        self.slots = as_int(slots, "slots", 1, where=where)
        self.causal_capacity = as_int(causal_capacity, "causal_capacity", 1, where=where)
        super().__init__(where, batch, self.slots + 1, n_kv_heads, head_dim, dtype, device)
        self.fill = torch.zeros(self.batch, dtype=torch.int64, device=device)
        self.drops = torch.zeros(self.batch, dtype=torch.int64, device=device)
        self.overflow = torch.zeros(self.batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.batch, self.slots + 1, dtype=torch.int64, device=device)
        # Constants kept here so a captured step allocates nothing per call.
        self._rows = torch.arange(self.batch, device=device)
        self._slot_arange = torch.arange(self.slots + 1, device=device)

    @property
    def limit(self) -> int:
        """Most routed tokens a sequence can hold here: ``min(slots, K)``."""
        return min(self.slots, self.causal_capacity)

    @property
    def scratch(self) -> int:
        """Index of the scratch slot (= slots)."""
        return self.slots

    def reset(self) -> None:
        """Forget every sequence (in place; keys/values are left, they are masked out)."""
        self.fill.zero_()
        self.drops.zero_()
        self.overflow.zero_()

    # ---------------------------------------------------------------- prefill

    def prefill_write(self, slot_mask: Tensor) -> KVWrite:
        """The ``write`` for a prefill block call on C routed slots (B, C).

        Routed slots (slot_mask True) go to cache slots 0, 1, ... in slot order (=
        position order), padding slots to the scratch slot.
        """
        B, C = slot_mask.shape
        slot = torch.where(slot_mask, slot_mask.long().cumsum(1) - 1, torch.full_like(slot_mask, self.scratch, dtype=torch.int64))
        rows = self._rows[:, None].expand(B, C)

        def write(k: Tensor, v: Tensor, positions: Optional[Tensor] = None) -> None:  # (B, C, n_kv_heads, head_dim)
            self.k[rows, slot] = k
            self.v[rows, slot] = v
            if positions is not None:  # (B, C)
                self.positions[rows, slot] = positions

        return write

    def record_prefill(self, slot_mask: Tensor, wanted: Tensor) -> None:
        """After a prefill (which starts the cache's sequences): fill = the routed tokens
        per sequence, drops and overflow = the prompt's.

        Args:
            slot_mask: (B, C) bool, the prefill's routed slots.
            wanted: (B,) int64, the prompt's tokens that wanted the layer (score > 0, valid).
        """
        routed = slot_mask.long().sum(1)
        self.fill.copy_(routed)
        self.drops.copy_(wanted - routed)
        self.overflow.copy_(wanted.clamp_max(self.causal_capacity) - routed)  # the causal rule alone routes this many

    # ---------------------------------------------------------------- decode

    def decode_candidates(self, want: Tensor) -> Tensor:
        """(B,) bool: the new tokens that want the layer and whose sequence has room."""
        return want & (self.fill < self.limit)

    def record_decode(self, want: Tensor, selected: Tensor) -> None:
        """Count a decode step's drops (before its writes): ``want`` (B,) bool tokens
        that wanted the layer, ``selected`` (B,) bool those that run the block."""
        dropped = want & ~selected
        self.drops += dropped.long()
        self.overflow += (dropped & (self.fill < self.causal_capacity)).long()

    def decode_kv(self, rows: Tensor, row_mask: Tensor) -> Tuple[KVWrite, KVRead]:
        """``(write, read)`` for a decode block call on n block slots.

        Args:
            rows: (n,) int64, the sequence of each block slot.
            row_mask: (n,) bool, False for padding block slots.

        ``write(k, v)`` with (n, 1, n_kv_heads, head_dim) stores a routed slot's key and
        value at its sequence's next cache slot (fill) and advances fill; a padding slot
        writes the scratch slot. ``read()`` returns the keys and values (n, slots + 1,
        n_kv_heads, head_dim) of each slot's sequence and the key mask (n, slots + 1):
        a routed slot sees its sequence's routed tokens (itself included), a padding slot
        only the scratch slot.
        """
        fill_sel = self.fill.gather(0, rows)  # (n,) before this token
        slot = torch.where(row_mask, fill_sel, self.scratch)

        def write(k: Tensor, v: Tensor, positions: Optional[Tensor] = None) -> None:  # (n, 1, n_kv_heads, head_dim)
            self.k[rows, slot] = k[:, 0]
            self.v[rows, slot] = v[:, 0]
            if positions is not None:  # (n, 1)
                self.positions[rows, slot] = positions[:, 0]
            self.fill.scatter_add_(0, rows, row_mask.long())

        def read() -> Tuple[Tensor, Tensor, Tensor]:
            keys, values = self.k.index_select(0, rows), self.v.index_select(0, rows)
            count = fill_sel + row_mask.long()
            ar = self._slot_arange[None, :]
            key_mask = (ar < count[:, None]) | ((ar == self.scratch) & ~row_mask[:, None])
            return keys, values, key_mask

        return write, read

    def bytes_per_seq(self) -> int:
        """Bytes of keys + values + fill count per sequence, scratch slot included."""
        return (self._kv_bytes() + self.fill.numel() * self.fill.element_size()) // self.batch

    # ---------------------------------------------------------------- reshaping (eager)

    def _copy_into(self, new: "MoDLayerCache", index: Optional[Tensor]) -> "MoDLayerCache":
        n = min(self.slots, new.slots)  # cache slots carried over (the scratch slot is not)
        take = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
        new.k[:, :n] = take(self.k[:, :n])
        new.v[:, :n] = take(self.v[:, :n])
        new.positions[:, :n] = take(self.positions[:, :n])
        for name in ("fill", "drops", "overflow"):
            getattr(new, name).copy_(take(getattr(self, name)))
        return new

    def resized(self, slots: int) -> "MoDLayerCache":
        """A copy with ``slots`` cache slots (>= every sequence's fill), the same sequences.

        For caches that grow as they fill (the Hugging Face integration's dynamic cache
        layer); a static decode loop never calls it. Eager: it allocates.

        Raises:
            ValueError: slots not an int >= 1.
        """
        new = MoDLayerCache(self.batch, slots, self.causal_capacity, self.k.shape[2], self.k.shape[3],
                            dtype=self.dtype, device=self.device)
        return self._copy_into(new, None)

    def select_batch(self, index: Tensor) -> "MoDLayerCache":
        """A copy holding the sequences ``index`` ((B',) int64) in that order (beam
        search reordering, batch repetition or selection). Eager: it allocates."""
        new = MoDLayerCache(int(index.numel()), self.slots, self.causal_capacity, self.k.shape[2],
                            self.k.shape[3], dtype=self.dtype, device=self.device)
        return self._copy_into(new, index.to(self.device))


class DenseLayerCache(_LayerKV):
    """The KV cache of one dense layer: every column of B sequences of up to max_len columns.

    Args:
        batch: B (int >= 1); max_len: columns per sequence (int >= 1);
        n_kv_heads, head_dim: the shape of one token's key (and value);
        dtype, device: of the keys and values.

    Attributes:
        k, v: (B, max_len, n_kv_heads, head_dim); entry j holds column j.

    Which columns hold real tokens is kept by the caller (a (B, max_len) key mask shared
    by all dense layers), since it is the same for every dense layer.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
        dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
    ):
        self.max_len = as_int(max_len, "max_len", 1, where="DenseLayerCache")
        super().__init__("DenseLayerCache", batch, self.max_len, n_kv_heads, head_dim, dtype, device)

    def reset(self) -> None:
        """Nothing to forget (the caller's key mask says which columns are real)."""

    def prefill_write(self) -> KVWrite:
        """The ``write`` for a prefill of T columns: column t to entry t."""

        def write(k: Tensor, v: Tensor) -> None:  # (B, T, n_kv_heads, head_dim)
            T = k.shape[1]
            self.k[:, :T] = k
            self.v[:, :T] = v

        return write

    def decode_kv(self, col: Tensor, key_mask: Tensor) -> Tuple[KVWrite, KVRead]:
        """``(write, read)`` for one new column ``col`` ((1,) int64 tensor): write stores
        the B new keys/values (B, 1, n_kv_heads, head_dim) at column col; read returns
        all max_len columns and ``key_mask`` (B, max_len) bool (the caller marks col
        True before the step)."""

        def write(k: Tensor, v: Tensor) -> None:
            self.k.index_copy_(1, col, k)
            self.v.index_copy_(1, col, v)

        def read() -> Tuple[Tensor, Tensor, Tensor]:
            return self.k, self.v, key_mask

        return write, read

    def bytes_per_seq(self) -> int:
        """Bytes of keys + values per sequence."""
        return self._kv_bytes() // self.batch
