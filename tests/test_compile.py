"""torch.compile(fullgraph=True) traces mod_block / MoDBlock forward and backward with no
graph break, the compiled graphs match eager, and nothing on those paths syncs with the
host (MOD_SPEC section 2).

Most tests use an AOTAutograd backend that records the forward and backward graphs
(the same Dynamo + AOTAutograd tracing the default backend does, without Inductor's
slow C++ compile on small CPU machines); one test runs the default Inductor backend.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import mod_ext
from tests.helpers import DEVICES, assert_bitwise_equal, assert_close, assert_routing_equal, requires_cuda

try:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
except ImportError:  # pragma: no cover - very old torch
    aot_autograd = None

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
@pytest.mark.parametrize("routing", ["topk", "threshold", "threshold_scores"])
def test_compiled_mod_block_matches_eager(routing, device):
    x, rw, rb, valid, scores, lin, gout = _setup(device)
    route = "topk" if routing == "topk" else "threshold"
    fn = _make_fn(lin, route, routing == "threshold_scores", x.shape[1])
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
    for routing in ("topk", "threshold"):
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
        out = m(xx, valid=valid)
        loss = out.square().sum()
        if mode == "topk":
            loss = loss + blk.aux_loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in blk.named_parameters() if p.grad is not None}
        return out.detach(), xx.grad, grads, blk.aux_loss

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
@pytest.mark.parametrize("routing", ["topk", "threshold", "threshold_scores"])
def test_cuda_mod_block_does_not_sync(routing):
    x, rw, rb, valid, scores, lin, gout = _setup("cuda")
    route = "topk" if routing == "topk" else "threshold"
    fn = _make_fn(lin, route, routing == "threshold_scores", x.shape[1])
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
        (blk(x, routing=mode).sum() + (blk.aux_loss if blk.aux_loss is not None else 0)).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("topk", "causal"):
            out = blk(x, routing=mode)
            loss = out.sum() + (blk.aux_loss if blk.aux_loss is not None else 0)
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
@pytest.mark.parametrize("routing", ["topk", "threshold"])
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
