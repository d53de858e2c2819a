"""The MoD layer (mod_ext.layer) against a plain-PyTorch implementation of the whole
layer, plus capacity_for, router_aux_loss, routing_metrics, MoDPredictor and MoDBlock."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mod_ext
from mod_ext import reference as R
from tests.helpers import (
    DEVICES,
    assert_bitwise_equal,
    assert_close,
    assert_routing_equal,
    dtype_id,
    gen,
)

T, F_ = True, False


# --------------------------------------------------------------------------------------
# A plain-PyTorch MoD layer (MOD_SPEC section 1) built on the reference ops
# --------------------------------------------------------------------------------------


def mod_block_ref(
    x,
    router_weight,
    block_fn,
    *,
    capacity,
    router_bias=None,
    valid=None,
    router_activation="sigmoid",
    routing="topk",
    scores=None,
):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = torch.matmul(x.to(acc), router_weight.to(acc))  # (B, S) in float32
    if router_bias is not None:
        logits = logits + router_bias.to(acc).reshape(())
    if routing == "topk":
        idx, mask = R.topk_route_ref(logits.detach().float(), capacity, valid)
    else:
        src = logits if scores is None else scores
        idx, mask = R.threshold_route_ref(src.detach().float(), capacity, valid)
    z = logits.gather(1, idx)
    r = torch.sigmoid(z) if router_activation == "sigmoid" else z
    r = torch.where(mask, r, torch.zeros_like(r))  # padding slots: weight 0
    x_sel = R.gather_tokens_ref(x, idx)
    f = block_fn(x_sel, idx, mask).to(x.dtype)
    out = R.scatter_add_weighted_ref(x, f, idx, r)
    # Tokens that are not routed (padding slots included) are x, bit for bit.
    routed = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, idx, mask)
    out = torch.where(routed.unsqueeze(-1), out, x)
    return out, logits, idx, mask, r


class ToyBlock(nn.Module):
    """Causal attention over the routed slots with a bias by *true* position distance,
    keys masked by slot_mask, then an MLP: the update f only (no residual)."""

    def __init__(self, d, dtype=torch.float32, seed=0):
        super().__init__()
        g = gen(seed)
        self.q = nn.Parameter((torch.randn(d, d, generator=g) / math.sqrt(d)).to(dtype))
        self.v = nn.Parameter((torch.randn(d, d, generator=g) / math.sqrt(d)).to(dtype))
        self.mlp = nn.Parameter((torch.randn(d, d, generator=g) / math.sqrt(d)).to(dtype))
        self.b = nn.Parameter((torch.randn(d, generator=g) * 0.1).to(dtype))

    def forward(self, xs, positions, slot_mask):
        B, C, D = xs.shape
        q = xs @ self.q
        att = (q @ xs.transpose(1, 2)).float() / math.sqrt(D)
        dist = (positions[:, :, None] - positions[:, None, :]).abs().float()
        att = att - 0.05 * dist
        causal = torch.ones(C, C, dtype=torch.bool, device=xs.device).tril()
        keep = (causal & slot_mask[:, None, :]) | torch.eye(C, dtype=torch.bool, device=xs.device)
        att = att.masked_fill(~keep, float("-inf"))
        h = torch.softmax(att, dim=-1).to(xs.dtype) @ (xs @ self.v)
        return torch.tanh(h @ self.mlp + self.b)


def _inputs(B, S, D, dtype, device, seed):
    g = gen(seed)
    x = torch.randn(B, S, D, generator=g).to(dtype).to(device)
    rw = (torch.randn(D, generator=g) / math.sqrt(D)).to(dtype).to(device)
    rb = torch.tensor(0.1).to(dtype).to(device)
    valid = (torch.rand(B, S, generator=g) < 0.75).to(device)
    if B > 1:
        valid[1, :] = False
        valid[1, :2] = True  # fewer valid tokens than capacity: padding
    gout = torch.randn(B, S, D, generator=g).to(device)
    scores = torch.randn(B, S, generator=g).to(device)
    return x, rw, rb, valid, gout, scores


LAYER_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_valid", [False, True], ids=["no_valid", "valid"])
@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
@pytest.mark.parametrize("routing", ["topk", "threshold", "threshold_scores"])
@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=dtype_id)
def test_mod_block_matches_reference(dtype, routing, activation, use_valid, device):
    B, S, D, C = 3, 24, 16, 6
    x0, rw0, rb0, valid, gout, scores = _inputs(B, S, D, dtype, device, seed=5)
    valid = valid if use_valid else None
    route = "threshold" if routing.startswith("threshold") else "topk"
    sc = scores if routing == "threshold_scores" else None
    block = ToyBlock(D, dtype).to(device)
    block_ref = ToyBlock(D, dtype).to(device)
    block_ref.load_state_dict(block.state_dict())

    def run(fn, blk):
        x, rw, rb = (t.clone().requires_grad_() for t in (x0, rw0, rb0))
        res = fn(
            x, rw, blk, capacity=C, router_bias=rb, valid=valid, router_activation=activation,
            routing=route, scores=sc,
        )
        out = res[0]
        loss = (out.float() * gout).sum()
        grads = torch.autograd.grad(loss, (x, rw, rb, *blk.parameters()))
        return res, grads

    (out, logits, idx, mask, r), grads = run(mod_ext.mod_block, block)
    (eout, elogits, eidx, emask, er), egrads = run(mod_block_ref, block_ref)
    ctx = f"mod_block {routing} {activation} valid={use_valid} {dtype}"

    assert logits.dtype == torch.float32
    assert_routing_equal((idx, mask), (eidx, emask), ctx + " routing")
    assert_bitwise_equal(logits, elogits, ctx + " router_logits")
    assert_bitwise_equal(r, er, ctx + " router_weights")
    assert_bitwise_equal(out, eout, ctx + " output")
    # router logits really are x @ w + b in float32
    indep = (x0.double() * rw0.double()).sum(-1) + rb0.double()
    assert_close(logits.double(), indep, ctx + " logits vs float64", dtype=torch.float32, scale=10)
    # padding slots have router weight 0; valid slots act(z)
    assert bool((r[~mask] == 0).all()), ctx
    if use_valid:
        assert not bool(mask[1, 2:].any()) and bool(mask[1, :2].any() or route == "threshold"), ctx

    names = ["x", "router_weight", "router_bias"] + [n for n, _ in block.named_parameters()]
    for name, a, e in zip(names, grads, egrads):
        assert_close(a, e, f"{ctx} grad {name}", dtype=dtype if dtype != torch.float32 else torch.float32, scale=10)
    # the router is on the gradient path through r * f
    assert float(grads[1].abs().sum()) > 0, ctx + " router_weight got no gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LAYER_DTYPES + [torch.float16], ids=dtype_id)
def test_unrouted_tokens_pass_through_bit_for_bit(dtype, device):
    B, S, D, C = 2, 20, 8, 5
    x, rw, rb, valid, _, _ = _inputs(B, S, D, dtype, device, seed=6)
    block = ToyBlock(D, dtype).to(device)
    res = mod_ext.mod_block(x, rw, block, capacity=C, router_bias=rb, valid=valid)
    routed = torch.zeros(B, S, dtype=torch.bool, device=device)
    routed.scatter_(1, res.indices, res.slot_mask)
    # slots that are padding (weight 0) also leave x unchanged bit for bit when f is finite
    assert_bitwise_equal(res.output[~routed], x[~routed], "unrouted tokens")
    assert not torch.equal(res.output[routed], x[routed]), "routed tokens were not updated"


@pytest.mark.parametrize("device", DEVICES)
def test_block_fn_gets_true_positions_and_slot_mask(device):
    B, S, D, C = 2, 10, 4, 3
    x = torch.zeros(B, S, D, device=device)
    # router_weight = e_0, so the router logit of token s is x[b, s, 0]
    x[0, :, 0] = torch.tensor([0.0, 1, 9, 2, 3, 8, 4, 5, 7, 6])  # top-3: 2, 5, 8
    x[1, :, 0] = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    x[:, :, 1] = torch.arange(S, dtype=torch.float32)  # a feature that names the token
    rw = torch.zeros(D, device=device)
    rw[0] = 1
    valid = torch.ones(B, S, dtype=torch.bool, device=device)
    valid[1] = False
    valid[1, 6] = True  # row 1: one valid token (6), padding with positions 0 and 1
    seen = {}

    def block(xs, positions, slot_mask):
        seen.update(xs=xs.clone(), positions=positions.clone(), slot_mask=slot_mask.clone())
        return torch.ones_like(xs)

    res = mod_ext.mod_block(x, rw, block, capacity=C, valid=valid, router_activation="identity")
    exp_pos = torch.tensor([[2, 5, 8], [0, 1, 6]])
    exp_mask = torch.tensor([[T, T, T], [F_, F_, T]])
    assert torch.equal(seen["positions"].cpu(), exp_pos), seen["positions"]
    assert torch.equal(seen["slot_mask"].cpu(), exp_mask), seen["slot_mask"]
    assert torch.equal(seen["xs"][:, :, 1].cpu(), exp_pos.float()), "block got the wrong rows"
    assert torch.equal(res.indices.cpu(), exp_pos) and torch.equal(res.slot_mask.cpu(), exp_mask)
    # identity activation: routed rows get + z * 1; padding rows (weight 0) are untouched
    exp = x.clone()
    exp[0, 2] += 9
    exp[0, 5] += 8
    exp[0, 8] += 7
    exp[1, 6] += 3
    assert_bitwise_equal(res.output, exp, "identity router weight times f")
    assert_bitwise_equal(res.router_weights, torch.tensor([[9.0, 8, 7], [0, 0, 3]], device=device), "r")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=dtype_id)
def test_residual_added_once(dtype, device):
    B, S, D, C = 2, 12, 6, 4
    x, rw, rb, valid, _, _ = _inputs(B, S, D, dtype, device, seed=8)
    res = mod_ext.mod_block(x, rw, lambda xs, p, m: torch.zeros_like(xs), capacity=C, valid=valid)
    assert_bitwise_equal(res.output, x, "f = 0 must give x back")
    # f = x_sel (a block that wrongly returns the residual) doubles the routed rows scaled by r
    res = mod_ext.mod_block(x, rw, lambda xs, p, m: xs, capacity=C, router_activation="sigmoid")
    exp = mod_block_ref(x, rw, lambda xs, p, m: xs, capacity=C)[0]
    assert_bitwise_equal(res.output, exp, "f = x_sel")


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_default_capacity_and_float64(device):
    B, S, D = 2, 16, 4
    x, rw, _, _, _, _ = _inputs(B, S, D, torch.float64, device, seed=9)
    res = mod_ext.mod_block(x, rw, lambda xs, p, m: torch.tanh(xs))
    assert res.indices.shape == (B, mod_ext.capacity_for(S, 0.125)) == (B, 2)
    assert res.router_logits.dtype == torch.float64 and res.output.dtype == torch.float64
    res = mod_ext.mod_block(x, rw, lambda xs, p, m: torch.tanh(xs), capacity_factor=0.3)
    assert res.indices.shape == (B, 5)
    exp = mod_block_ref(x, rw, lambda xs, p, m: torch.tanh(xs), capacity=5)
    assert_bitwise_equal(res.output, exp[0], "float64 output")


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_batch_zero(device):
    x = torch.zeros(0, 8, 4, device=device, requires_grad=True)
    rw = torch.randn(4, device=device, requires_grad=True)
    res = mod_ext.mod_block(x, rw, lambda xs, p, m: xs * 2, capacity=3)
    assert res.output.shape == (0, 8, 4) and res.indices.shape == (0, 3) and res.slot_mask.shape == (0, 3)
    gx, gw = torch.autograd.grad(res.output.sum(), (x, rw), allow_unused=True)
    assert gx.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_noncontiguous_inputs(device):
    B, S, D, C = 3, 20, 8, 5
    x, rw, rb, valid, gout, _ = _inputs(B, S, D, torch.float32, device, seed=10)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    vt = valid.t().contiguous().t()
    rws = torch.stack([rw, rw], -1)[:, 1]
    block = ToyBlock(D).to(device)
    a = mod_ext.mod_block(xt, rws, block, capacity=C, router_bias=rb, valid=vt)
    b = mod_block_ref(xt, rws, block, capacity=C, router_bias=rb, valid=vt)
    assert_bitwise_equal(a.output, b[0], "strided x / router_weight / valid")
    # and (up to the matmul's rounding for another memory layout) the contiguous result
    c = mod_block_ref(x, rw, block, capacity=C, router_bias=rb, valid=valid)
    assert_routing_equal((a.indices, a.slot_mask), (c[2], c[3]), "strided routing")
    assert_close(a.output, c[0], "strided vs contiguous")


# --------------------------------------------------------------------------------------
# capacity_for
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "S,c,expected",
    [
        (1, 0.125, 1),  # a single decode token still gets one slot
        (8, 0.125, 1),
        (9, 0.125, 2),
        (16, 0.125, 2),
        (4096, 0.125, 512),
        (1000, 1e-9, 1),  # tiny c: at least one slot
        (7, 1.0, 7),
        (7, 3.5, 7),  # c > 1: at most S
        (10, 0.7, 7),  # 0.7 * 10 = 7.000000000000001 in floating point, still 7
        (100, 0.07, 7),
        (3, 1 / 3, 1),
        (10, 0.71, 8),
        (1, 1e-12, 1),
    ],
)
def test_capacity_for(S, c, expected):
    got = mod_ext.capacity_for(S, c)
    assert got == expected and isinstance(got, int), (S, c, got)


@pytest.mark.parametrize(
    "S,c,match",
    [
        (0, 0.5, "seq_len"),
        (-3, 0.5, "seq_len"),
        (2.5, 0.5, "seq_len"),
        (8, 0.0, "capacity_factor"),
        (8, -0.1, "capacity_factor"),
        (8, float("nan"), "capacity_factor"),
        (8, float("inf"), "capacity_factor"),
    ],
)
def test_capacity_for_errors(S, c, match):
    with pytest.raises(ValueError, match=match):
        mod_ext.capacity_for(S, c)


# --------------------------------------------------------------------------------------
# router_aux_loss / topk_targets / routing_metrics
# --------------------------------------------------------------------------------------


def _bce(z, t):
    return math.log1p(math.exp(-abs(z))) + max(z, 0.0) - z * t


@pytest.mark.parametrize("device", DEVICES)
def test_router_aux_loss_per_row_targets(device):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 0.0, 4.0], [1.0, 1.0, -1.0, -3.0]], device=device)
    indices = torch.tensor([[0, 3], [1, 3], [2, 3]], device=device)
    targets = [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert torch.equal(mod_ext.topk_targets(logits, indices).cpu(), torch.tensor(targets, dtype=torch.float32))
    terms = [[_bce(float(logits[b, s]), targets[b][s]) for s in range(4)] for b in range(3)]
    expected = sum(map(sum, terms)) / 12
    got = mod_ext.router_aux_loss(logits, indices)
    assert got.shape == () and got.dtype == torch.float32
    assert abs(float(got) - expected) < 1e-6, (float(got), expected)
    # The MOD_SPEC section 6 fault (targets on a flattened (B*S) tensor indexed with
    # per-row indices) gives a different number here.
    flat = torch.zeros(12)
    flat[indices.flatten().cpu()] = 1
    wrong = F.binary_cross_entropy_with_logits(logits.cpu().flatten(), flat)
    assert abs(float(wrong) - expected) > 1e-3

    valid = torch.tensor([[T, T, F_, T], [T, F_, F_, F_], [T, T, T, T]], device=device)
    vterms = [terms[b][s] for b in range(3) for s in range(4) if bool(valid[b, s])]
    got = mod_ext.router_aux_loss(logits, indices, valid)
    assert abs(float(got) - sum(vterms) / len(vterms)) < 1e-6

    # its gradient: (sigmoid(z) - t) / N on valid tokens, 0 on invalid ones
    z = logits.clone().requires_grad_()
    mod_ext.router_aux_loss(z, indices, valid).backward()
    tt = torch.tensor(targets, dtype=torch.float32, device=device)
    exp_grad = (torch.sigmoid(logits) - tt) * valid / valid.sum()
    assert_close(z.grad, exp_grad, "aux loss grad")


@pytest.mark.parametrize("device", DEVICES)
def test_routing_metrics_constructed(device):
    scores = torch.tensor([[2.0, -1.0, 3.0, 0.5], [-1.0, 1.0, 1.0, 1.0]], device=device)
    indices = torch.tensor([[0, 1], [2, 3]], device=device)  # top-k membership targets
    m = mod_ext.routing_metrics(scores, indices, capacity=2)
    # row 0: targets [1,1,0,0], score>0 [1,0,1,1] -> agree 1/4; causal routes 0, 2 -> hit 0
    # row 1: targets [0,0,1,1], score>0 [0,1,1,1] -> agree 3/4; causal routes 1, 2 -> hit 2
    assert abs(float(m.accuracy) - 4 / 8) < 1e-6, m
    assert abs(float(m.recall) - 2 / 4) < 1e-6, m
    assert abs(float(m.routed_fraction) - 4 / 8) < 1e-6, m
    valid = torch.tensor([[T, T, T, F_], [T, T, T, T]], device=device)
    m = mod_ext.routing_metrics(scores, indices, capacity=2, valid=valid)
    # row 0 over 3 valid tokens: agree [1,0,0] ; row 1 as before: 3/4 -> 4/7
    assert abs(float(m.accuracy) - 4 / 7) < 1e-6, m
    assert abs(float(m.recall) - 2 / 4) < 1e-6, m
    assert abs(float(m.routed_fraction) - 4 / 7) < 1e-6, m
    # a perfect causal score
    perfect = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]], device=device)
    m = mod_ext.routing_metrics(perfect, indices, capacity=2)
    assert float(m.accuracy) == 1.0 and float(m.recall) == 1.0 and float(m.routed_fraction) == 0.5


# --------------------------------------------------------------------------------------
# MoDPredictor / MoDBlock
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_predictor_stop_gradient(device):
    torch.manual_seed(0)
    D = 8
    upstream = nn.Linear(D, D).to(device)
    pred = mod_ext.MoDPredictor(D).to(device)
    x0 = torch.randn(2, 10, D, device=device, requires_grad=True)
    x = upstream(x0)
    idx, _ = mod_ext.topk_route(torch.randn(2, 10, device=device), 3)
    logits = pred(x)
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    loss = pred.loss(x, idx)
    loss.backward()
    assert x0.grad is None and upstream.weight.grad is None and upstream.bias.grad is None
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in pred.parameters())
    assert abs(float(loss.detach()) - float(mod_ext.router_aux_loss(logits.detach(), idx))) < 1e-6


class TokenwiseBlock(nn.Module):
    """f acts on each routed token on its own (so outputs of tokens <= t only depend on
    tokens <= t); it checks that positions are true positions."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, xs, positions, slot_mask):
        assert positions.dtype == torch.int64 and slot_mask.dtype == torch.bool
        return torch.tanh(self.lin(xs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal_router", ["predictor", "router"])
def test_modblock_topk_mode(causal_router, device):
    torch.manual_seed(1)
    B, S, D = 2, 32, 8
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, causal_router=causal_router).to(device)
    x = torch.randn(B, S, D, device=device, requires_grad=True)
    valid = torch.ones(B, S, dtype=torch.bool, device=device)
    valid[1, 20:] = False
    out = blk(x, valid=valid)
    assert out.shape == x.shape and out.dtype == x.dtype
    lo = blk.last_output
    assert lo.indices.shape == (B, 8)
    # same as the functional layer with the module's router
    exp = mod_block_ref(
        x, blk.router_weight, blk._block_fn(None), capacity=8, router_bias=blk.router_bias, valid=valid
    )[0]
    assert_close(out, exp, "MoDBlock topk vs reference")
    assert blk.aux_loss is not None and blk.aux_loss.shape == ()
    if causal_router == "predictor":
        exp_aux = mod_ext.router_aux_loss(blk.predictor(x), lo.indices, valid)
    else:
        exp_aux = mod_ext.router_aux_loss(lo.router_logits, lo.indices, valid)
    assert abs(float(blk.aux_loss.detach()) - float(exp_aux.detach())) < 1e-6
    # the LM loss reaches the router (through r * f) and the block, never the predictor
    out.square().sum().backward()
    assert blk.router_weight.grad is not None and float(blk.router_weight.grad.abs().sum()) > 0
    assert blk.router_bias.grad is not None and float(blk.router_bias.grad.abs()) > 0
    assert float(blk.block.lin.weight.grad.abs().sum()) > 0
    if blk.predictor is not None:
        assert all(p.grad is None for p in blk.predictor.parameters())
        blk.aux_loss.backward()
        assert all(p.grad is not None for p in blk.predictor.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal_router", ["predictor", "router"])
def test_modblock_causal_mode_is_causal(causal_router, device):
    torch.manual_seed(2)
    B, S, D = 3, 40, 8
    blk = mod_ext.MoDBlock(
        TokenwiseBlock(D), D, capacity_factor=0.25, causal_router=causal_router, max_seq_len=S
    ).to(device)
    with torch.no_grad():
        blk.router_bias.fill_(0.3)  # make some router logits positive
    x = torch.randn(B, S, D, device=device)
    out = blk(x, routing="causal")
    assert blk.aux_loss is None
    C = blk.causal_capacity(S)
    assert C == mod_ext.capacity_for(S, 0.25) == 10
    lo = blk.last_output
    routed = torch.zeros(B, S, dtype=torch.bool, device=device).scatter_(1, lo.indices, lo.slot_mask)
    assert int(routed.sum()) > 0, "nothing routed: the test would be vacuous"
    # scores are the causal score (> 0 routes), first come first served
    scores = blk.causal_scores(x)
    exp_idx, exp_mask = R.threshold_route_ref(scores.detach().float().cpu(), C)
    assert_routing_equal((lo.indices, lo.slot_mask), (exp_idx, exp_mask), "causal routing")
    for t in (0, 7, 19, 33):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn(B, S - t - 1, D, device=device) * 3
        out2 = blk(x2, routing="causal")
        lo2 = blk.last_output
        routed2 = torch.zeros_like(routed).scatter_(1, lo2.indices, lo2.slot_mask)
        assert torch.equal(routed[:, : t + 1], routed2[:, : t + 1]), f"decision for tokens <= {t} changed"
        assert_close(out2[:, : t + 1], out[:, : t + 1], f"outputs of tokens <= {t}")
        # with max_seq_len fixed, a prefix alone routes its tokens the same way
        out3 = blk(x[:, : t + 1], routing="causal")
        lo3 = blk.last_output
        routed3 = torch.zeros(B, t + 1, dtype=torch.bool, device=device).scatter_(1, lo3.indices, lo3.slot_mask)
        assert torch.equal(routed[:, : t + 1], routed3), f"prefix of length {t + 1} routed differently"
        assert_close(out3, out[:, : t + 1], f"prefix outputs t={t}")


@pytest.mark.parametrize("device", DEVICES)
def test_modblock_block_returns_residual(device):
    torch.manual_seed(3)
    D = 8
    inner = TokenwiseBlock(D)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, xs, p, m):
            return xs + self.inner(xs, p, m)

    a = mod_ext.MoDBlock(inner, D, capacity_factor=0.5).to(device)
    b = mod_ext.MoDBlock(Residual(), D, capacity_factor=0.5, block_returns_residual=True).to(device)
    b.load_state_dict({k.replace("block.", "block.inner.", 1) if k.startswith("block.") else k: v for k, v in a.state_dict().items()})
    x = torch.randn(2, 12, D, device=device)
    assert_close(b(x), a(x), "block_returns_residual", scale=2)


def test_modblock_bad_options():
    with pytest.raises(ValueError, match="causal_router"):
        mod_ext.MoDBlock(nn.Identity(), 4, causal_router="oracle")
    with pytest.raises(ValueError, match="router_activation"):
        mod_ext.MoDBlock(nn.Identity(), 4, router_activation="relu")
    with pytest.raises(ValueError, match="capacity_factor"):
        mod_ext.MoDBlock(nn.Identity(), 4, capacity_factor=0.0)
    blk = mod_ext.MoDBlock(TokenwiseBlock(4), 4)
    with pytest.raises(ValueError, match="routing"):
        blk(torch.randn(1, 4, 4), routing="sample")


def test_modblock_causal_needs_max_seq_len():
    """A causal capacity that followed the input length would let later tokens change
    earlier decisions (and route every token at S = 1), so it must be fixed up front."""
    blk = mod_ext.MoDBlock(TokenwiseBlock(4), 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        blk(torch.randn(1, 4, 4), routing="causal")
    blk = mod_ext.MoDBlock(TokenwiseBlock(4), 4, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        blk(torch.randn(1, 9, 4), routing="causal")
    assert blk.causal_capacity(1) == 1 and blk.causal_capacity(8) == mod_ext.capacity_for(8, 0.125)


@pytest.mark.parametrize("device", DEVICES)
def test_modblock_positions_and_last_scores(device):
    """positions (B, S) reach the block gathered at the routed indices (an offset
    window, left padding), and last_scores holds the causal scores of the call."""
    torch.manual_seed(3)
    B, S, D = 2, 16, 8
    seen = {}

    class Recorder(nn.Module):
        def forward(self, xs, positions, slot_mask):
            seen["positions"] = positions
            return torch.zeros_like(xs)

    blk = mod_ext.MoDBlock(Recorder(), D, capacity_factor=0.25, max_seq_len=S).to(device)
    x = torch.randn(B, S, D, device=device)
    offset = torch.arange(S, device=device).expand(B, S) + torch.tensor([[100], [7]], device=device)
    for mode in ("topk", "causal"):
        blk(x, routing=mode, positions=offset)
        idx = blk.last_output.indices
        assert torch.equal(seen["positions"], offset.gather(1, idx)), mode
        assert torch.equal(blk.last_scores, blk.causal_scores(x).detach()), mode
    blk(x)
    assert torch.equal(seen["positions"], blk.last_output.indices)
    with pytest.raises(ValueError, match="positions"):
        blk(x, positions=offset[:, :-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_padding_slots_leave_tokens_bit_identical(grad, device):
    """A padding slot's update is discarded even when the block returns NaN/inf there
    (e.g. a masked softmax over no keys) and even for -0.0 in x."""
    B, S, D, C = 2, 8, 4, 4
    x = torch.randn(B, S, D)
    x[1, 2:] = -0.0  # the invalid tokens that will fill row 1's padding slots
    x[1, 3, 0] = float("nan")
    x = x.to(device)
    valid = torch.ones(B, S, dtype=torch.bool, device=device)
    valid[1, 2:] = False
    w_r = torch.randn(D, device=device)

    def block_fn(xs, pos, mask):
        f = torch.tanh(xs)
        return torch.where(mask.unsqueeze(-1), f, torch.full_like(f, float("nan")))

    with torch.set_grad_enabled(grad):
        out = mod_ext.mod_block(x.clone(), w_r, block_fn, capacity=C, valid=valid)
    assert out.slot_mask[1].sum() == 2
    assert_bitwise_equal(out.output[1, 2:], x[1, 2:], "padding tokens")
    assert torch.isfinite(out.output[0]).all() and torch.isfinite(out.output[1, :2]).all()
