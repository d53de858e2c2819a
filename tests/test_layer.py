"""The MoD layer (mod_ext.layer) against a plain-PyTorch implementation of the whole
layer, plus capacity_for, router_aux_loss, routing_metrics, MoDPredictor and MoDBlock:
outputs and gradients across dtypes, no hidden in-place writes, activation
checkpointing, deepcopy / state_dict, torch.compile (incl. dynamic=True) and
torch.export, and the argument errors (each names the argument)."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import mod_ext
from mod_ext import reference as R
from mod_ext.layer import MoDBlock
from mod_ext.models import ModelConfig, MoDTransformer
from tests.helpers import (
    DEVICES,
    assert_bitwise_equal,
    assert_close,
    assert_routing_equal,
    dtype_id,
    gen,
    requires_cuda,
)

try:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
except ImportError:  # pragma: no cover - very old torch
    aot_autograd = None

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
    else:  # causal
        src = logits if scores is None else scores
        idx, mask = R.threshold_route_ref(src.detach().float(), capacity, valid)
    z = logits.gather(1, idx)
    if router_activation == "sigmoid":
        r = torch.sigmoid(z)
    elif router_activation == "scaled_sigmoid":
        r = 2 * torch.sigmoid(z)
    else:
        r = z
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
@pytest.mark.parametrize("activation", ["sigmoid", "scaled_sigmoid", "identity"])
@pytest.mark.parametrize("routing", ["topk", "causal", "causal_scores"])
@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=dtype_id)
def test_mod_block_matches_reference(dtype, routing, activation, use_valid, device):
    B, S, D, C = 3, 24, 16, 6
    x0, rw0, rb0, valid, gout, scores = _inputs(B, S, D, dtype, device, seed=5)
    valid = valid if use_valid else None
    route = "causal" if routing.startswith("causal") else "topk"
    sc = scores if routing == "causal_scores" else None
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
    if dtype == torch.float32:
        # float32 x: the router-logits op is bit-identical to x.float() @ w (+ b), so the
        # whole layer is.
        assert_bitwise_equal(logits, elogits, ctx + " router_logits")
        assert_bitwise_equal(r, er, ctx + " router_weights")
        assert_bitwise_equal(out, eout, ctx + " output")
    else:
        # bf16 x: the op accumulates in float32 straight from bf16 (no float32 copy of x),
        # in its own order, so the logits may differ from the oracle's by float32 rounding.
        assert_close(logits, elogits, ctx + " router_logits", dtype=torch.float32)
        assert_close(r, er, ctx + " router_weights", dtype=torch.float32)
        assert_close(out, eout, ctx + " output", dtype=dtype)
    # router logits really are x @ w + b in float32
    indep = (x0.double() * rw0.double()).sum(-1) + rb0.double()
    assert_close(logits.double(), indep, ctx + " logits vs float64", dtype=torch.float32, scale=10)
    # padding slots have router weight 0; valid slots act(z)
    assert bool((r[~mask] == 0).all()), ctx
    if use_valid:
        assert not bool(mask[1, 2:].any()) and bool(mask[1, :2].any() or route == "causal"), ctx

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
    # Decisions are causal routing's, capped at 2 per row, first come first served:
    # row 0: targets [1,1,0,0], routes 0, 2 (3 wanted but the cap is full) -> [1,0,1,0]: agree 2/4, hit 1
    # row 1: targets [0,0,1,1], routes 1, 2 -> [0,1,1,0]: agree 2/4, hit 1
    assert abs(float(m.accuracy) - 4 / 8) < 1e-6, m
    assert abs(float(m.recall) - 2 / 4) < 1e-6, m
    assert abs(float(m.routed_fraction) - 4 / 8) < 1e-6, m
    assert abs(float(m.precision) - 2 / 4) < 1e-6, m
    valid = torch.tensor([[T, T, T, F_], [T, T, T, T]], device=device)
    m = mod_ext.routing_metrics(scores, indices, capacity=2, valid=valid)
    # row 0 over 3 valid tokens: agree [1,0,0]; row 1 as before: 2/4 -> 3/7
    assert abs(float(m.accuracy) - 3 / 7) < 1e-6, m
    assert abs(float(m.recall) - 2 / 4) < 1e-6, m
    assert abs(float(m.routed_fraction) - 4 / 7) < 1e-6, m
    # a perfect causal score
    perfect = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]], device=device)
    m = mod_ext.routing_metrics(perfect, indices, capacity=2)
    assert float(m.accuracy) == 1.0 and float(m.recall) == 1.0 and float(m.routed_fraction) == 0.5
    assert float(m.precision) == 1.0
    # never routing: accuracy 1 - c, recall 0, precision 1 (nothing routed wrongly)
    m = mod_ext.routing_metrics(-perfect.abs(), indices, capacity=2)
    assert float(m.accuracy) == 0.5 and float(m.recall) == 0.0 and float(m.precision) == 1.0


def _metrics_oracle(scores, indices, capacity, valid):
    """Plain-Python routing_metrics: causal routing token by token, then counts."""
    B, S = scores.shape
    agree = n = hits = pos = routed = 0
    for b in range(B):
        tgt = set(indices[b].tolist())
        taken = 0
        for t in range(S):
            if valid is not None and not valid[b, t]:
                continue
            route = float(scores[b, t]) > 0 and taken < capacity
            taken += route
            is_tgt = t in tgt
            agree += route == is_tgt
            n += 1
            hits += route and is_tgt
            pos += is_tgt
            routed += route
    return agree / n, hits / max(pos, 1), routed / n, hits / routed if routed else 1.0


@pytest.mark.parametrize("shape", [(1, 7), (3, 83), (2, 1)])
def test_routing_metrics_oracle(shape):
    g = torch.Generator().manual_seed(sum(shape))
    B, S = shape
    for c in (0.125, 0.5):
        C = mod_ext.capacity_for(S, c)
        scores = torch.randn(B, S, generator=g)
        scores[:, ::3] = 0.0  # ties at the threshold: 0 does not route
        valid = torch.rand(B, S, generator=g) > 0.2
        valid[:, -1] = True
        idx, _ = mod_ext.topk_route(torch.randn(B, S, generator=g), C, valid)
        for v in (None, valid):
            m = mod_ext.routing_metrics(scores, idx, C, v)
            exp = _metrics_oracle(scores, idx, C, v)
            got = (float(m.accuracy), float(m.recall), float(m.routed_fraction), float(m.precision))
            assert max(abs(a - b) for a, b in zip(got, exp)) < 1e-6, (got, exp)


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
    res = blk(x, valid=valid)
    assert isinstance(res, mod_ext.MoDBlockOutput)
    out, lo = res.output, res.routing
    assert out.shape == x.shape and out.dtype == x.dtype
    assert lo.indices.shape == (B, 8) and lo.output is out
    # same as the functional layer with the module's router
    exp = mod_block_ref(
        x, blk.router_weight, blk._block_fn(None), capacity=8, router_bias=blk.router_bias, valid=valid
    )[0]
    assert_close(out, exp, "MoDBlock topk vs reference")
    assert res.aux_loss is not None and res.aux_loss.shape == ()
    if causal_router == "predictor":
        exp_aux = mod_ext.router_aux_loss(blk.predictor(x), lo.indices, valid)
    else:
        exp_aux = mod_ext.router_aux_loss(lo.router_logits, lo.indices, valid)
    assert abs(float(res.aux_loss.detach()) - float(exp_aux.detach())) < 1e-6
    assert torch.equal(res.causal_scores, blk.causal_scores(x).detach()) and not res.causal_scores.requires_grad
    # the LM loss reaches the router (through r * f) and the block, never the predictor
    out.square().sum().backward()
    assert blk.router_weight.grad is not None and float(blk.router_weight.grad.abs().sum()) > 0
    assert blk.router_bias.grad is not None and float(blk.router_bias.grad.abs()) > 0
    assert float(blk.block.lin.weight.grad.abs().sum()) > 0
    if blk.predictor is not None:
        assert all(p.grad is None for p in blk.predictor.parameters())
        res.aux_loss.backward()
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
    res = blk(x, routing="causal")
    out, lo = res.output, res.routing
    assert res.aux_loss is None
    C = blk.causal_capacity(S)
    assert C == mod_ext.capacity_for(S, 0.25) == 10
    routed = torch.zeros(B, S, dtype=torch.bool, device=device).scatter_(1, lo.indices, lo.slot_mask)
    assert int(routed.sum()) > 0, "nothing routed: the test would be vacuous"
    # scores are the causal score (> 0 routes), first come first served
    scores = blk.causal_scores(x)
    exp_idx, exp_mask = R.threshold_route_ref(scores.detach().float().cpu(), C)
    assert_routing_equal((lo.indices, lo.slot_mask), (exp_idx, exp_mask), "causal routing")
    for t in (0, 7, 19, 33):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn(B, S - t - 1, D, device=device) * 3
        out2, _, lo2, _ = blk(x2, routing="causal")
        routed2 = torch.zeros_like(routed).scatter_(1, lo2.indices, lo2.slot_mask)
        assert torch.equal(routed[:, : t + 1], routed2[:, : t + 1]), f"decision for tokens <= {t} changed"
        assert_close(out2[:, : t + 1], out[:, : t + 1], f"outputs of tokens <= {t}")
        # with max_seq_len fixed, a prefix alone routes its tokens the same way
        out3, _, lo3, _ = blk(x[:, : t + 1], routing="causal")
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
    assert_close(b(x).output, a(x).output, "block_returns_residual", scale=2)


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
def test_modblock_positions_and_causal_scores(device):
    """positions (B, S) reach the block gathered at the routed indices (an offset
    window, left padding), and causal_scores holds the causal scores of the call."""
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
        res = blk(x, routing=mode, positions=offset)
        idx = res.routing.indices
        assert torch.equal(seen["positions"], offset.gather(1, idx)), mode
        assert torch.equal(res.causal_scores, blk.causal_scores(x).detach()), mode
    res = blk(x)
    assert torch.equal(seen["positions"], res.routing.indices)
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


# --------------------------------------------------------------------------------------
# No hidden in-place writes; inplace=True for inference
# --------------------------------------------------------------------------------------


def _tanh_block(xs, positions, slot_mask):
    return torch.tanh(xs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_mod_block_never_modifies_x_by_default(mode, routing, device):
    """Default inplace=False: the caller's x (and a view of a larger buffer) is unchanged
    in every grad mode, and the result is the same in every mode, bit for bit."""
    x, rw, rb, valid, _, _ = _inputs(3, 20, 8, torch.float32, device, seed=21)
    big = torch.randn(3, 30, 8, device=device)
    view = big[:, 5:25]  # a view of a larger buffer
    view.copy_(x)
    big_before, x_before = big.clone(), x.clone()
    ref = mod_ext.mod_block(x.clone(), rw, _tanh_block, capacity=5, router_bias=rb, valid=valid, routing=routing)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        a = mod_ext.mod_block(x, rw, _tanh_block, capacity=5, router_bias=rb, valid=valid, routing=routing)
        b = mod_ext.mod_block(view, rw, _tanh_block, capacity=5, router_bias=rb, valid=valid, routing=routing)
    assert_bitwise_equal(x, x_before, f"{mode}: x")
    assert_bitwise_equal(big, big_before, f"{mode}: the buffer behind the view")
    assert a.output.data_ptr() != x.data_ptr() and b.output.data_ptr() != view.data_ptr()
    assert_bitwise_equal(a.output, ref.output.detach(), f"{mode} vs grad mode")
    assert_bitwise_equal(b.output, ref.output.detach(), f"{mode} view vs grad mode")
    assert not torch.equal(a.output, x), "nothing was routed: the test would be vacuous"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_mod_block_inplace_true_updates_x(routing, device):
    g = gen(11)
    B, S, D = 3, 40, 8
    x = torch.randn(B, S, D, generator=g).to(device)
    w_r = torch.randn(D, generator=g).to(device)
    lin = nn.Linear(D, D).to(device)

    def block_fn(xs, pos, mask):
        return torch.tanh(lin(xs))

    ref = mod_ext.mod_block(x, w_r, block_fn, capacity=10, routing=routing)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            x2 = x.clone()
            out = mod_ext.mod_block(x2, w_r, block_fn, capacity=10, routing=routing, inplace=True)
            assert out.output is x2 and torch.equal(out.indices, ref.indices)
            assert_bitwise_equal(x2, ref.output.detach(), f"{ctx.__name__} in-place vs out-of-place")
    # Grad mode with anything requiring grad: a clear error, and x is left as it was.
    x3 = x.clone()
    with pytest.raises(ValueError, match="inplace=True is for inference only"):
        mod_ext.mod_block(x3, w_r, block_fn, capacity=10, routing=routing, inplace=True)  # lin requires grad
    assert_bitwise_equal(x3, x, "a rejected in-place call leaves x unchanged")
    with pytest.raises(ValueError, match="inplace=True is for inference only"):
        mod_ext.mod_block(x.clone().requires_grad_(), w_r, _tanh_block, capacity=10, inplace=True)
    # Grad mode with nothing requiring grad is inference too.
    x4 = x.clone()
    out = mod_ext.mod_block(x4, w_r, _tanh_block, capacity=10, routing=routing, inplace=True)
    assert out.output is x4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_modblock_never_modifies_its_input(mode, device):
    torch.manual_seed(4)
    D = 8
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, max_seq_len=16).to(device)
    with torch.no_grad():
        blk.router_bias.fill_(0.5)
        blk.predictor.net[2].bias.fill_(0.5)
    x = torch.randn(2, 16, D, device=device)
    before = x.clone()
    ref = blk(x, routing=mode).output.detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = blk(x, routing=mode).output
        assert_bitwise_equal(x, before, f"{ctx.__name__}: MoDBlock modified its input")
        assert_bitwise_equal(out, ref, f"{ctx.__name__} vs grad mode")
    assert not torch.equal(ref, x)
    with torch.no_grad():
        x2 = x.clone()
        out = blk(x2, routing=mode, inplace=True).output
    assert out is x2 and torch.equal(x2, ref)


# --------------------------------------------------------------------------------------
# Module semantics: activation checkpointing, deepcopy, state_dict
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("causal_router", ["predictor", "router"])
def test_modblock_activation_checkpointing(causal_router, use_reentrant):
    """Checkpointed MoDBlock: the same output and gradients as without checkpointing
    (a layer that wrote its no_grad forward into x would corrupt the reentrant recompute)."""
    torch.manual_seed(5)
    D = 8
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, causal_router=causal_router)
    upstream = nn.Linear(D, D)
    x0 = torch.randn(2, 24, D)
    gout = torch.randn(2, 24, D)

    def run(checkpointed):
        blk.zero_grad(set_to_none=True)
        upstream.zero_grad(set_to_none=True)
        xx = x0.clone().requires_grad_()
        h = upstream(xx)  # a non-leaf input, as inside a model

        def f(h):
            out = blk(h)
            return out.output, out.aux_loss

        if checkpointed:
            out, aux = torch.utils.checkpoint.checkpoint(f, h, use_reentrant=use_reentrant)
        else:
            out, aux = f(h)
        ((out * gout).sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in list(blk.named_parameters()) + list(upstream.named_parameters())
                 if p.grad is not None}
        return out.detach(), xx.grad.clone(), grads

    e_out, e_gx, e_grads = run(False)
    out, gx, grads = run(True)
    assert_bitwise_equal(out, e_out, "checkpointed output")
    assert_close(gx, e_gx, "checkpointed grad x")
    assert set(grads) == set(e_grads)
    for n in grads:
        assert_close(grads[n], e_grads[n], f"checkpointed grad {n}")
    assert float(e_grads["router_weight"].abs().sum()) > 0


def test_modblock_deepcopy_and_state_dict_after_training_forward():
    import copy

    torch.manual_seed(6)
    D = 8
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, max_seq_len=16)
    x = torch.randn(2, 16, D, requires_grad=True)
    res = blk(x)
    (res.output.sum() + res.aux_loss).backward()
    twin = copy.deepcopy(blk)  # no non-leaf tensors are kept on the module
    assert not any(isinstance(v, torch.Tensor) for v in vars(blk).values())
    for mode in ("topk", "causal"):
        assert_bitwise_equal(twin(x.detach(), routing=mode).output, blk(x.detach(), routing=mode).output, mode)
    fresh = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, max_seq_len=16)
    fresh.load_state_dict(blk.state_dict())
    assert_bitwise_equal(fresh(x.detach()).output, blk(x.detach()).output, "state_dict round trip")
    assert set(blk.state_dict()) == {"router_weight", "router_bias", "causal_threshold", "block.lin.weight", "block.lin.bias",
                                     "predictor.net.0.weight", "predictor.net.0.bias", "predictor.net.2.weight",
                                     "predictor.net.2.bias"}


# --------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, compiled == eager, no host sync
# (MOD_SPEC section 2). Most tests use an AOTAutograd backend that records the forward
# and backward graphs (the same Dynamo + AOTAutograd tracing the default backend does,
# without Inductor's slow C++ compile on small CPU machines); one runs Inductor.
# --------------------------------------------------------------------------------------

# Ops that force a device->host sync or a data-dependent shape.
SYNC_OPS = (
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "item",
    "masked_scatter",
    "index_put_with_bool",
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """An AOTAutograd backend that keeps the forward/backward graphs it is given."""

    def __init__(self):
        self.dynamo_graphs = 0
        self.fw = []
        self.bw = []

        def fw_compiler(gm, example_inputs):
            self.fw.append(gm)
            return make_boxed_func(gm.forward)

        def bw_compiler(gm, example_inputs):
            self.bw.append(gm)
            return make_boxed_func(gm.forward)

        self._aot = aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler)

    def __call__(self, gm, example_inputs):
        self.dynamo_graphs += 1
        return self._aot(gm, example_inputs)

    @staticmethod
    def targets(graphs):
        return [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]

    def check(self, forward_ops, backward_ops):
        assert self.dynamo_graphs == 1, f"expected one Dynamo graph, got {self.dynamo_graphs}"
        fw, bw = self.targets(self.fw), self.targets(self.bw)
        for op in forward_ops:
            assert any(op in t for t in fw), f"{op} not in the forward graph: {sorted(set(fw))}"
        for op in backward_ops:
            assert any(op in t for t in bw), f"{op} not in the backward graph: {sorted(set(bw))}"
        for t in fw + bw:
            name = t.split(".")[1] if t.startswith("aten.") else t
            assert not any(name == s or name.startswith(s + ".") for s in SYNC_OPS), f"host-sync op {t} in the graph"
        # Data-dependent shapes (boolean indexing, nonzero, ...) show up as unbacked
        # symbols in the traced values; they need the data on the host.
        for gm in self.fw + self.bw:
            for n in gm.graph.nodes:
                val = n.meta.get("val")
                if val is not None and free_unbacked_symbols(val):
                    raise AssertionError(f"data-dependent shape at {n.format_node()}")


needs_aot = pytest.mark.skipif(aot_autograd is None, reason="this torch has no torch._dynamo.backends.common.aot_autograd")


def _setup(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S, D = 2, 32, 16
    x = torch.randn(B, S, D, generator=g).to(dtype).to(device)
    rw = (torch.randn(D, generator=g) / math.sqrt(D)).to(device)
    rb = torch.tensor(0.2).to(device)
    valid = (torch.rand(B, S, generator=g) < 0.8).to(device)
    valid[1, 5:] = False  # fewer valid tokens than capacity: padding slots
    scores = torch.randn(B, S, generator=g).to(device)
    lin = nn.Linear(D, D).to(device).to(dtype)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(D, D, generator=g) / math.sqrt(D)).to(dtype))
        lin.bias.copy_((torch.randn(D, generator=g) * 0.1).to(dtype))
    gout = torch.randn(B, S, D, generator=g).to(device)
    return x, rw, rb, valid, scores, lin, gout


def _make_fn(lin, routing, use_scores, S):
    def block(xs, positions, slot_mask):
        pos = positions.unsqueeze(-1).to(xs.dtype) / S
        return torch.tanh(lin(xs)) * (1 + pos) * slot_mask.unsqueeze(-1).to(xs.dtype)

    def fn(x, rw, rb, valid, scores):
        res = mod_ext.mod_block(
            x, rw, block, capacity=7, router_bias=rb, valid=valid, routing=routing,
            scores=scores if use_scores else None,
        )
        return res.output, res.router_logits, res.indices, res.slot_mask

    return fn


def _run(fn, x, rw, rb, valid, scores, lin, gout):
    x, rw, rb = (t.detach().clone().requires_grad_() for t in (x, rw, rb))
    out, logits, idx, mask = fn(x, rw, rb, valid, scores)
    params = (x, rw, rb, lin.weight, lin.bias)
    grads = torch.autograd.grad((out.float() * gout).sum(), params)
    return (out, logits, idx, mask), grads


@needs_aot
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["topk", "causal", "causal_scores"])
def test_compiled_mod_block_matches_eager(routing, device):
    x, rw, rb, valid, scores, lin, gout = _setup(device)
    route = "topk" if routing == "topk" else "causal"
    fn = _make_fn(lin, route, routing == "causal_scores", x.shape[1])
    rec = Recorder()
    cfn = torch.compile(fn, fullgraph=True, backend=rec)  # fullgraph: a graph break raises
    (e_out, e_logits, e_idx, e_mask), e_grads = _run(fn, x, rw, rb, valid, scores, lin, gout)
    for _ in range(2):  # second call: the cached graph
        (out, logits, idx, mask), grads = _run(cfn, x, rw, rb, valid, scores, lin, gout)
        assert_routing_equal((idx, mask), (e_idx, e_mask), f"compiled {routing}")
        assert_close(logits, e_logits, "compiled router_logits")
        assert_close(out, e_out, "compiled output")
        for name, a, e in zip(("x", "router_weight", "router_bias", "lin.weight", "lin.bias"), grads, e_grads):
            assert_close(a, e, f"compiled grad {name}")
    route_op = "mod_ext.topk_route" if route == "topk" else "mod_ext.threshold_route"
    rec.check(
        forward_ops=(route_op, "mod_ext.gather_tokens", "mod_ext.scatter_add_weighted"),
        backward_ops=("mod_ext.gather_tokens_backward", "mod_ext.scatter_add_weighted_backward"),
    )


@needs_aot
def test_compiled_mod_block_bf16():
    x, rw, rb, valid, scores, lin, gout = _setup("cpu", torch.bfloat16, seed=1)
    fn = _make_fn(lin, "topk", False, x.shape[1])
    rec = Recorder()
    cfn = torch.compile(fn, fullgraph=True, backend=rec)
    (e_out, _, e_idx, e_mask), e_grads = _run(fn, x, rw, rb, valid, scores, lin, gout)
    (out, _, idx, mask), grads = _run(cfn, x, rw, rb, valid, scores, lin, gout)
    assert_routing_equal((idx, mask), (e_idx, e_mask), "compiled bf16")
    assert_close(out, e_out, "compiled bf16 output")
    for a, e in zip(grads, e_grads):
        assert_close(a, e, "compiled bf16 grad", dtype=torch.bfloat16, scale=4)
    rec.check((), ("mod_ext.scatter_add_weighted_backward",))


def test_no_graph_breaks_explain():
    x, rw, rb, valid, scores, lin, _ = _setup("cpu")
    for routing in ("topk", "causal"):
        torch._dynamo.reset()
        fn = _make_fn(lin, routing, False, x.shape[1])
        explanation = torch._dynamo.explain(fn)(x, rw, rb, valid, scores)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1, explanation


def test_compiled_mod_block_inductor():
    """The default backend end to end (forward and backward) on the CPU."""
    x, rw, rb, valid, scores, lin, gout = _setup("cpu", seed=2)
    fn = _make_fn(lin, "topk", False, x.shape[1])
    cfn = torch.compile(fn, fullgraph=True)
    (e_out, _, e_idx, e_mask), e_grads = _run(fn, x, rw, rb, valid, scores, lin, gout)
    (out, _, idx, mask), grads = _run(cfn, x, rw, rb, valid, scores, lin, gout)
    assert_routing_equal((idx, mask), (e_idx, e_mask), "inductor")
    assert_close(out, e_out, "inductor output", scale=2)
    for a, e in zip(grads, e_grads):
        assert_close(a, e, "inductor grad", scale=4)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, xs, positions, slot_mask):
        return torch.tanh(self.lin(xs))


@needs_aot
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_compiled_modblock_module(mode, device):
    torch.manual_seed(0)
    D = 16
    blk = mod_ext.MoDBlock(_Block(D), D, capacity_factor=0.25, max_seq_len=32).to(device)
    blk.routing = mode
    x = torch.randn(2, 32, D, device=device)
    valid = torch.ones(2, 32, dtype=torch.bool, device=device)
    valid[0, 20:] = False
    rec = Recorder()
    cblk = torch.compile(blk, fullgraph=True, backend=rec)

    def run(m):
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        res = m(xx, valid=valid)
        loss = res.output.square().sum()
        if mode == "topk":
            loss = loss + res.aux_loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in blk.named_parameters() if p.grad is not None}
        return res.output.detach(), xx.grad, grads, res.aux_loss

    e_out, e_gx, e_grads, e_aux = run(blk)
    out, gx, grads, aux = run(cblk)
    assert_close(out, e_out, f"compiled MoDBlock {mode}")
    assert_close(gx, e_gx, f"compiled MoDBlock {mode} grad x")
    assert set(grads) == set(e_grads), (sorted(grads), sorted(e_grads))
    for n in grads:
        assert_close(grads[n], e_grads[n], f"compiled MoDBlock {mode} grad {n}")
    if mode == "topk":
        assert aux is not None and abs(float(aux.detach()) - float(e_aux.detach())) < 1e-5
        assert "router_weight" in grads and float(grads["router_weight"].abs().sum()) > 0
    else:
        assert aux is None
    rec.check((), ("mod_ext.scatter_add_weighted_backward",))


# --------------------------------------------------------------------------------------
# CUDA: no host synchronisation, checked by the CUDA runtime
# --------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("routing", ["topk", "causal", "causal_scores"])
def test_cuda_mod_block_does_not_sync(routing):
    x, rw, rb, valid, scores, lin, gout = _setup("cuda")
    route = "topk" if routing == "topk" else "causal"
    fn = _make_fn(lin, route, routing == "causal_scores", x.shape[1])
    _run(fn, x, rw, rb, valid, scores, lin, gout)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    xx, rww, rbb = (t.detach().clone().requires_grad_() for t in (x, rw, rb))
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _, _, _ = fn(xx, rww, rbb, valid, scores)
        torch.autograd.grad((out.float() * gout).sum(), (xx, rww, rbb, lin.weight, lin.bias))
        for op, args in (
            (mod_ext.topk_route, (scores, 5, valid)),
            (mod_ext.threshold_route, (scores, 5, valid)),
        ):
            op(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@requires_cuda
def test_cuda_modblock_does_not_sync():
    torch.manual_seed(0)
    D = 16
    blk = mod_ext.MoDBlock(_Block(D), D, capacity_factor=0.25, max_seq_len=32).cuda()
    x = torch.randn(2, 32, D, device="cuda", requires_grad=True)
    for mode in ("topk", "causal", "topk"):
        res = blk(x, routing=mode)
        (res.output.sum() + (res.aux_loss if res.aux_loss is not None else 0)).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("topk", "causal"):
            res = blk(x, routing=mode)
            loss = res.output.sum() + (res.aux_loss if res.aux_loss is not None else 0)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_aot
@pytest.mark.parametrize("dynamic", [None, True], ids=["auto_dynamic", "dynamic"])
def test_compiled_mod_block_varying_shapes(dynamic):
    """New sequence lengths / batch sizes recompile (or run a dynamic graph) without a
    graph break, and the capacity still follows capacity_for(S, c)."""
    torch.manual_seed(0)
    rw = torch.randn(8)

    def fn(x, valid):
        res = mod_ext.mod_block(x, rw, lambda xs, p, m: torch.tanh(xs), capacity_factor=0.25, valid=valid)
        return res.output, res.indices

    rec = Recorder()
    cfn = torch.compile(fn, fullgraph=True, backend=rec, dynamic=dynamic)
    for B, S in [(2, 32), (2, 48), (3, 5), (1, 1)]:
        x = torch.randn(B, S, 8, requires_grad=True)
        valid = torch.rand(B, S) < 0.7
        out, idx = cfn(x, valid)
        e_out, e_idx = fn(x, valid)
        assert idx.shape == (B, mod_ext.capacity_for(S, 0.25))
        assert torch.equal(idx, e_idx), (B, S)
        assert_close(out, e_out, f"B={B} S={S}")
        (gx,) = torch.autograd.grad(out.sum(), x)
        (e_gx,) = torch.autograd.grad(e_out.sum(), x)
        assert_close(gx, e_gx, f"grad B={B} S={S}")


@requires_cuda
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_cuda_graph_capture_mod_block(routing):
    """The forward captures in a CUDA graph (a host sync would fail the capture) and
    replays to the eager result on new inputs."""
    x, rw, rb, valid, scores, lin, _ = _setup("cuda")
    fn = _make_fn(lin, routing, False, x.shape[1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            fn(x, rw, rb, valid, scores)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = fn(x, rw, rb, valid, scores)
    new_x = torch.randn_like(x)
    x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = fn(new_x, rw, rb, valid, scores)
    assert_routing_equal((static_out[2], static_out[3]), (expected[2], expected[3]), "graph replay routing")
    assert_bitwise_equal(static_out[0], expected[0], "graph replay output")


# --------------------------------------------------------------------------------------
# Symbolic sizes: torch.compile(dynamic=True) and torch.export with a dynamic length
# --------------------------------------------------------------------------------------


def _ops_take_symint_capacity() -> bool:
    """True once the routing ops' schemas take ``SymInt capacity`` (then a symbolic
    capacity reaches the op without a guard on its value, so one graph serves all lengths)."""
    ops = (torch.ops.mod_ext.topk_route.default, torch.ops.mod_ext.threshold_route.default)
    return all("SymInt capacity" in str(op._schema) for op in ops)


SYMINT_OPS = _ops_take_symint_capacity()
NEEDS_SYMINT_SCHEMA = pytest.mark.xfail(
    not SYMINT_OPS, strict=True,
    reason="the routing ops' schema takes `int capacity`; a symbolic capacity is specialised (one graph per "
           "length) until the SymInt schema lands (csrc/registration.cpp)")


class CompileCounter:
    """aot_eager backend that counts the graphs Dynamo compiles."""

    def __init__(self):
        self.frames = 0
        self._aot = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm.forward),
                                 bw_compiler=lambda gm, ex: make_boxed_func(gm.forward)) if aot_autograd else None

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return self._aot(gm, example_inputs)


def test_capacity_for_symbolic_sizes_match_concrete():
    """capacity_for on a SymInt traces to the same value as on the int, for every length
    (0.7 * 10 -> 7 included), without specialising on the length (lengths >= 2: PyTorch
    always specialises sizes 0 and 1)."""
    frames = []

    def counter(gm, example_inputs):
        frames.append(gm)
        return gm

    @torch.compile(dynamic=True, fullgraph=True, backend=counter)
    def caps(x):
        S = x.shape[1]
        return (x.new_ones(mod_ext.capacity_for(S, 0.7)), x.new_ones(mod_ext.capacity_for(S, 0.125)),
                x.new_ones(mod_ext.capacity_for(S, 1e-9)), x.new_ones(mod_ext.capacity_for(S, 3.5)))

    for S in (10, 11, 3, 100, 9, 57, 2):
        got = [t.numel() for t in caps(torch.zeros(2, S))]
        want = [mod_ext.capacity_for(S, c) for c in (0.7, 0.125, 1e-9, 3.5)]
        assert got == want, (S, got, want)
    assert len(frames) == 1, f"recompiled per length: {len(frames)} graphs"
    assert [t.numel() for t in caps(torch.zeros(2, 1))] == [1, 1, 1, 1]


def _dyn_block():
    torch.manual_seed(7)
    D = 8
    return mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, max_seq_len=64), D


@needs_aot
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_compiled_dynamic_modblock_fwd_bwd_matches_eager(mode):
    """torch.compile(dynamic=True) of a MoDBlock forward + backward over several sequence
    lengths: no graph break, compiled == eager, capacity = capacity_for(S, c)."""
    blk, D = _dyn_block()
    counter = CompileCounter()
    cblk = torch.compile(blk, dynamic=True, fullgraph=True, backend=counter)
    for S in (16, 24, 40, 33, 64):
        x = torch.randn(2, S, D)
        outs = []
        for m in (blk, cblk):
            blk.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            res = m(xx, routing=mode)
            loss = res.output.square().sum() + (res.aux_loss if res.aux_loss is not None else 0)
            loss.backward()
            outs.append((res, xx.grad, blk.router_weight.grad.clone()))
        (e, e_gx, e_gw), (c, gx, gw) = outs
        C = mod_ext.capacity_for(S, 0.25) if mode == "topk" else blk.causal_capacity(S)
        assert c.routing.indices.shape == (2, C)
        assert torch.equal(c.routing.indices, e.routing.indices), S
        assert_close(c.output, e.output, f"dynamic S={S}")
        assert_close(gx, e_gx, f"dynamic grad x S={S}")
        assert_close(gw, e_gw, f"dynamic grad router_weight S={S}")


@needs_aot
@NEEDS_SYMINT_SCHEMA
def test_compiled_dynamic_modblock_no_recompile_per_length():
    blk, D = _dyn_block()
    counter = CompileCounter()
    cblk = torch.compile(blk, dynamic=True, fullgraph=True, backend=counter)
    cblk(torch.randn(2, 16, D, requires_grad=True)).output.sum().backward()
    first = counter.frames  # the first compile (Dynamo may restart it once to specialise a float)
    for S in (24, 40, 33):
        cblk(torch.randn(2, S, D, requires_grad=True)).output.sum().backward()
    assert counter.frames == first, f"{counter.frames - first} recompiles for 3 more lengths"


class _ExportWrapper(nn.Module):
    def __init__(self, blk):
        super().__init__()
        self.blk = blk

    def forward(self, x):
        return self.blk(x, routing="topk").output


def test_export_with_dynamic_sequence_length():
    """torch.export with a dynamic S: one exported program serves every length whose layer
    capacity is >= 2 (PyTorch specialises sizes 0 and 1, so a capacity-1 length fails the
    program's own guard, loudly), equal to eager. Dim.DYNAMIC, not a named Dim with a range:
    with a named Dim PyTorch 2.14's export must prove every guard over the whole range, and
    it cannot prove the one that F.linear's reshape of the block's (B, C, D) input adds
    (Ne(Mod(B, B*C), 0) with C = ceil(c*S)), although it holds."""
    blk, D = _dyn_block()
    model = _ExportWrapper(blk).eval()
    ep = torch.export.export(model, (torch.randn(2, 16, D),), dynamic_shapes={"x": {1: torch.export.Dim.DYNAMIC}})
    for n in (5, 8, 16, 23, 64):  # capacities 2..16 at c = 0.25
        x = torch.randn(2, n, D)
        assert_close(ep.module()(x), model(x), f"exported S={n}")
    with pytest.raises(AssertionError, match="Guard failed"):  # S = 4: capacity 1
        ep.module()(torch.randn(2, 4, D))


def test_export_with_static_sequence_length():
    """torch.export at a fixed length works today (the capacity is a constant)."""
    blk, D = _dyn_block()
    model = _ExportWrapper(blk).eval()
    x = torch.randn(2, 16, D)
    ep = torch.export.export(model, (x,))
    assert_close(ep.module()(x), model(x), "exported static")


def test_capacity_for_numpy_scalars():
    np = pytest.importorskip("numpy")
    for S, c, want in [(np.int64(10), 0.7, 7), (10, np.float64(0.7), 7), (np.int32(10), np.float32(0.7), 7),
                       (np.int64(4096), np.float64(0.125), 512), (np.uint8(9), np.float16(0.125), 2)]:
        got = mod_ext.capacity_for(S, c)
        assert got == want == mod_ext.capacity_for(int(S), float(c)) and type(got) is int, (S, c, got)
    with pytest.raises(ValueError, match="seq_len"):
        mod_ext.capacity_for(np.float64(8.0), 0.5)
    with pytest.raises(ValueError, match="capacity_factor"):
        mod_ext.capacity_for(8, np.bool_(True))


# --------------------------------------------------------------------------------------
# Errors: every bad input raises a clear error that names the argument
# --------------------------------------------------------------------------------------


@requires_cuda
def test_mod_block_device_mismatch():
    x = torch.randn(2, 8, 4, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="valid"):
        mod_ext.mod_block(x, torch.randn(4, device="cuda"), lambda a, p, m: a, capacity=2,
                          valid=torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_bad_args(device):
    x = torch.randn(2, 8, 4, device=device)
    rw = torch.randn(4, device=device)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        mod_ext.mod_block(x, torch.randn(5, device=device), _tanh_block)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        mod_ext.mod_block(x, torch.randn(4, 1, device=device), _tanh_block)
    with pytest.raises(ValueError, match="x must be a floating-point tensor of shape"):
        mod_ext.mod_block(x[0], rw, _tanh_block)
    with pytest.raises(ValueError, match="x must be a floating-point tensor of shape"):
        mod_ext.mod_block(x.long(), rw, _tanh_block)
    with pytest.raises(ValueError, match="routing must be 'topk' or 'causal'"):
        mod_ext.mod_block(x, rw, _tanh_block, routing="sample")
    with pytest.raises(ValueError, match="routing='threshold' was renamed to routing='causal'"):
        mod_ext.mod_block(x, rw, _tanh_block, routing="threshold")
    with pytest.raises(ValueError, match="router_activation must be one of"):
        mod_ext.mod_block(x, rw, _tanh_block, router_activation="softmax")
    with pytest.raises(ValueError, match="scores must be a tensor of shape"):
        mod_ext.mod_block(x, rw, _tanh_block, scores=torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="scores must be a tensor of shape"):
        mod_ext.mod_block(x, rw, _tanh_block, routing="causal", scores=torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="scores must be a tensor of shape"):
        mod_ext.mod_block(x, rw, _tanh_block, routing="causal", scores=[[1.0] * 8] * 2)
    with pytest.raises(ValueError, match="router_bias must be a scalar"):
        mod_ext.mod_block(x, rw, _tanh_block, router_bias=torch.zeros(2, device=device))
    for bad in ("a", [0.5], True):
        with pytest.raises(ValueError, match="router_bias must be a scalar tensor or a real number"):
            mod_ext.mod_block(x, rw, _tanh_block, router_bias=bad)
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        mod_ext.mod_block(x, rw, _tanh_block, valid=torch.ones(2, 8, device=device))
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        mod_ext.mod_block(x, rw, _tanh_block, valid=torch.ones(2, 7, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(B, S\) = \(2, 8\), got list"):
        mod_ext.mod_block(x, rw, _tanh_block, valid=[[True] * 8] * 2)
    with pytest.raises(RuntimeError, match="capacity"):
        mod_ext.mod_block(x, rw, _tanh_block, capacity=9)
    with pytest.raises(RuntimeError, match="capacity"):
        mod_ext.mod_block(x, rw, _tanh_block, capacity=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        mod_ext.mod_block(x, rw, _tanh_block, capacity_factor=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_mod_block_block_fn_wrong_shape(device):
    x = torch.randn(2, 8, 4, device=device)
    rw = torch.randn(4, device=device)
    for bad in (
        lambda xs, p, m: xs[..., :3],
        lambda xs, p, m: xs.sum(-1),
        lambda xs, p, m: torch.zeros(2, 8, 4, device=device),  # full sequence instead of slots
    ):
        with pytest.raises(ValueError, match=r"block_fn must return the update of shape \(B, C, D\)"):
            mod_ext.mod_block(x, rw, bad, capacity=3)


def test_router_aux_loss_bad_args():
    z = torch.randn(2, 8)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="router_logits must be"):
        mod_ext.router_aux_loss(z[0], idx)
    with pytest.raises(ValueError, match="indices must be"):
        mod_ext.router_aux_loss(z, idx[:1])
    with pytest.raises(ValueError, match="indices must be"):
        mod_ext.router_aux_loss(z, idx[0])
    with pytest.raises(ValueError, match="indices must be an int64"):
        mod_ext.router_aux_loss(z, idx.int())
    with pytest.raises(ValueError, match="valid must be a bool tensor of shape"):
        mod_ext.router_aux_loss(z, idx, torch.ones(2, 7, dtype=torch.bool))
    for bad in (8, -1, 100):
        out_of_range = idx.clone()
        out_of_range[1, 2] = bad
        with pytest.raises(ValueError, match=r"router_aux_loss: indices must lie in \[0, S\) = \[0, 8\)"):
            mod_ext.router_aux_loss(z, out_of_range)


def test_routing_metrics_bad_args():
    s = torch.randn(2, 8)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"routing_metrics: scores must be a floating-point tensor of shape \(B, S\)"):
        mod_ext.routing_metrics(s[0], idx, 2)
    with pytest.raises(ValueError, match="routing_metrics: scores"):
        mod_ext.routing_metrics(s.long(), idx, 2)
    with pytest.raises(ValueError, match="routing_metrics: indices must be"):
        mod_ext.routing_metrics(s, idx[0], 2)
    with pytest.raises(ValueError, match=r"routing_metrics: indices must lie in \[0, S\)"):
        mod_ext.routing_metrics(s, idx + 8, 2)
    with pytest.raises(ValueError, match="routing_metrics: valid"):
        mod_ext.routing_metrics(s, idx, 2, valid=torch.ones(2, 8))


def test_mod_block_argument_types():
    x = torch.randn(2, 8, 4)
    w = torch.randn(4)
    f = lambda xs, p, m: xs  # noqa: E731
    with pytest.raises(ValueError, match="capacity must be an int"):
        mod_ext.mod_block(x, w, f, capacity=2.5)
    with pytest.raises(ValueError, match="capacity must be an int"):
        mod_ext.mod_block(x, w, f, capacity=True)
    with pytest.raises(ValueError, match="block_fn must return the update"):
        mod_ext.mod_block(x, w, lambda xs, p, m: (xs,))
    with pytest.raises(ValueError, match="x and router_weight must be torch tensors"):
        mod_ext.mod_block(x.numpy(), w, f)
    # a plain number is a valid router bias and equals the tensor form
    a = mod_ext.mod_block(x, w, f, router_bias=0.5, capacity=3)
    b = mod_ext.mod_block(x, w, f, router_bias=torch.tensor(0.5), capacity=3)
    assert torch.equal(a.output, b.output) and torch.equal(a.router_logits, b.router_logits)
    for bad in (None, "0.5", True):
        with pytest.raises(ValueError, match="capacity_factor"):
            mod_ext.capacity_for(8, bad)
    with pytest.raises(ValueError, match="seq_len"):
        mod_ext.capacity_for(8.0, 0.5)
    with pytest.raises(ValueError, match="seq_len"):
        mod_ext.capacity_for(True, 0.5)


def test_modblock_wrong_width_and_positions():
    blk = mod_ext.MoDBlock(torch.nn.Identity(), 4)
    with pytest.raises(ValueError, match="d_model = 4"):
        blk(torch.randn(1, 8, 5))
    with pytest.raises(ValueError, match="positions must be an int64"):
        blk(torch.randn(1, 8, 4), positions=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="routing='threshold' was renamed"):
        blk(torch.randn(1, 8, 4), routing="threshold")


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=0), "d_model must be an int >= 1"),
    (dict(d_model=-4), "d_model must be an int >= 1"),
    (dict(d_model=4.0), "d_model must be an int >= 1"),
    (dict(d_model=True), "d_model must be an int >= 1"),
    (dict(max_seq_len=0), "max_seq_len must be an int >= 1 or None"),
    (dict(max_seq_len=8.5), "max_seq_len must be an int >= 1 or None"),
    (dict(predictor_hidden=0), "predictor_hidden must be an int >= 1 or None"),
])
def test_modblock_constructor_errors(kwargs, match):
    args = dict(d_model=4)
    args.update(kwargs)
    d = args.pop("d_model")
    with pytest.raises(ValueError, match=match):
        mod_ext.MoDBlock(nn.Identity(), d, **args)


def test_default_decode_capacity():
    assert mod_ext.default_decode_capacity(64, 0.125) == 16
    assert mod_ext.default_decode_capacity(8, 0.125) == 4
    assert mod_ext.default_decode_capacity(1, 0.125) == 1
    assert mod_ext.default_decode_capacity(3, 1.0) == 3
    with pytest.raises(ValueError, match="batch"):
        mod_ext.default_decode_capacity(0, 0.125)
    with pytest.raises(ValueError, match="capacity_factor"):
        mod_ext.default_decode_capacity(4, 1.5)


def test_mod_block_block_fn_and_inplace_types():
    x, rw = torch.randn(2, 8, 4), torch.randn(4)
    with pytest.raises(ValueError, match="block_fn must be callable"):
        mod_ext.mod_block(x, rw, None)
    with torch.no_grad(), pytest.raises(ValueError, match="inplace must be True or False, got 'yes'"):
        mod_ext.mod_block(x, rw, _tanh_block, inplace="yes")


# --------------------------------------------------------------------------------------
# Top-k over given scores (random routing), causal thresholds and their calibration
# --------------------------------------------------------------------------------------


def test_mod_block_topk_over_given_scores():
    """routing="topk" with scores: the top-k of the scores are routed, the router weights
    act(z) still scale them (oracle: reference.mod_block_reference's maths by hand)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    rw = torch.randn(6, generator=g, dtype=torch.float64)
    scores = torch.randn(2, 9, generator=g)
    out = mod_ext.mod_block(x, rw, _tanh_block, capacity=3, scores=scores)
    exp_idx = scores.topk(3, dim=1).indices.sort(1).values
    assert torch.equal(out.indices, exp_idx)
    z = x @ rw
    exp = x.clone()
    for b in range(2):
        sel = exp_idx[b]
        f = _tanh_block(x[b, sel][None], sel[None], torch.ones(1, 3, dtype=torch.bool))[0]
        exp[b, sel] += torch.sigmoid(z[b, sel])[:, None] * f
    assert_close(out.output, exp, "top-k over scores")


def test_random_routing_block_and_model():
    cfg = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16, random_routing=True)
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    idx = torch.randint(0, 32, (4, 16))
    a = model(idx, idx, return_routing=True)
    b = model(idx, idx, return_routing=True)
    ia, ib = a.mod_layer_outputs[0].routing.indices, b.mod_layer_outputs[0].routing.indices
    assert not torch.equal(ia, ib)  # fresh random scores per call, not the router's choice
    torch.manual_seed(1)
    c = model(idx, idx, return_routing=True).mod_layer_outputs[0].routing.indices
    torch.manual_seed(1)
    d = model(idx, idx, return_routing=True).mod_layer_outputs[0].routing.indices
    assert torch.equal(c, d)  # seeded like every torch random op
    a.loss.backward()  # gradients still reach the router through r * f
    assert model.layers[1].router_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="random_routing must be True or False"):
        ModelConfig(random_routing="yes")
    with pytest.raises(ValueError, match="random_routing must be True or False"):
        MoDBlock(nn.Linear(4, 4), 4, random_routing=1)


def test_causal_threshold_shifts_causal_routing():
    """causal_threshold moves the causal rule's cut (logit > threshold) in forward,
    prefill and decode alike; the aux loss still trains the raw logits."""
    cfg = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16)
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    layer = model.layers[1]
    x = torch.randn(3, 16, 16)
    logits = layer.causal_logits(x)
    layer.causal_threshold.fill_(0.05)
    assert_close(layer.causal_scores(x), logits - 0.05, "scores")
    out = layer(x, routing="causal")
    exp_idx, exp_mask = mod_ext.threshold_route(logits.detach() - 0.05, layer.causal_capacity(16))
    assert torch.equal(out.routing.indices, exp_idx) and torch.equal(out.routing.slot_mask, exp_mask)
    top = layer(x, routing="topk")
    assert_close(top.aux_loss, mod_ext.router_aux_loss(logits, top.routing.indices), "aux on raw logits")
    assert_close(top.causal_scores, logits.detach() - 0.05, "reported scores")
    # sampling through the KV cache follows the same rule: prefill + decode == full causal recompute
    idx = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        full = model(idx, routing="causal").logits[:, -1]
        cache = model.allocate_cache(2, 16)
        model.prefill(idx[:, :8], cache)
        for t in range(8, 12):
            last = model.decode_step(idx[:, t], cache)
    assert_close(last, full, "decode with a threshold")


@pytest.mark.parametrize("rate", [None, 0.3])
def test_calibrate_causal_threshold(rate):
    g = torch.Generator().manual_seed(3)
    layer = MoDBlock(nn.Linear(8, 8), 8, capacity_factor=0.125, max_seq_len=83)
    logits = torch.randn(5, 83, generator=g)
    valid = torch.rand(5, 83, generator=g) > 0.3
    thr = layer.calibrate_causal_threshold(logits, valid, rate)
    assert layer.causal_threshold.item() == pytest.approx(thr)
    vals = logits[valid]
    want = math.ceil((rate or 0.125) * vals.numel())
    assert int((vals > thr).sum()) == want  # exactly the rate (no ties in random data)
    assert layer.calibrate_causal_threshold(logits, None, 1.0) < logits.min()  # everything routes
    for bad, msg in ((logits[0], "logits must be a floating-point tensor of shape"),
                     (torch.full((2, 3), float("nan")), "NaN/inf")):
        with pytest.raises(ValueError, match=msg):
            layer.calibrate_causal_threshold(bad)
    with pytest.raises(ValueError, match="rate must be a number in"):
        layer.calibrate_causal_threshold(logits, rate=0.0)
    with pytest.raises(ValueError, match="no valid logits"):
        layer.calibrate_causal_threshold(logits, torch.zeros(5, 83, dtype=torch.bool))


def test_model_calibrate_causal_routing_and_state_dict():
    cfg = ModelConfig(vocab_size=32, block_size=32, n_layer=4, n_head=2, d_model=16)
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    batches = [torch.randint(0, 32, (4, 32)) for _ in range(3)]
    valid = torch.ones(4, 32, dtype=torch.bool)
    valid[:, :5] = False
    twin = MoDTransformer(cfg)
    twin.load_state_dict(model.state_dict())  # uncalibrated: its causal scores are the raw logits
    model.layers[1].causal_threshold.fill_(3.0)  # a previous calibration does not leak into the next
    thr = model.calibrate_causal_routing([batches[0], (batches[1], valid), (batches[2], None)])
    assert len(thr) == 2
    # oracle: the quantile of the layers' causal logits over the valid tokens
    with torch.no_grad():
        outs = [twin(b, routing="topk", valid=valid if i == 1 else None, return_routing=True).mod_layer_outputs
                for i, b in enumerate(batches)]
    for j, t in enumerate(thr):
        vals = torch.cat([outs[0][j].causal_scores.flatten(), outs[1][j].causal_scores[valid],
                          outs[2][j].causal_scores.flatten()])
        assert int((vals > t).sum()) == math.ceil(0.125 * vals.numel())
    # the language model itself is unchanged: logits equal the uncalibrated twin's
    with torch.no_grad():
        assert torch.equal(twin(batches[0]).logits, model(batches[0]).logits)
    sd = model.state_dict()
    twin.load_state_dict({k: v for k, v in sd.items() if not k.endswith("causal_threshold")})  # old dicts load
    assert all(float(m.causal_threshold) == 0.0 for m in twin.mod_layers)
    twin.load_state_dict(sd)
    assert [float(m.causal_threshold) for m in twin.mod_layers] == pytest.approx(thr)
    with pytest.raises(ValueError, match="batches is empty"):
        model.calibrate_causal_routing([])


def test_aux_loss_ignores_nan_at_padding():
    z = torch.randn(1, 6, generator=gen(2))
    v = torch.tensor([[True] * 4 + [False] * 2])
    idx, _ = mod_ext.topk_route(z, 2, v)
    clean = mod_ext.router_aux_loss(z, idx, v)
    z[0, 5] = float("nan")  # a padding token's logit
    assert_close(mod_ext.router_aux_loss(z, idx, v), clean, "padding NaN")


def test_calibration_failures_leave_thresholds_alone_and_odd_batches():
    cfg = ModelConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, d_model=16)
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    good = model.calibrate_causal_routing([torch.randint(0, 32, (2, 9)), torch.randint(0, 32, (3, 7))])  # T differs
    layer = model.mod_layers[0]
    assert float(layer.causal_threshold) == good[0] != 0.0
    idx = torch.randint(0, 32, (2, 9))
    for kwargs, batches, msg in ((dict(rate=1.5), [idx], "rate must be a number in"),
                                 (dict(rate=True), [idx], "rate must be a number in"),
                                 ({}, [(idx, torch.zeros(2, 9, dtype=torch.bool))], "no valid logits"),
                                 ({}, [(idx,)], "a batch must be idx"),
                                 ({}, [], "batches is empty")):
        with pytest.raises(ValueError, match=msg):
            model.calibrate_causal_routing(batches, **kwargs)
        assert float(layer.causal_threshold) == good[0], msg
    dense = MoDTransformer(ModelConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, d_model=16, mod_every=0))
    assert dense.calibrate_causal_routing([idx]) == []
    assert dense.calibrate_causal_routing([idx], return_router_thresholds=True) == ([], [])
    # the router logits' thresholds come from the same passes; oracle: their quantile
    valid = torch.rand(2, 9, generator=gen(4)) > 0.3
    thr, router_thr = model.calibrate_causal_routing([idx, (idx, valid)], rate=0.25, return_router_thresholds=True)
    assert thr == [float(layer.causal_threshold)]
    with torch.no_grad():
        z = [model(idx, return_routing=True).mod_layer_outputs[0].routing.router_logits.flatten(),
             model(idx, valid=valid, return_routing=True).mod_layer_outputs[0].routing.router_logits[valid]]
    z = torch.cat(z)
    assert router_thr == [mod_ext.calibrated_threshold(z[None], 0.25)]
    assert int((z > router_thr[0]).sum()) == math.ceil(0.25 * z.numel())


def test_causal_threshold_stays_float32():
    cfg = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16)
    model = MoDTransformer(cfg)
    model.mod_layers[0].causal_threshold.fill_(0.017357)
    model.to(torch.bfloat16)
    t = model.mod_layers[0].causal_threshold
    assert t.dtype == torch.float32 and float(t) == pytest.approx(0.017357, rel=1e-7)
    assert model.mod_layers[0].router_weight.dtype == torch.bfloat16
    model.double()
    assert model.mod_layers[0].causal_threshold.dtype == torch.float32


def test_routing_metrics_bad_capacity():
    s = torch.randn(2, 8)
    idx = torch.tensor([[0, 1], [2, 3]])
    for bad in (0, 9, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"routing_metrics: capacity must be an int in \[1, S = 8\]"):
            mod_ext.routing_metrics(s, idx, bad)


# ---------------------------------------------------------------- router aux loss: Platt scaling, gradient share

def _platt_oracle(blk, x, indices, valid):
    """Plain-PyTorch router aux loss: BCE of exp(s) * (x @ w + b - o) against top-k membership."""
    z = x @ blk.router_weight + blk.router_bias
    m = mod_ext.layer.PLATT_LR_MULT
    logits = (z - m * blk.aux_offset) * (m * blk.aux_log_scale).exp()
    tgt = torch.zeros_like(logits).scatter(1, indices, 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
    return bce[valid].mean(), logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("S", [7, 83])
def test_router_aux_platt_and_hidden_state_share(device, g, S):
    torch.manual_seed(S)
    B, D = 2, 8
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, causal_router="router",
                           max_seq_len=S, router_aux_grad_scale=g).to(device).double()
    with torch.no_grad():
        m = mod_ext.layer.PLATT_LR_MULT
        blk.aux_log_scale.fill_(math.log(2.5) / m)  # alpha = 2.5
        blk.aux_offset.fill_(0.3 / m)  # beta = 0.3
    x = torch.randn(B, S, D, device=device, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(B, S, dtype=torch.bool, device=device)
    valid[1, S // 2:] = False
    res = blk(x, valid=valid)
    params = [blk.router_weight, blk.router_bias, blk.aux_log_scale, blk.aux_offset]
    got = torch.autograd.grad(res.aux_loss, [x] + params)
    x2 = x.detach().clone().requires_grad_(True)
    exp, logits = _platt_oracle(blk, x2, res.routing.indices, valid)
    want = torch.autograd.grad(exp, [x2] + params)
    assert_close(res.aux_loss.detach(), exp.detach(), "aux loss vs Platt oracle")
    # the hidden states get g of the aux gradient; the router and the Platt parameters all of it
    assert_close(got[0], g * want[0], "aux gradient into x")
    for name, a, b in zip(("router_weight", "router_bias", "aux_log_scale", "aux_offset"), got[1:], want[1:]):
        assert_close(a, b, f"aux gradient into {name}")
    # causal routing thresholds the same Platt-scaled logits (minus the calibrated threshold)
    assert_close(res.causal_scores, logits.detach() - blk.causal_threshold.double(), "causal scores")
    assert_close(blk.causal_logits(x).detach(), logits.detach(), "causal_logits")
    # the forward output (and the LM gradient) does not depend on g
    ref = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.25, causal_router="router",
                           max_seq_len=S, router_aux_grad_scale=1.0).to(device).double()
    ref.load_state_dict(blk.state_dict())
    assert torch.equal(ref(x, valid=valid).output, res.output)


def test_router_aux_platt_gradcheck():
    torch.manual_seed(0)
    B, S, D = 2, 9, 4
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, capacity_factor=0.3, causal_router="router",
                           router_aux_grad_scale=1.0).double()
    x = torch.randn(B, S, D, dtype=torch.float64)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, -2:] = False

    def f(xx, s, o):
        blk.aux_log_scale.data, blk.aux_offset.data = s.detach(), o.detach()
        with torch.no_grad():
            idx = blk(xx.detach(), valid=valid).routing.indices  # fixed top-k (not differentiable)
        z = mod_ext.router_logits(xx, blk.router_weight, blk.router_bias)
        m = mod_ext.layer.PLATT_LR_MULT
        return mod_ext.router_aux_loss((z - m * o) * (m * s).exp(), idx, valid)

    s = torch.tensor([0.04], dtype=torch.float64, requires_grad=True)
    o = torch.tensor([0.02], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), s, o))
    # and MoDBlock's own aux loss is that function
    blk.aux_log_scale.data, blk.aux_offset.data = s.detach().clone(), o.detach().clone()
    assert_close(blk(x, valid=valid).aux_loss.detach(), f(x, s, o).detach(), "MoDBlock aux vs function")


def test_router_aux_platt_old_state_dict_and_options():
    D = 8
    blk = mod_ext.MoDBlock(TokenwiseBlock(D), D, causal_router="router")
    assert float(blk.aux_log_scale.detach()) == 0 and float(blk.aux_offset.detach()) == 0  # identity at init
    sd = {k: v for k, v in blk.state_dict().items() if not k.startswith("aux_")}
    with torch.no_grad():
        blk.aux_log_scale.fill_(1.0)
        blk.aux_offset.fill_(1.0)
    blk.load_state_dict(sd)  # a checkpoint from before Platt scaling: the identity
    assert float(blk.aux_log_scale.detach()) == 0 and float(blk.aux_offset.detach()) == 0
    pred = mod_ext.MoDBlock(TokenwiseBlock(D), D, causal_router="predictor")
    assert pred.aux_log_scale is None and "aux_offset" not in pred.state_dict()
    for bad in (-0.1, 1.5, True, "0.3", float("nan")):
        with pytest.raises(ValueError, match="router_aux_grad_scale"):
            mod_ext.MoDBlock(TokenwiseBlock(D), D, causal_router="router", router_aux_grad_scale=bad)
        with pytest.raises(ValueError, match="router_aux_grad_scale"):
            ModelConfig(router_aux_grad_scale=bad)
    assert ModelConfig(router_aux_grad_scale=1).router_aux_grad_scale == 1.0
