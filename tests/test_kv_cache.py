"""The layer KV caches (mod_ext.kv_cache) and MoDBlock.prefill / MoDBlock.decode on top
of them, with a model-agnostic block that implements the block protocol.

Oracle: ``MoDBlock.forward(x[:, :t + 1], routing="causal")`` (a full causal recompute of
the prefix) for the token at position t; docs/MOD_SPEC.md sections 2-4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mod_ext
from mod_ext.kv_cache import CachedBlock, DenseLayerCache, MoDLayerCache
from mod_ext.models import Block, ModelConfig
from tests.helpers import DEVICES, assert_bitwise_equal

T, F_ = True, False


class ToyCachedBlock(nn.Module):
    """Two-head causal attention with a bias by true-position distance, plus an MLP;
    returns the update only. Implements the block protocol (kv_cache.CachedBlock)."""

    n_head = 2

    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Linear(d, d)

    def _qkv(self, x, positions):
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.n_head, D // self.n_head).unbind(2)
        k = k + 0.01 * positions[..., None, None].to(k.dtype)  # keys carry their true position
        return q, k, v

    def _attend(self, q, keys, values, allowed):  # q (N, Lq, nh, hs), keys (N, Lk, nh, hs), allowed (N, Lq, Lk)
        att = torch.einsum("nqhd,nkhd->nhqk", q, keys) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~allowed[:, None], float("-inf"))
        y = torch.einsum("nhqk,nkhd->nqhd", att.softmax(-1), values)
        return y.reshape(q.shape[0], q.shape[1], -1)

    def forward(self, x, positions, slot_mask=None, write=None):
        N, L, _ = x.shape
        q, k, v = self._qkv(x, positions)
        if write is not None:
            write(k, v)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        keep = slot_mask if slot_mask is not None else torch.ones(N, L, dtype=torch.bool, device=x.device)
        allowed = causal & (keep[:, None, :] | eye)
        u = self.proj(self._attend(q, k, v, allowed))
        return u + torch.tanh(self.mlp(x + u))

    def forward_cached(self, x, positions, write, read):
        q, k, v = self._qkv(x, positions)
        write(k, v)
        keys, values, key_mask = read()
        u = self.proj(self._attend(q, keys, values, key_mask[:, None, :]))
        return u + torch.tanh(self.mlp(x + u))


class Residual(nn.Module):
    """The same block returning x + f (for block_returns_residual=True)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, positions, slot_mask=None, write=None):
        return x + self.inner(x, positions, slot_mask, write)

    def forward_cached(self, x, positions, write, read):
        return x + self.inner.forward_cached(x, positions, write, read)


def make_layer(D=8, S=24, c=0.25, bias=0.3, seed=0, causal_router="predictor", residual=False, dtype=torch.float64):
    torch.manual_seed(seed)
    inner = ToyCachedBlock(D)
    blk = mod_ext.MoDBlock(Residual(inner) if residual else inner, D, capacity_factor=c, max_seq_len=S,
                           causal_router=causal_router, block_returns_residual=residual)
    with torch.no_grad():
        if blk.predictor is not None:
            blk.predictor.net[2].bias.fill_(bias)
        else:
            blk.router_bias.fill_(bias)
    return blk.to(dtype).eval()


def new_cache(blk, B, slots=None, dtype=torch.float64):
    K = blk.causal_capacity(blk.max_seq_len)
    return MoDLayerCache(B, slots or K, K, ToyCachedBlock.n_head, blk.d_model // ToyCachedBlock.n_head, dtype=dtype)


# --------------------------------------------------------------------------------------
# The cache classes
# --------------------------------------------------------------------------------------


def test_mod_layer_cache_allocation():
    c = MoDLayerCache(3, 5, 4, 2, 8, dtype=torch.bfloat16)
    assert c.k.shape == c.v.shape == (3, 6, 2, 8) and c.k.dtype == torch.bfloat16
    assert c.fill.shape == c.drops.shape == c.overflow.shape == (3,) and c.fill.dtype == torch.int64
    assert c.limit == 4 and c.scratch == 5 and c.slots == 5 and c.causal_capacity == 4
    assert MoDLayerCache(1, 2, 9, 1, 2).limit == 2
    assert c.bytes_per_seq() == (2 * 6 * 2 * 8 * 2 + 8)
    d = DenseLayerCache(3, 7, 2, 4)
    assert d.k.shape == (3, 7, 2, 4) and d.bytes_per_seq() == 2 * 7 * 2 * 4 * 4
    for kwargs, name in [(dict(batch=0), "batch"), (dict(slots=0), "slots"), (dict(causal_capacity=True), "causal_capacity"),
                         (dict(n_kv_heads=1.5), "n_kv_heads"), (dict(head_dim=-1), "head_dim")]:
        args = dict(batch=2, slots=3, causal_capacity=3, n_kv_heads=1, head_dim=2)
        args.update(kwargs)
        with pytest.raises(ValueError, match=f"MoDLayerCache: {name} must be an int >= 1"):
            MoDLayerCache(**args)
    with pytest.raises(ValueError, match="DenseLayerCache: max_len"):
        DenseLayerCache(2, 0, 1, 2)


def test_mod_layer_cache_prefill_write_and_counts():
    c = MoDLayerCache(2, 4, 3, 1, 2)
    slot_mask = torch.tensor([[T, F_, T], [F_, F_, T]])
    k = torch.arange(12.0).view(2, 3, 1, 2)
    c.prefill_write(slot_mask)(k, -k)
    # row 0: routed slots 0 and 2 -> cache slots 0, 1; padding slot 1 -> scratch (4)
    assert torch.equal(c.k[0, 0], k[0, 0]) and torch.equal(c.k[0, 1], k[0, 2]) and torch.equal(c.k[0, 4], k[0, 1])
    assert torch.equal(c.v[0, 1], -k[0, 2])
    # row 1: the routed slot 2 -> cache slot 0; both padding slots wrote the scratch slot
    assert torch.equal(c.k[1, 0], k[1, 2]) and not c.k[1, 1:4].any()
    c.record_prefill(slot_mask, torch.tensor([5, 1]))
    assert c.fill.tolist() == [2, 1]
    assert c.drops.tolist() == [3, 0]  # 5 wanted, 2 routed
    assert c.overflow.tolist() == [1, 0]  # the causal rule (K = 3) would have routed 3
    c.reset()
    assert c.fill.tolist() == c.drops.tolist() == c.overflow.tolist() == [0, 0]


def test_mod_layer_cache_decode_kv_and_counts():
    c = MoDLayerCache(3, 2, 2, 1, 1)
    c.fill.copy_(torch.tensor([1, 2, 0]))
    want = torch.tensor([T, T, F_])
    assert c.decode_candidates(want).tolist() == [T, F_, F_]  # row 1 is full (limit 2)
    c.record_decode(want, torch.tensor([F_, F_, F_]))
    assert c.drops.tolist() == [1, 1, 0] and c.overflow.tolist() == [1, 0, 0]  # row 1 holds K already
    rows, row_mask = torch.tensor([0, 2]), torch.tensor([T, F_])  # one routed slot, one padding slot
    write, read = c.decode_kv(rows, row_mask)
    write(torch.tensor([[[[7.0]]], [[[9.0]]]]), torch.tensor([[[[8.0]]], [[[10.0]]]]))
    assert c.fill.tolist() == [2, 2, 0]  # only the routed slot advanced its sequence
    assert float(c.k[0, 1]) == 7.0 and float(c.v[0, 1]) == 8.0 and float(c.k[2, 2]) == 9.0  # padding -> scratch
    keys, values, key_mask = read()
    assert keys.shape == (2, 3, 1, 1) and torch.equal(keys[0], c.k[0])
    assert key_mask.tolist() == [[T, T, F_], [F_, F_, T]]


def test_dense_layer_cache_write_read():
    d = DenseLayerCache(2, 4, 1, 1)
    d.prefill_write()(torch.ones(2, 2, 1, 1), 2 * torch.ones(2, 2, 1, 1))
    assert d.k[:, :2].eq(1).all() and not d.k[:, 2:].any() and d.v[:, :2].eq(2).all()
    key_mask = torch.tensor([[T, T, T, F_], [F_, T, T, F_]])
    write, read = d.decode_kv(torch.tensor([2]), key_mask)
    write(3 * torch.ones(2, 1, 1, 1), 4 * torch.ones(2, 1, 1, 1))
    keys, values, mask = read()
    assert keys is d.k and mask is key_mask and d.k[:, 2].eq(3).all() and d.v[:, 2].eq(4).all()


def test_blocks_implement_the_protocol():
    assert isinstance(Block(ModelConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, d_model=8)), CachedBlock)
    assert isinstance(ToyCachedBlock(4), CachedBlock)
    assert not isinstance(nn.Linear(4, 4), CachedBlock)
    blk = mod_ext.MoDBlock(nn.Identity(), 4, max_seq_len=8)
    with pytest.raises(ValueError, match="block protocol"):
        blk.prefill(torch.randn(1, 4, 4), MoDLayerCache(1, 2, 2, 1, 4))


# --------------------------------------------------------------------------------------
# MoDBlock.prefill / decode == the full causal recompute
# --------------------------------------------------------------------------------------


def decode_all(blk, x, T0, cache, static, decode_capacity=None, active=None):
    """Prefill x[:, :T0], then decode x[:, T0:] token by token; returns the (B, S, D)
    outputs (prefill output, then each decoded token's)."""
    B, S, _ = x.shape
    with torch.no_grad():
        outs = [blk.prefill(x[:, :T0], cache, static=static).output]
        for t in range(T0, S):
            pos = torch.full((B, 1), t, dtype=torch.int64)
            outs.append(blk.decode(x[:, t:t + 1], cache, pos, active, decode_capacity=decode_capacity or B,
                                   static=static))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("residual", [False, True], ids=["update", "returns_residual"])
@pytest.mark.parametrize("causal_router", ["predictor", "router"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_prefill_decode_equals_full_recompute(static, causal_router, residual):
    blk = make_layer(causal_router=causal_router, residual=residual)
    B, S, D, T0 = 3, 24, 8, 5
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_before = x.clone()
    cache = new_cache(blk, B)
    got = decode_all(blk, x, T0, cache, static)
    assert_bitwise_equal(x, x_before, "prefill/decode must not modify the caller's x")
    with torch.no_grad():
        for t in range(S):
            ref = blk(x[:, : t + 1], routing="causal").output[:, t]
            torch.testing.assert_close(got[:, t], ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"token {t}: {m}")
        full = blk(x, routing="causal").routing
    routed = full.slot_mask.long().sum(1)
    assert cache.fill.tolist() == routed.tolist() and cache.overflow.sum() == 0
    assert (routed > 0).all() and (routed < S).all(), "routing was trivial: the test would be vacuous"
    scores = blk.causal_scores(x).float()
    assert cache.drops.tolist() == ((scores > 0).long().sum(1) - routed).tolist()


def test_dynamic_prefill_runs_the_block_on_the_routed_slots_only():
    """static=False: as many slots as the busiest row routes (read on the host), the same
    routing, output and cache as the static prefill, which runs min(causal capacity, limit) slots."""
    blk = make_layer(S=64, bias=0.0)  # causal capacity 16 > T: the cap does not bind, every token could route
    B, T, D = 3, 10, 8
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        c_static, c_dyn = new_cache(blk, B), new_cache(blk, B)
        ref = blk.prefill(x, c_static, static=True)
        got = blk.prefill(x, c_dyn, static=False)
    routed = ref.routing.slot_mask.long().sum(1)
    assert ref.routing.indices.shape[1] == min(blk.causal_capacity(T), c_static.limit)
    assert got.routing.indices.shape[1] == max(1, int(routed.max())) < ref.routing.indices.shape[1]
    # Same tokens through the same block, on a different number of slots (BLAS may round
    # the (B, C, D) matmuls differently): equal to float64 rounding, not bitwise.
    torch.testing.assert_close(got.output, ref.output, rtol=1e-12, atol=1e-12)
    for name in ("fill", "drops", "overflow"):
        assert torch.equal(getattr(c_dyn, name), getattr(c_static, name)), name
    for b in range(B):
        n = int(routed[b])
        torch.testing.assert_close(c_dyn.k[b, :n], c_static.k[b, :n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_decode_capacity_and_inactive_rows(static):
    """Decode capacity 1 of B = 3: only the highest-scoring candidate runs the block;
    an inactive sequence never routes (and its token passes through)."""
    blk = make_layer(bias=20.0)  # every token wants the layer
    B, D = 3, 8
    x = torch.randn(B, 6, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cache = new_cache(blk, B)
    with torch.no_grad():
        blk.prefill(x[:, :2], cache)
        fill0 = cache.fill.clone()
        active = torch.tensor([T, T, F_])
        scores = blk.causal_scores(x[:, 2:3])[:, 0]
        out = blk.decode(x[:, 2:3], cache, torch.full((B, 1), 2), active, decode_capacity=1, static=static)
    winner = int(scores[:2].argmax())
    grew = (cache.fill - fill0).tolist()
    assert grew == [int(b == winner) for b in range(B)]
    assert cache.drops.tolist() == [int(b != winner and b < 2) for b in range(B)]
    assert_bitwise_equal(out[2], x[2, 2:3], "inactive sequence")
    assert_bitwise_equal(out[1 - winner], x[1 - winner, 2:3], "dropped token")
    assert not torch.equal(out[winner], x[winner, 2:3])
    with pytest.raises(ValueError, match=r"decode_capacity must be an int in \[1, B = 3\]"):
        blk.decode(x[:, 2:3], cache, torch.full((B, 1), 2), decode_capacity=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, D\)"):
        blk.decode(x[:, 2:4], cache, torch.full((B, 1), 2))
    with pytest.raises(ValueError, match="batch"):
        blk.decode(x[:2, 2:3], cache, torch.full((2, 1), 2))
    with pytest.raises(ValueError, match="positions must be an int64"):
        blk.decode(x[:, 2:3], cache, torch.full((B, 1), 2.0))
    with pytest.raises(ValueError, match="active must be a bool"):
        blk.decode(x[:, 2:3], cache, torch.full((B, 1), 2), active=torch.ones(B))


def test_prefill_decode_inplace_and_grad_mode():
    """inplace=True updates the caller's buffer (inference only); inplace=False (the
    default) never does; inplace=True with grad recording raises."""
    blk = make_layer(bias=20.0)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cache = new_cache(blk, 2)
    with torch.no_grad():
        ref = blk.prefill(x.clone(), cache).output
        buf = x.clone()
        out = blk.prefill(buf, cache, inplace=True).output
    assert out.data_ptr() == buf.data_ptr() and torch.equal(buf, ref)
    with pytest.raises(ValueError, match="inplace=True is for inference only"):
        blk.prefill(x.clone(), cache, inplace=True)  # grad mode on, the block's parameters require grad


def test_layer_cache_deepcopy_and_model_agnostic():
    """A MoDLayerCache is plain tensors: deepcopy gives an independent cache; its
    arguments are the attention's shape only (no model configuration)."""
    blk = make_layer()
    cache = new_cache(blk, 2)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        blk.prefill(x, cache)
    twin = copy.deepcopy(cache)
    with torch.no_grad():
        blk.prefill(torch.randn(2, 6, 8, dtype=torch.float64) + 5, cache)
    assert twin.k.data_ptr() != cache.k.data_ptr() and not torch.equal(twin.k, cache.k)


def test_prefill_starts_the_sequences_and_a_rejected_one_changes_nothing():
    blk = make_layer(bias=20.0)  # every token wants the layer; K = 6
    cache = new_cache(blk, 2)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    with torch.no_grad():
        blk.prefill(x, cache)
        assert cache.fill.tolist() == [6, 6] and cache.drops.tolist() == [4, 4]
        blk.prefill(x[:, :3], cache)  # a new prompt: counts are this prompt's, not added
        assert cache.fill.tolist() == [3, 3] and cache.drops.tolist() == [0, 0]
        state = [t.clone() for t in (cache.k, cache.fill, cache.drops, cache.overflow)]
        with pytest.raises(ValueError, match="valid must be a bool tensor"):
            blk.prefill(x, cache, valid=torch.ones(2, 10))
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            blk.prefill(torch.randn(2, 25, 8, dtype=torch.float64), cache)
    for a, b in zip(state, (cache.k, cache.fill, cache.drops, cache.overflow)):
        assert torch.equal(a, b), "a rejected prefill changed the cache"
