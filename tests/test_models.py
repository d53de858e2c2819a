"""Tests of the reference MoD transformer (mod_ext.models)."""

import copy
import math

import pytest
import torch

import mod_ext
from mod_ext.models import Block, ModelConfig, MoDTransformer, MoDTransformerOutput, apply_rotary, dense_config


def tiny_cfg(**kw):
    base = dict(vocab_size=64, block_size=32, n_layer=4, n_head=2, d_model=32, capacity_factor=0.25)
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoDTransformer(tiny_cfg(**kw))


# --------------------------------------------------------------------------------------
# (a) causal routing is causal
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal_router", ["predictor", "router"])
def test_causal_mode_logits_ignore_future_tokens(causal_router):
    model = make_model(causal_router=causal_router).eval()
    # Larger scores make a mixture of routed (> 0) and skipped (< 0) tokens.
    with torch.no_grad():
        for m in model.mod_layers:
            m.router_weight.mul_(30.0)
            if m.predictor is not None:
                m.predictor.net[2].weight.mul_(30.0)
    B, T = 3, 32
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (B, T), generator=g)
    with torch.no_grad():
        ref, _, _, _, layer_outs = model(idx, routing="causal", return_routing=True)
        outs = [o.routing for o in layer_outs]
        # the test has power only if rows really route some tokens and skip others
        routed = torch.stack([o.slot_mask.sum(1) for o in outs])  # (n_mod, B)
        assert (routed > 0).all() and (routed < T).all()
        for t in (0, 5, 13, 20, 31):
            changed = idx.clone()
            changed[:, t + 1:] = torch.randint(0, 64, (B, T - t - 1), generator=g)
            logits = model(changed, routing="causal").logits
            torch.testing.assert_close(logits[:, : t + 1], ref[:, : t + 1], rtol=1e-5, atol=1e-5)
        # sanity: top-k routing does look ahead, so the same probe detects a leak there
        ref_topk = model(idx, routing="topk").logits
        changed = idx.clone()
        changed[:, 16:] = torch.randint(0, 64, (B, T - 16), generator=g)
        leak = model(changed, routing="topk").logits
        assert not torch.allclose(leak[:, :16], ref_topk[:, :16], atol=1e-5)


def test_generate_causal_crops_to_block_size():
    model = make_model().eval()
    idx = torch.randint(0, 64, (2, 5))
    out = model.generate(idx, 40, top_k=10, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert out.shape == (2, 45) and out.dtype == torch.int64
    assert torch.equal(out[:, :5], idx)


# --------------------------------------------------------------------------------------
# (b) rotary embeddings use the true positions
# --------------------------------------------------------------------------------------


def reference_attention(attn, x, positions, slot_mask):
    """Attention written out with complex rotations and explicit masking."""
    B, T, D = x.shape
    nh, hs = attn.n_head, D // attn.n_head
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2).double() for t in attn.qkv(x).split(D, dim=2))
    inv_freq = 1.0 / (attn.rotary.base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    rot = torch.polar(torch.ones(B, 1, T, hs // 2, dtype=torch.float64),
                      positions.double()[:, None, :, None] * inv_freq)  # e^{i p theta}

    def rotate(t):  # pairs (j, j + hs/2) as complex numbers
        c = torch.complex(t[..., : hs // 2], t[..., hs // 2:]) * rot
        return torch.cat([c.real, c.imag], dim=-1)

    q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (slot_mask[:, None, None, :] | torch.eye(T, dtype=torch.bool))
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = (scores.softmax(-1) @ v.double()).transpose(1, 2).reshape(B, T, D)
    return attn.proj(y.float())


def test_attention_matches_manual_rotary_reference():
    torch.manual_seed(0)
    cfg = tiny_cfg(block_size=64)
    block = Block(cfg)
    x = torch.randn(2, 6, cfg.d_model)
    positions = torch.tensor([[0, 3, 4, 17, 40, 63], [2, 5, 9, 10, 11, 50]])
    slot_mask = torch.tensor([[True, True, False, True, True, True], [False, True, True, True, False, True]])
    with torch.no_grad():
        got = block.attn(x, positions, slot_mask)
        want = reference_attention(block.attn, x, positions, slot_mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_block_depends_on_relative_true_positions():
    torch.manual_seed(0)
    block = Block(tiny_cfg(block_size=64))
    x = torch.randn(2, 5, 32)
    pos = torch.tensor([[1, 4, 9, 20, 30]]).expand(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = block(x, pos, mask)
        shifted = block(x, pos + 7, mask)  # rotary is relative: a common shift changes nothing
        compressed = block(x, torch.arange(5).expand(2, 5), mask)  # positions 0..C-1: a different answer
    torch.testing.assert_close(shifted, out, rtol=1e-4, atol=1e-5)
    assert (compressed[:, 1:] - out[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(compressed[:, 0], out[:, 0])  # the first token attends to itself only


def test_mod_layers_pass_true_positions_to_the_block():
    model = make_model()
    seen = []
    for m in model.mod_layers:
        m.block.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    idx = torch.randint(0, 64, (3, 32))
    with torch.no_grad():
        outs = model(idx, return_routing=True).mod_layer_outputs
    for pos, o in zip(seen, outs):
        assert torch.equal(pos, o.routing.indices)
        assert (pos.diff(dim=1) > 0).all()
    assert any(not torch.equal(p, torch.arange(p.shape[1]).expand_as(p)) for p in seen)


def test_apply_rotary_preserves_norm():
    x = torch.randn(2, 3, 4, 8)
    angles = torch.rand(2, 1, 4, 4) * 10
    y = apply_rotary(x, angles.cos(), angles.sin())
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


# --------------------------------------------------------------------------------------
# (c) the dense baseline
# --------------------------------------------------------------------------------------


def test_dense_baseline_has_no_mod_blocks_and_more_flops():
    mod = make_model()
    dense = MoDTransformer(dense_config(mod.cfg))
    assert mod.mod_layer_ids == [1, 3]
    assert dense.mod_layers == [] and not any(isinstance(m, mod_ext.MoDBlock) for m in dense.modules())
    assert MoDTransformer(tiny_cfg(mod_every=None)).mod_layers == []
    for T in (8, 32):
        assert dense.flops_per_token(T) > mod.flops_per_token(T) > 0
    # dense layers: 2 * (4 D^2 + 3 D H) + 2 D (T + 1) each, plus the lm head 2 D V
    D, H, V, T = 32, mod.cfg.mlp_hidden, 64, 32
    want = 4 * (2 * (4 * D * D + 3 * D * H) + 2 * D * (T + 1)) + 2 * D * V
    assert dense.flops_per_token(T) == pytest.approx(want)
    idx = torch.randint(0, 64, (2, 16))
    out = dense(idx, idx)
    assert out.logits.shape == (2, 16, 64) and torch.isfinite(out.loss) and out.aux_loss is None
    assert torch.equal(out.loss, out.lm_loss)


# --------------------------------------------------------------------------------------
# (d) training step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal_router", ["predictor", "router"])
def test_training_step_is_finite_and_reaches_routers(causal_router):
    model = make_model(causal_router=causal_router)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 32))
    out = model(idx[:, :-1], idx[:, 1:])
    loss = out.loss
    assert torch.isfinite(loss) and out.aux_loss is not None
    # loss = lm_loss + aux_loss_weight * aux_loss: what the training loop backprops
    torch.testing.assert_close(loss, out.lm_loss + model.cfg.aux_loss_weight * out.aux_loss)
    torch.testing.assert_close(out.lm_loss, torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64),
                                                                              idx[:, 1:].reshape(-1)))
    loss.backward()
    for m in model.mod_layers:
        for name, p in [("router_weight", m.router_weight)] + list(m.block.named_parameters()):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        if m.predictor is not None:
            assert all(p.grad.abs().sum() > 0 for p in m.predictor.parameters())
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(idx[:, :-1], idx[:, 1:]).loss)


def test_predictor_loss_does_not_change_lm_gradients():
    idx = torch.randint(0, 64, (2, 32))
    grads = []
    for w in (0.0, 10.0):
        model = make_model(aux_loss_weight=w)
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "predictor" not in n})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


# --------------------------------------------------------------------------------------
# (e) padding slots are ignored
# --------------------------------------------------------------------------------------


def test_padding_slots_do_not_change_routed_outputs():
    torch.manual_seed(0)
    block = Block(tiny_cfg())
    B, C, D = 2, 7, 32
    x = torch.randn(B, C, D)
    positions = torch.tensor([[0, 2, 3, 8, 9, 20, 31], [1, 4, 5, 6, 7, 12, 13]])
    slot_mask = torch.tensor([[False, True, True, False, True, True, False],
                              [True, False, True, True, True, False, True]])
    extreme = x.clone()
    extreme[~slot_mask] = 1e4 * torch.randn(int((~slot_mask).sum()), D)
    with torch.no_grad():
        out = block(x, positions, slot_mask)
        out_extreme = block(extreme, positions, slot_mask)
        unmasked = block(extreme, positions, torch.ones_like(slot_mask))
    assert torch.isfinite(out).all() and torch.isfinite(out_extreme).all()  # padding rows too (eye)
    torch.testing.assert_close(out_extreme[slot_mask], out[slot_mask])
    # sanity: without the slot mask the extreme keys do leak into the routed outputs
    assert (unmasked[slot_mask] - out[slot_mask]).abs().max() > 1e-3


def test_causal_mode_with_padding_slots_through_mod_block():
    """Few tokens routed: the padding slots leave the residual stream untouched."""
    model = make_model().eval()
    for m in model.mod_layers:
        with torch.no_grad():
            m.predictor.net[2].bias.fill_(-1e3)  # the predictor routes nothing
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        logits, _, _, _, outs = model(idx, routing="causal", return_routing=True)
        assert torch.isfinite(logits).all()
        assert all(not o.routing.slot_mask.any() for o in outs)
        # with no token routed, the MoD layers are the identity: equal to skipping them
        x = model.wte(idx)
        pos = torch.arange(32).expand(2, 32)
        for layer in model.layers:
            if not isinstance(layer, mod_ext.MoDBlock):
                x = x + layer(x, pos)
        torch.testing.assert_close(logits, model.lm_head(model.norm_f(x)))


# --------------------------------------------------------------------------------------
# (f) the model returns its losses, keeps no state, and is a well-behaved nn.Module
# --------------------------------------------------------------------------------------


def test_forward_returns_losses_and_routing_info():
    model = make_model()
    idx = torch.randint(0, 64, (2, 32))
    out = model(idx[:, :-1], idx[:, 1:])
    assert isinstance(out, MoDTransformerOutput) and out.mod_layer_outputs is None
    aux = sum(o.aux_loss for o in model(idx[:, :-1], return_routing=True).mod_layer_outputs)
    torch.testing.assert_close(out.aux_loss, aux)
    no_targets = model(idx)
    assert no_targets.loss is None and no_targets.lm_loss is None and no_targets.aux_loss is not None
    causal = model(idx[:, :-1], idx[:, 1:], routing="causal")
    assert causal.aux_loss is None and torch.equal(causal.loss, causal.lm_loss)
    zero = make_model(aux_loss_weight=0.0)(idx[:, :-1], idx[:, 1:])
    assert torch.equal(zero.loss, zero.lm_loss) and zero.aux_loss is not None
    routed = model(idx, return_routing=True).mod_layer_outputs
    assert len(routed) == len(model.mod_layers) and all(o.routing.indices.shape == (2, 8) for o in routed)


def test_deepcopy_after_training_forward():
    """The model keeps no tensors from a forward (nothing stashed on modules), so a
    deepcopy after a training step works and gives the same model."""
    model = make_model()
    idx = torch.randint(0, 64, (2, 32))
    out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    twin = copy.deepcopy(model)
    for m in model.modules():
        assert not any(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in vars(m).values()), m
    with torch.no_grad():
        torch.testing.assert_close(twin(idx).logits, model(idx).logits, rtol=0, atol=0)
    fresh = MoDTransformer(model.cfg)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx, routing="causal").logits, model(idx, routing="causal").logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_eager_forward_identical_in_grad_and_no_grad_mode(routing):
    """Under no_grad the MoD layers update the model's own residual stream in place;
    the logits are bit-identical to the grad-mode forward and the caller's tensors are
    untouched."""
    model = make_model()
    idx, valid = torch.randint(0, 64, (3, 32)), torch.ones(3, 32, dtype=torch.bool)
    valid[0, :5] = False
    idx0, valid0 = idx.clone(), valid.clone()
    ref = model(idx, valid=valid, routing=routing).logits
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            got = model(idx, valid=valid, routing=routing).logits
        assert torch.equal(got, ref.detach()), ctx.__name__
    assert torch.equal(idx, idx0) and torch.equal(valid, valid0)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_over_the_model(use_reentrant):
    """Checkpointing the whole model forward gives the gradients of the plain forward
    (reentrant checkpointing runs the first forward under no_grad, where the MoD layers
    update the model's own residual stream in place)."""
    idx = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointed in (False, True):
        model = make_model(seed=3)
        anchor = torch.zeros((), requires_grad=True)  # reentrant checkpointing needs an input that requires grad

        def loss_fn(idx, anchor):
            return model(idx[:, :-1], idx[:, 1:]).loss + 0 * anchor

        if checkpointed:
            loss = torch.utils.checkpoint.checkpoint(loss_fn, idx, anchor, use_reentrant=use_reentrant)
        else:
            loss = loss_fn(idx, anchor)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(float(g.abs().sum()) > 0 for n, g in grads[0].items() if "router_weight" in n)


def test_compiled_forward_matches_eager():
    """torch.compile(fullgraph=True) of the model's training forward (the vocabulary
    check is skipped while compiling: it would be a host sync)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = make_model()
    idx = torch.randint(0, 64, (2, 33))
    cmodel = torch.compile(model, fullgraph=True, backend="aot_eager")
    e = model(idx[:, :-1], idx[:, 1:])
    c = cmodel(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(c.logits, e.logits)
    torch.testing.assert_close(c.loss, e.loss)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# (g) errors name the argument
# --------------------------------------------------------------------------------------


def test_forward_bad_inputs():
    model = make_model()
    idx = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) int64 tensor"):
        model(idx[0])
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) int64 tensor"):
        model(idx.float())
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) int64 tensor"):
        model(idx.tolist())
    with pytest.raises(ValueError, match=r"idx holds token ids outside \[0, vocab_size = 64\)"):
        model(idx + 64)
    with pytest.raises(ValueError, match=r"idx holds token ids outside"):
        model(idx - 100)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"targets must be an int64 tensor of shape \(B, T\)"):
        model(idx, idx[:, :-1])
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        model(idx, valid=[[True] * 8] * 2)
    with pytest.raises(ValueError, match="routing must be 'topk' or 'causal'"):
        model(idx, routing="threshold")


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("block_size", 0), ("block_size", -1), ("block_size", 8.0), ("n_layer", 0),
    ("n_head", 0), ("d_model", 0), ("mlp_hidden", 0), ("capacity_factor", 0), ("capacity_factor", -0.5),
    ("capacity_factor", 1.5), ("capacity_factor", float("nan")), ("capacity_factor", "0.1"), ("mod_every", -1),
    ("mod_every", 1.5), ("router_activation", "relu"), ("causal_router", "oracle"), ("aux_loss_weight", -1.0),
    ("aux_loss_weight", float("inf")), ("predictor_hidden", 0), ("rope_base", 0.0), ("block_size", True),
])
def test_model_config_rejects_nonsense(field, value):
    with pytest.raises(ValueError, match=f"ModelConfig: {field}"):
        tiny_cfg(**{field: value})


def test_model_config_valid_edges():
    assert tiny_cfg(capacity_factor=1.0, mod_every=0).mod_every == 0
    assert tiny_cfg(mod_every=None, aux_loss_weight=0).aux_loss_weight == 0
    with pytest.raises(ValueError, match="MoDTransformer: cfg must be a ModelConfig"):
        MoDTransformer(dict(vocab_size=8))


def test_out_of_vocabulary_targets_name_the_argument():
    model = make_model()
    idx = torch.randint(0, 64, (2, 8))
    for bad in (64, -1, 300):
        targets = idx.clone()
        targets[1, 3] = bad
        with pytest.raises(ValueError, match=rf"targets must be token ids in \[0, vocab_size = 64\) or -100 .* got {bad}"):
            model(idx, targets)
    targets = idx.clone()
    targets[0, :2] = -100  # ignored positions stay allowed
    assert torch.isfinite(model(idx, targets).loss)
