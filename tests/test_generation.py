"""Sampling (mod_ext.generation): the KV cache against a full recompute (the oracle),
skipped tokens never attended to, padding and dropping across the batch, cache memory,
generate() options, errors, torch.compile and CUDA graphs.

Oracle: ``MoDTransformer.forward(seq, routing="causal")`` on each sequence alone
(no cache, no padding); docs/MOD_SPEC.md sections 2-4.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mod_ext import generation
from mod_ext.generation import default_decode_capacity, sample_next
from mod_ext.kv_cache import MoDLayerCache
from mod_ext.models import ModelConfig, MoDTransformer, dense_config
from tests.helpers import DEVICES, requires_cuda

V = 64


def make_model(seed=0, predictor_bias=0.0, device="cpu", dtype=torch.float32, **kw):
    """A tiny MoD model; predictor_bias shifts the causal scores (large = route everything)."""
    base = dict(vocab_size=V, block_size=48, n_layer=4, n_head=2, d_model=32, capacity_factor=0.25)
    base.update(kw)
    torch.manual_seed(seed)
    model = MoDTransformer(ModelConfig(**base)).eval()
    with torch.no_grad():
        for m in model.mod_layers:
            if m.predictor is not None:
                m.predictor.net[2].bias.fill_(predictor_bias)
            else:
                m.router_bias.fill_(predictor_bias)
    return model.to(device=device, dtype=dtype)


def left_padded(lengths, seed=1, device="cpu"):
    """(idx (B, T), valid (B, T), [prompt_b]) for prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    T = max(lengths)
    idx = torch.zeros(len(lengths), T, dtype=torch.int64)
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = p
        valid[b, T - len(p):] = True
    return idx.to(device), valid.to(device), [p.to(device) for p in prompts]


def recompute_last_logits(model, seq):
    """Oracle: the sequence alone, full causal forward; logits of its last token (V,)."""
    with torch.no_grad():
        logits = model(seq[None], routing="causal").logits
    return logits[0, -1]


def routed_counts(model, seq):
    """Oracle: tokens of seq that each MoD layer routes in a full causal forward."""
    with torch.no_grad():
        outs = model(seq[None], routing="causal", return_routing=True).mod_layer_outputs
    return [int(o.routing.slot_mask.sum()) for o in outs]


def assert_matches_recompute(model, logits, prompts, rtol=1e-4, atol=1e-4):
    """The oracle check: greedy_decode's logits at every step equal a full causal forward
    of each sequence alone (prompt + the greedy tokens so far). Returns the sequences,
    including the argmax of the last logits."""
    seqs = [p.clone() for p in prompts]
    for step, lg in enumerate(logits):
        for b in range(len(seqs)):
            torch.testing.assert_close(lg[b], recompute_last_logits(model, seqs[b]), rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step}, sequence {b}: {m}")
        nxt = lg.argmax(-1)
        seqs = [torch.cat([s, nxt[i:i + 1]]) for i, s in enumerate(seqs)]
    return seqs


def greedy_decode(model, idx, valid, steps, cache, before_step=None):
    """Prefill + greedy steps; returns the list of logits (B, V) per step (prefill first)."""
    out = [model.prefill(idx, cache, valid)]
    for _ in range(steps):
        nxt = out[-1].argmax(-1)
        if before_step is not None:
            before_step(cache)
        out.append(model.decode_step(nxt, cache))
    return out


# --------------------------------------------------------------------------------------
# Cache == full recompute (no drops from the decode capacity)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("causal_router", ["predictor", "router"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("device", DEVICES)
def test_cache_decode_matches_full_recompute(device, dtype, causal_router, static):
    model = make_model(causal_router=causal_router, device=device, dtype=dtype)
    lengths = [5, 11, 1, 8]
    idx, valid, prompts = left_padded(lengths, device=device)
    B, steps = len(lengths), 30
    cache = model.allocate_cache(B, decode_capacity=B, static=static)  # every routed token fits each step
    logits = greedy_decode(model, idx, valid, steps, cache)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    seqs = assert_matches_recompute(model, logits, prompts, **tol)
    # The MoD caches hold exactly the tokens the recompute routes (the last token was
    # fed to the cache in the final step; seqs also contains the argmax of the final logits).
    fills = cache.fill_counts().cpu()
    for b in range(B):
        assert fills[:, b].tolist() == routed_counts(model, seqs[b][:-1]), f"sequence {b}"
    # Routing was not trivial: some tokens skipped each MoD layer, and some were routed.
    n_tokens = torch.tensor([n + steps for n in lengths])
    assert (fills > 0).any() and (fills < n_tokens).all()


@pytest.mark.parametrize("device", DEVICES)
def test_dense_model_cache_matches_recompute(device):
    torch.manual_seed(0)
    cfg = dense_config(make_model().cfg)
    model = MoDTransformer(cfg).eval().to(device)
    idx, valid, prompts = left_padded([3, 7], device=device)
    cache = model.allocate_cache(2)
    logits = greedy_decode(model, idx, valid, 10, cache)
    assert_matches_recompute(model, logits, prompts)
    assert cache.drops.numel() == 0 and not any(isinstance(lc, MoDLayerCache) for lc in cache.layers)


def test_batched_recompute_with_left_padding_matches_single_sequences():
    model = make_model()
    idx, valid, prompts = left_padded([4, 12, 9])
    with torch.no_grad():
        logits = model(idx, routing="causal", valid=valid).logits
    for b, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(p[None], routing="causal").logits
        torch.testing.assert_close(logits[b, -len(p):], ref[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Skipped tokens are never attended to
# --------------------------------------------------------------------------------------

POISON = 1e3  # large but finite: masked scores stay -inf, masked weights stay exactly 0


def poison_unused_entries(cache):
    """Write POISON into every cache entry a token must not see: MoD slots at or past
    the fill count (the slot the next skipped token would have used, later slots and
    the scratch slot) and dense columns that hold no valid token (left padding and
    columns not written yet)."""
    for lc in cache.layers:
        if isinstance(lc, MoDLayerCache):
            unused = torch.arange(lc.k.shape[1], device=lc.k.device)[None, :] >= lc.fill[:, None]  # (B, L)
        else:
            unused = ~cache.key_valid
        lc.k[unused] = POISON
        lc.v[unused] = -POISON


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", DEVICES)
def test_skipped_tokens_are_never_attended(device, static):
    model = make_model(device=device)
    idx, valid, _ = left_padded([6, 2, 10], device=device)
    ref = greedy_decode(model, idx, valid, 20, model.allocate_cache(3, decode_capacity=3, static=static))
    cache = model.allocate_cache(3, decode_capacity=3, static=static)
    got = greedy_decode(model, idx, valid, 20, cache, before_step=poison_unused_entries)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Some token was skipped at some MoD layer after the prompt, so a poisoned slot was
    # there to be (wrongly) attended to.
    assert (cache.fill_counts() < 10 + 20).all()


def test_poisoning_a_filled_slot_changes_the_logits():
    """Positive control for the test above: the poison is visible when it is attended
    (every token routes here, so later tokens do read the poisoned slot)."""
    model = make_model(predictor_bias=20.0)
    idx, valid, _ = left_padded([6, 9])
    cache = model.allocate_cache(2, decode_capacity=2)
    base = greedy_decode(model, idx, valid, 3, cache)[-1]
    lc = cache.mod_layers[0]
    b = int(lc.fill.argmax())
    assert int(lc.fill[b]) > 0
    cache2 = model.allocate_cache(2, decode_capacity=2)

    def poison_first_slot(c):
        c.mod_layers[0].k[b, 0] = POISON
    poisoned = greedy_decode(model, idx, valid, 3, cache2, before_step=poison_first_slot)[-1]
    assert (poisoned[b] - base[b]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------
# Padding and dropping across the batch (decode capacity), cache-full drops
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_decode_capacity_keeps_the_highest_scores_and_counts_drops(static):
    model = make_model(predictor_bias=20.0)  # every token wants every MoD layer
    B, Dc = 5, 2
    idx, valid, _ = left_padded([3, 3, 3, 3, 3])
    cache = model.allocate_cache(B, decode_capacity=Dc, static=static)
    logits = model.prefill(idx, cache, valid)
    scores = {}
    hooks = [m.predictor.register_forward_hook(lambda mod, a, out, i=i: scores.__setitem__(i, out.detach()))
             for i, m in enumerate(model.mod_layers)]
    for _ in range(4):
        before = cache.fill_counts().clone()
        drops_before = cache.drops.clone()
        model.decode_step(logits.argmax(-1), cache)
        grew = cache.fill_counts() - before  # (n_mod, B): 1 where the token ran the block
        for i in range(len(model.mod_layers)):
            s = scores[i][:, 0]
            top = torch.zeros(B, dtype=torch.int64)
            top[torch.topk(s, Dc).indices] = 1
            assert torch.equal(grew[i], top), f"layer {i}: {grew[i]} vs top-{Dc} of {s}"
        assert torch.equal(cache.drops - drops_before, 1 - grew)  # everyone wanted; the rest dropped
    assert torch.equal(cache.overflow, cache.drops)  # the full recompute would have routed them all
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_unused_decode_slots_are_padding(static):
    """Fewer routed tokens than slots: padding slots write nothing and change nothing;
    the static path still runs every MoD block (on padding), the dynamic one skips it."""
    model = make_model(predictor_bias=-20.0)  # nothing wants a MoD layer
    idx, valid, prompts = left_padded([4, 7, 2])
    cache = model.allocate_cache(3, decode_capacity=3, static=static)
    calls = []
    for m in model.mod_layers:
        orig = m.block.forward_cached
        m.block.forward_cached = lambda *a, orig=orig: calls.append(1) or orig(*a)
    logits = greedy_decode(model, idx, valid, 6, cache)
    assert len(calls) == (6 * len(model.mod_layers) if static else 0)
    assert cache.fill_counts().sum() == 0 and cache.drops.sum() == 0
    assert_matches_recompute(model, logits, prompts)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_full_cache_drops_further_tokens(static):
    model = make_model(predictor_bias=20.0)
    idx, valid, _ = left_padded([9, 3])
    cache = model.allocate_cache(2, cache_capacity_factor=0.125, decode_capacity=2, static=static)  # 48 * 0.125 = 6 slots
    assert cache.slots == 6 and all(lc.limit == 6 for lc in cache.mod_layers)
    model.prefill(idx, cache, valid)
    assert cache.fill_counts().tolist() == [[6, 3], [6, 3]]
    assert cache.drops.tolist() == [[3, 0], [3, 0]]  # 9 wanted, 6 fit
    for _ in range(5):
        model.decode_step(torch.zeros(2, dtype=torch.int64), cache)
    assert cache.fill_counts().tolist() == [[6, 6], [6, 6]]
    assert cache.drops.tolist() == [[8, 2], [8, 2]]
    assert cache.drops_per_layer() == {1: 10, 3: 10}  # keyed by layer depth
    assert torch.equal(cache.overflow, cache.drops)  # the causal rule (12 per sequence) routes them all


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_causal_capacity_drops_are_not_overflow(static):
    """Tokens beyond the model's causal capacity K are dropped by the full recompute too:
    counted in drops, not in overflow, and the logits still equal the recompute."""
    model = make_model(predictor_bias=20.0)  # block_size 48, c = 0.25: K = 12
    idx, valid, prompts = left_padded([20, 5])
    cache = model.allocate_cache(2, decode_capacity=2, static=static)
    logits = greedy_decode(model, idx, valid, 10, cache)
    assert cache.fill_counts().tolist() == [[12, 12], [12, 12]]
    assert cache.drops.tolist() == [[18, 3], [18, 3]]  # 30 and 15 tokens wanted, 12 fit
    assert cache.overflow.sum() == 0
    assert_matches_recompute(model, logits, prompts)


def test_short_max_len_keeps_the_causal_capacity():
    """A cache shorter than block_size holds min(max_len, K) routed tokens by default, so
    it matches the full recompute; an explicit cache_capacity_factor may hold fewer."""
    model = make_model(predictor_bias=20.0)  # K = 12
    idx, valid, prompts = left_padded([14, 3])
    cache = model.allocate_cache(2, max_len=24, decode_capacity=2)
    assert cache.slots == 12 and model.allocate_cache(2, max_len=8).slots == 8
    logits = greedy_decode(model, idx, valid, 9, cache)
    assert cache.overflow.sum() == 0
    assert_matches_recompute(model, logits, prompts)
    small = model.allocate_cache(2, max_len=24, cache_capacity_factor=0.25, decode_capacity=2)  # 6 slots
    model.prefill(idx, small, valid)
    assert small.slots == 6 and small.overflow.tolist() == [[6, 0], [6, 0]]


def test_mod_layer_cache_is_a_fraction_of_a_dense_layer():
    model = make_model(block_size=256, capacity_factor=0.125)
    cache = model.allocate_cache(4)
    per_layer = cache.layer_bytes_per_seq()
    dense = [n for n, lc in zip(per_layer, cache.layers) if not isinstance(lc, MoDLayerCache)]
    mod = [n for n, lc in zip(per_layer, cache.layers) if isinstance(lc, MoDLayerCache)]
    assert dense and mod
    assert max(mod) <= 0.3 * min(dense)
    assert cache.slots == 32 and cache.bytes_per_seq() == sum(per_layer)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_bfloat16_decode_runs_and_tracks_recompute(static):
    """bf16 model and cache: finite logits that track the float32 recompute of the same
    bf16 weights to bf16 precision at the prefill (routing may flip between dtypes later)."""
    model = make_model(dtype=torch.bfloat16)
    idx, valid, prompts = left_padded([4, 9])
    cache = model.allocate_cache(2, decode_capacity=2, static=static)
    assert cache.layers[0].k.dtype == torch.bfloat16
    logits = greedy_decode(model, idx, valid, 12, cache)
    assert all(torch.isfinite(lg.float()).all() for lg in logits)
    ref = make_model(dtype=torch.bfloat16).float()
    for b in range(2):
        torch.testing.assert_close(logits[0][b].float(), recompute_last_logits(ref, prompts[b]), rtol=2e-2, atol=1e-2)


def test_default_decode_capacity():
    assert default_decode_capacity(64, 0.125) == 16
    assert default_decode_capacity(8, 0.125) == 4
    assert default_decode_capacity(1, 0.125) == 1
    assert default_decode_capacity(3, 1.0) == 3
    with pytest.raises(ValueError, match="batch"):
        default_decode_capacity(0, 0.125)


# --------------------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", DEVICES)
def test_generate_with_cache_equals_recompute(device, static):
    model = make_model(device=device)
    idx, valid, _ = left_padded([5, 12, 1], device=device)
    a = model.generate(idx, 25, temperature=0, valid=valid, decode_capacity=3, static=static)
    b = model.generate(idx, 25, temperature=0, valid=valid, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape == (3, 12 + 25) and torch.equal(a[:, :12], idx)
    # Sampling with temperature and top-k draws the same tokens from the same generator.
    a = model.generate(idx, 25, temperature=0.9, top_k=8, valid=valid, decode_capacity=3, static=static,
                       generator=torch.Generator(device).manual_seed(3))
    b = model.generate(idx, 25, temperature=0.9, top_k=8, valid=valid, use_cache=False,
                       generator=torch.Generator(device).manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_one_is_greedy():
    model = make_model()
    idx, valid, _ = left_padded([4, 6])
    a = model.generate(idx, 12, temperature=1.5, top_k=1, valid=valid, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 12, temperature=0, valid=valid)
    assert torch.equal(a, b)


def test_stop_tokens_end_sequences_and_stop_their_routing():
    model = make_model()
    idx, valid, _ = left_padded([5, 8])
    free = model.generate(idx, 20, temperature=0, valid=valid)
    stop = int(free[0, 8 + 3])  # the 4th token sequence 0 generates
    out = model.generate(idx, 20, temperature=0, valid=valid, stop_tokens=[stop], pad_token=V - 1)
    for b in range(2):
        gen = free[b, 8:]
        hits = (gen == stop).nonzero()
        if len(hits) == 0:
            assert torch.equal(out[b], free[b])
            continue
        first = int(hits[0])
        assert torch.equal(out[b, :8 + first + 1], free[b, :8 + first + 1])
        assert (out[b, 8 + first + 1:] == V - 1).all()
    # Sequence 0 stopped when it generated the stop token (its token number first0): from
    # then on it routed nothing and dropped nothing, so its MoD caches hold what they held
    # after the first0 tokens before it were fed.
    first0 = int((free[0, 8:] == stop).nonzero()[0])
    out2, cache = model.generate(idx, 20, temperature=0, valid=valid, stop_tokens=[stop], pad_token=V - 1,
                                 return_cache=True)
    assert torch.equal(out2, out)
    assert not bool(cache.active[0])
    ref = model.allocate_cache(2)
    greedy_decode(model, idx, valid, first0, ref)
    assert torch.equal(cache.fill_counts()[:, 0], ref.fill_counts()[:, 0])
    assert torch.equal(cache.drops[:, 0], ref.drops[:, 0])


def test_generate_zero_new_tokens_returns_prompt():
    model = make_model()
    idx = torch.randint(0, V, (2, 5))
    tokens, cache = model.generate(idx, 2, return_cache=True)
    assert tokens.shape == (2, 7) and isinstance(cache, generation.MoDKVCache) and cache.n_written == 6
    out = model.generate(idx, 0)
    assert torch.equal(out, idx) and out.data_ptr() != idx.data_ptr()  # a copy, never the caller's tensor
    zero = model.generate(idx, 0, return_cache=True)
    assert torch.equal(zero.tokens, idx) and zero.cache is None
    assert model.generate(idx, 3, use_cache=False, return_cache=True).cache is None
    # The model keeps nothing from a generate call (the cache is returned, not stashed).
    assert not any(isinstance(v, generation.MoDKVCache) for v in vars(model).values())


def test_generate_argument_forms():
    import numpy as np

    model = make_model()
    idx, valid, _ = left_padded([3, 6])
    ref = model.generate(idx, 8, temperature=0, valid=valid)
    stop = int(ref[0, 6 + 2])
    a = model.generate(idx, np.int64(8), temperature=0, valid=valid, stop_tokens=stop, pad_token=np.int64(1))
    b = model.generate(idx, 8, temperature=0, valid=valid, stop_tokens=[stop], pad_token=1)
    c = model.generate(idx, 8, temperature=0, valid=valid, stop_tokens=torch.tensor([stop]), pad_token=1)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(model.generate(idx, 8, temperature=0, valid=valid, stop_tokens=[]), ref)
    # A tiny temperature is greedy, not NaN.
    tiny = model.generate(idx, 8, temperature=1e-45, valid=valid, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny, ref)
    assert model.generate(idx, 3, temperature=float("inf"), top_k=np.int64(4), valid=valid).shape == (2, 9)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_errors():
    model = make_model()
    idx = torch.randint(0, V, (2, 5))
    cache = model.allocate_cache(2, max_len=6)
    with pytest.raises(ValueError, match="prefill"):
        model.decode_step(torch.zeros(2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match=r"tokens must be an int64 tensor of shape \(B,\) = \(2,\)"):
        model.decode_step(torch.zeros(3, dtype=torch.int64), cache)
    model.prefill(idx, cache)
    model.decode_step(torch.zeros(2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="full"):
        model.decode_step(torch.zeros(2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="batch"):
        model.prefill(torch.randint(0, V, (3, 5)), cache)
    with pytest.raises(ValueError, match="max_len"):
        model.prefill(torch.randint(0, V, (2, 7)), cache)
    with pytest.raises(ValueError, match="max_len"):
        model.allocate_cache(2, max_len=49)
    stale = model.allocate_cache(2)
    with pytest.raises(ValueError, match="allocate a new cache"):
        make_model(dtype=torch.float64).prefill(idx, stale)
    with pytest.raises(ValueError, match="decode_capacity"):
        model.allocate_cache(2, decode_capacity=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        model.allocate_cache(2, cache_capacity_factor=0.0)
    with pytest.raises(ValueError, match=r"cache_capacity_factor must be in \(0, 1\]"):
        model.allocate_cache(2, cache_capacity_factor=1.5)
    assert model.allocate_cache(2, cache_capacity_factor=0.5).slots == 12  # 24, but K = 12 is all that can fill
    with pytest.raises(ValueError, match="static must be True, False or None"):
        model.allocate_cache(2, static="no")
    with pytest.raises(ValueError, match="pass stop_tokens too"):
        model.generate(idx, 3, pad_token=1)
    with pytest.raises(ValueError, match="^generate: valid"):
        model.generate(idx, 3, valid=torch.ones(2, 4, dtype=torch.bool))
    right_padded = torch.tensor([[True] * 4 + [False], [True] * 5])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(idx, 3, valid=right_padded)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(idx, 45)  # 5 + 45 - 1 > 48
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(idx, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(idx, 3, routing="topk")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="pad_token"):
        model.generate(idx, 3, stop_tokens=[1], pad_token=-1)
    with pytest.raises(ValueError, match="pad_token"):
        model.generate(idx, 3, stop_tokens=[1], pad_token=V)
    with pytest.raises(ValueError, match="stop_tokens"):
        model.generate(idx, 3, stop_tokens=[V + 3])
    with pytest.raises(ValueError, match="stop_tokens"):
        model.generate(idx, 3, stop_tokens=["a"])
    with pytest.raises(ValueError, match=r"idx holds token ids outside \[0, vocab_size = 64\)"):
        model.generate(idx + V, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, 2.5)
    with pytest.raises(ValueError, match="max_len, static: cache options, valid only with use_cache=True"):
        model.generate(idx, 3, use_cache=False, max_len=20, static=True)
    c = model.allocate_cache(2)
    model.prefill(idx, c)
    with pytest.raises(ValueError, match="tokens holds token ids outside"):
        model.decode_step(torch.full((2,), V), c)
    with pytest.raises(ValueError, match="idx holds token ids outside"):
        model.prefill(idx - 1 - idx.max(), c)
    assert c.n_written == 5  # a rejected prefill leaves the cache as it was
    with pytest.raises(ValueError, match="allocate a new cache"):
        make_model(d_model=16).decode_step(torch.zeros(2, dtype=torch.int64), c)
    assert model.generate(idx, 45, use_cache=False).shape == (2, 50)  # recompute crops the context


# --------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# --------------------------------------------------------------------------------------


def test_decode_step_compiles_without_graph_breaks():
    """torch.compile(model.decode_step, fullgraph=True) on a static cache (as the README
    says) gives the eager logits and keeps the host-side column count right."""
    model = make_model()
    idx, valid, _ = left_padded([4, 9])
    eager_cache = model.allocate_cache(2, decode_capacity=1, static=True)
    compiled_cache = model.allocate_cache(2, decode_capacity=1, static=True)
    step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
    a, b = model.prefill(idx, eager_cache, valid), model.prefill(idx, compiled_cache, valid)
    for _ in range(3):
        a = model.decode_step(a.argmax(-1), eager_cache)
        b = step(b.argmax(-1), compiled_cache)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert torch.equal(eager_cache.fill_counts(), compiled_cache.fill_counts())
    assert torch.equal(eager_cache.drops, compiled_cache.drops)
    assert compiled_cache.n_written == eager_cache.n_written == 9 + 3


@requires_cuda
def test_cuda_decode_step_does_not_sync():
    model = make_model(device="cuda")
    idx, valid, _ = left_padded([4, 9], device="cuda")
    cache = model.allocate_cache(2, decode_capacity=1)
    logits = model.prefill(idx, cache, valid)
    nxt = logits.argmax(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            nxt = model.decode_step(nxt, cache).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_graph_replay_equals_eager(dtype):
    model = make_model(device="cuda", dtype=dtype)
    idx, valid, _ = left_padded([5, 12, 1, 7], device="cuda")
    eager, eager_cache = model.generate(idx, 30, temperature=0, valid=valid, decode_capacity=2, return_cache=True)
    graphed, graph_cache = model.generate(idx, 30, temperature=0, valid=valid, decode_capacity=2, cuda_graph=True,
                                          return_cache=True)
    assert torch.equal(graphed, eager)
    assert torch.equal(graph_cache.drops, eager_cache.drops)
    again = model.generate(idx, 30, temperature=0, valid=valid, decode_capacity=2, cuda_graph=True)
    assert torch.equal(again, eager) and len(generation._decode_graphs[model]) == 1  # captured once, replayed
    generation.clear_decode_graphs(model)
    assert model not in generation._decode_graphs


# --------------------------------------------------------------------------------------
# Property: static == dynamic path, and the cache == the recompute while nothing overflows
# --------------------------------------------------------------------------------------

@st.composite
def decode_cases(draw):
    B = draw(st.integers(1, 4))
    return dict(
        lengths=draw(st.lists(st.integers(1, 10), min_size=B, max_size=B)),
        decode_capacity=draw(st.integers(1, B)),
        cache_capacity_factor=draw(st.sampled_from([None, 0.1, 0.25])),
        predictor_bias=draw(st.sampled_from([-1.0, 0.0, 1.0, 20.0])),
        causal_router=draw(st.sampled_from(["predictor", "router"])),
        steps=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 3)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=decode_cases())
def test_property_static_equals_dynamic_and_recompute_without_overflow(case):
    """float64, so the two paths' different matmul shapes cannot flip a greedy token."""
    model = make_model(seed=case["seed"], predictor_bias=case["predictor_bias"],
                       causal_router=case["causal_router"], dtype=torch.float64)
    idx, valid, prompts = left_padded(case["lengths"], seed=case["seed"])
    runs = {}
    for static in (True, False):
        cache = model.allocate_cache(len(prompts), decode_capacity=case["decode_capacity"],
                                     cache_capacity_factor=case["cache_capacity_factor"], static=static)
        runs[static] = (greedy_decode(model, idx, valid, case["steps"], cache), cache)
    (ls, cs), (ld, cd) = runs[True], runs[False]
    for a, b in zip(ls, ld):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for name in ("drops", "overflow"):
        assert torch.equal(getattr(cs, name), getattr(cd, name)), name
    assert torch.equal(cs.fill_counts(), cd.fill_counts())
    assert (cs.drops >= cs.overflow).all() and (cs.overflow >= 0).all()
    if int(cs.overflow.sum()) == 0:
        assert_matches_recompute(model, ls, prompts, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------
# sample_next: top-k holds at every temperature
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [float("inf"), 1e30, 1e6, 1.0], ids=["inf", "1e30", "1e6", "1"])
def test_top_k_holds_at_every_temperature(temperature):
    """Only the top_k tokens can ever be sampled; at temperature inf (and, in effect,
    huge finite ones) the draw is uniform among them."""
    g = torch.Generator().manual_seed(0)
    B, Vs, k, n = 4, 50, 5, 4000
    logits = torch.randn(B, Vs, generator=g) * 3
    logits[1, 7] = float("-inf")  # a forbidden token stays forbidden
    top = torch.topk(logits, k, dim=-1).indices
    draws = torch.stack([sample_next(logits, temperature, k, g) for _ in range(n)])  # (n, B)
    for b in range(B):
        seen = set(draws[:, b].tolist())
        assert seen <= set(top[b].tolist()), f"row {b}: sampled {sorted(seen - set(top[b].tolist()))} outside the top-{k}"
        if temperature >= 1e6:  # uniform among the top-k
            counts = torch.bincount(draws[:, b], minlength=Vs)[top[b]].float()
            assert counts.min() > 0.7 * n / k and counts.max() < 1.3 * n / k, counts


def test_temperature_inf_without_top_k_is_uniform_over_allowed_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([[0.0, 5.0, float("-inf"), -5.0]])
    draws = torch.stack([sample_next(logits, float("inf"), None, g) for _ in range(3000)])[:, 0]
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == 0 and counts[[0, 1, 3]].min() > 800, counts


def test_generation_leaves_no_state_on_the_model():
    model = make_model()
    before = set(vars(model))
    idx, valid, _ = left_padded([3, 6])
    model.generate(idx, 5, valid=valid, return_cache=True)
    model.generate(idx, 3, valid=valid, use_cache=False)
    assert set(vars(model)) == before
    assert not hasattr(model, "last_decode_cache") and not hasattr(model, "_decode_graphs")
