"""mod_ext.health.RouterHealth against a plain-Python oracle (loops over rows, positions
and slots): every signal of the report, with padding, several updates per interval,
the reset after a report, odd shapes (S < seq_len), float64 / bfloat16 logits, a
collapsed (dead) router, NaN/inf in each quantity raising RouterHealthError that names
the layer and the quantity (and NaN in padding not raising), no host sync in update
(a dispatch-mode op log, and a run on the meta device, where any data read fails),
the argument errors, and a real training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mod_ext
from mod_ext.health import ECE_BINS, RouterHealth, RouterHealthError
from mod_ext.layer import MoDBlockOutput, MoDOutput
from mod_ext.models import ModelConfig, MoDTransformer



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny (16-wide): one intra-op thread is faster, and on a
    loaded 2-core machine OpenMP's spinning threads made a 16x16 matmul take 14 ms.
    Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FIELDS = {
    "tokens", "routed_slots", "router_logit_mean", "router_logit_std", "router_logit_min", "router_logit_max",
    "positions_ever_routed", "positions_ever_valid", "routed_position_entropy", "causal_predicted_rate",
    "topk_rate", "calibration_gap", "causal_positive_rate", "calibration_ece", "nonfinite_router_logits",
    "nonfinite_causal_scores", "nonfinite_output",
}


# --------------------------------------------------------------------------------------
# Inputs and the oracle
# --------------------------------------------------------------------------------------


def make_output(B, S, C, D=4, *, seed=0, dtype=torch.float32, valid=None, indices=None):
    """A MoDBlockOutput-like tuple with random logits/scores/output and top-k routing
    (through mod_ext.topk_route, so padding rows get padding slots), or the given indices."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, S, generator=g, dtype=torch.float64).to(dtype)
    scores = (2 * torch.randn(B, S, generator=g, dtype=torch.float64)).to(dtype)
    out = torch.randn(B, S, D, generator=g, dtype=torch.float64).to(dtype)
    if indices is None:
        idx, mask = mod_ext.topk_route(z.float(), C, valid)
    else:
        idx = indices
        mask = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.gather(1, idx)
    w = torch.where(mask, torch.sigmoid(z.float().gather(1, idx)), 0.0)
    return MoDBlockOutput(out, None, MoDOutput(out, z, idx, mask, w), scores)


def random_valid(B, S, seed, p=0.7):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(B, S, generator=g) < p
    v[:, 0] = True
    return v


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def oracle(updates, layer, seq_len):
    """The report fields of one layer over updates = [(outputs, valid or None), ...],
    by loops over Python floats."""
    logits, probs, labels, positive = [], [], [], 0
    tokens = topk = routed = 0
    bad_z = bad_s = bad_out = out_values = 0
    counts = [0] * seq_len
    valid_pos = [False] * seq_len
    for outputs, valid in updates:
        o = outputs[layer]
        z = o.routing.router_logits.double().tolist()
        s = o.causal_scores.double().tolist()
        out = o.output.double().tolist()
        idx, mask = o.routing.indices.tolist(), o.routing.slot_mask.tolist()
        B, S = len(z), len(z[0])
        for b in range(B):
            real = {i for i, m in zip(idx[b], mask[b]) if m}
            for i, m in zip(idx[b], mask[b]):
                if m:
                    counts[i] += 1
                    routed += 1
            for t in range(S):
                if valid is not None and not bool(valid[b, t]):
                    continue
                tokens += 1
                valid_pos[t] = True
                label = 1.0 if t in real else 0.0
                topk += label
                if math.isfinite(z[b][t]):
                    logits.append(z[b][t])
                else:
                    bad_z += 1
                if math.isfinite(s[b][t]):
                    probs.append(_sigmoid(s[b][t]))
                    labels.append(label)
                    positive += s[b][t] > 0
                else:
                    bad_s += 1
                bad_out += sum(not math.isfinite(x) for x in out[b][t])
                out_values += len(out[b][t])
    r = {"tokens": tokens, "routed_slots": routed, "nonfinite_router_logits": bad_z,
         "nonfinite_causal_scores": bad_s, "nonfinite_output": bad_out, "_output_values": out_values}
    if logits:
        mean = math.fsum(logits) / len(logits)
        r.update(router_logit_mean=mean,
                 router_logit_std=math.sqrt(math.fsum((x - mean) ** 2 for x in logits) / len(logits)),
                 router_logit_min=min(logits), router_logit_max=max(logits))
    else:
        r.update(router_logit_mean=None, router_logit_std=None, router_logit_min=None, router_logit_max=None)
    r["positions_ever_routed"] = sum(c > 0 for c in counts) / seq_len
    r["positions_ever_valid"] = sum(valid_pos) / seq_len
    if routed == 0:
        r["routed_position_entropy"] = None
    elif seq_len == 1:
        r["routed_position_entropy"] = 1.0
    else:
        r["routed_position_entropy"] = -sum(c / routed * math.log(c / routed) for c in counts if c) / math.log(seq_len)
    r["topk_rate"] = topk / tokens if tokens else None
    if probs:
        pred = math.fsum(probs) / len(probs)
        r["causal_predicted_rate"] = pred
        r["causal_positive_rate"] = positive / len(probs)
        r["calibration_gap"] = pred - r["topk_rate"]
        bins = [[0, 0.0, 0.0] for _ in range(ECE_BINS)]
        for p, lab in zip(probs, labels):
            k = min(int(p * ECE_BINS), ECE_BINS - 1)
            bins[k][0] += 1
            bins[k][1] += p
            bins[k][2] += lab
        # sum over bins of (n_b / N) * |mean prob_b - mean label_b|
        r["calibration_ece"] = sum(n / len(probs) * abs(sp / n - sl / n) for n, sp, sl in bins if n)
    else:
        for k in ("causal_predicted_rate", "causal_positive_rate", "calibration_gap", "calibration_ece"):
            r[k] = None
    return r


def assert_matches(got, want, rel=1e-9, abs_=1e-12):
    assert set(got) == FIELDS
    for k in FIELDS:
        g, w = got[k], want[k]
        if w is None:
            assert g is None, (k, g)
        elif isinstance(w, int) and not isinstance(w, bool):
            assert g == w, (k, g, w)
        else:
            assert g == pytest.approx(w, rel=rel, abs=abs_), (k, g, w)


def small_model(n_layer=4, block_size=16, seed=0, **kw):
    torch.manual_seed(seed)
    return MoDTransformer(ModelConfig(vocab_size=32, block_size=block_size, n_layer=n_layer, n_head=2,
                                      d_model=16, capacity_factor=0.25, **kw))


# --------------------------------------------------------------------------------------
# Signals against the oracle
# --------------------------------------------------------------------------------------


def test_model_outputs_padded_several_updates_then_reset():
    model = small_model()
    assert model.mod_layer_ids == [1, 3]
    health = RouterHealth(model.mod_layer_ids, 16)
    updates = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(10, 13):
            idx = torch.randint(0, 32, (3, 16), generator=g)
            valid = random_valid(3, 16, seed=step)
            outs = model(idx, valid=valid, return_routing=True).mod_layer_outputs
            health.update(outs, valid=valid, step=step)
            updates.append((outs, valid))
    rep = health.report()
    assert rep["steps"] == [10, 12]
    assert set(rep["layers"]) == {"1", "3"}
    for k, lid in enumerate(model.mod_layer_ids):
        want = oracle(updates, k, 16)
        assert_matches(rep["layers"][str(lid)], want)
        assert rep["layers"][str(lid)]["tokens"] == sum(int(v.sum()) for _, v in updates)

    # reset: nothing since the report, then an interval of one update only
    assert health.report() == {"steps": None, "layers": {}}
    outs, valid = updates[1]
    health.update(outs, valid=valid)
    rep = health.report()
    assert rep["steps"] is None  # no step given
    for k, lid in enumerate(model.mod_layer_ids):
        assert_matches(rep["layers"][str(lid)], oracle([updates[1]], k, 16))


def test_valid_none_counts_every_token():
    outs = [make_output(2, 9, 3, seed=s) for s in (0, 1)]
    health = RouterHealth([0, 5], 9)
    health.update(outs, step=4)
    rep = health.report()
    assert rep["steps"] == [4, 4]
    for k, lid in enumerate([0, 5]):
        got = rep["layers"][str(lid)]
        assert_matches(got, oracle([(outs, None)], k, 9))
        assert got["tokens"] == 18 and got["routed_slots"] == 6 and got["positions_ever_valid"] == 1.0
        assert got["topk_rate"] == pytest.approx(3 / 9)


def test_odd_shapes_short_window():
    # B = 1, S = 7 < seq_len = 83: positions 7..82 are never seen
    updates = []
    health = RouterHealth([2], 83)
    for s in range(3):
        valid = random_valid(1, 7, seed=s)
        o = make_output(1, 7, 2, D=5, seed=s, valid=valid)
        health.update([o], valid=valid, step=100 + s)
        updates.append(([o], valid))
    got = health.report()["layers"]["2"]
    assert_matches(got, oracle(updates, 0, 83))
    assert got["positions_ever_routed"] <= 7 / 83
    assert got["positions_ever_valid"] <= 7 / 83


def test_seq_len_one():
    o = make_output(3, 1, 1, seed=0)
    health = RouterHealth([0], 1)
    health.update([o])
    got = health.report()["layers"]["0"]
    assert_matches(got, oracle([([o], None)], 0, 1))
    assert got["positions_ever_routed"] == 1.0 and got["routed_position_entropy"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(dtype):
    valid = random_valid(4, 12, seed=3)
    o = make_output(4, 12, 3, seed=7, dtype=dtype, valid=valid)
    assert o.routing.router_logits.dtype == dtype and o.output.dtype == dtype
    health = RouterHealth([1], 12)
    health.update([o], valid=valid)
    health.update([o], valid=valid)
    got = health.report()["layers"]["1"]
    assert_matches(got, oracle([([o], valid)] * 2, 0, 12))  # the oracle reads the same rounded values


def test_all_padding_gives_none_not_division_by_zero():
    valid = torch.zeros(2, 6, dtype=torch.bool)
    o = make_output(2, 6, 2, seed=0, valid=valid)
    assert not o.routing.slot_mask.any()
    health = RouterHealth([1], 6)
    health.update([o], valid=valid, step=0)
    got = health.report()["layers"]["1"]
    assert_matches(got, oracle([([o], valid)], 0, 6))
    assert got["tokens"] == 0 and got["router_logit_mean"] is None and got["routed_position_entropy"] is None


def test_collapsed_router():
    # A router that always routes the same positions: positions_ever_routed = C / seq_len,
    # the entropy log(C) / log(seq_len), however many updates.
    B, S, C = 4, 32, 4
    health = RouterHealth([1], S)
    updates = []
    fixed = torch.tensor([3, 9, 17, 30]).expand(B, C)
    for s in range(5):
        o = make_output(B, S, C, seed=s, indices=fixed)
        health.update([o])
        updates.append(([o], None))
    got = health.report()["layers"]["1"]
    assert_matches(got, oracle(updates, 0, S))
    assert got["positions_ever_routed"] == C / S
    assert got["routed_position_entropy"] == pytest.approx(math.log(C) / math.log(S))

    # a healthy (random) router covers almost every position over the same interval
    for s in range(5):
        health.update([make_output(B, S, C, seed=s)])
    healthy = health.report()["layers"]["1"]
    assert healthy["positions_ever_routed"] > 0.7 and healthy["routed_position_entropy"] > 0.9


def test_dead_router_real_block():
    # A zero router: every logit equal, top-k takes positions 0..C-1 of every row.
    torch.manual_seed(0)
    block = mod_ext.models.Block(ModelConfig(vocab_size=32, block_size=24, n_layer=1, n_head=2, d_model=16))
    layer = mod_ext.MoDBlock(block, 16, capacity_factor=0.25, max_seq_len=24)
    with torch.no_grad():
        layer.router_weight.zero_()
    health = RouterHealth([0], 24)
    for s in range(3):
        x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(s))
        health.update([layer(x)], step=s)
    got = health.report()["layers"]["0"]
    assert got["router_logit_std"] == 0.0 and got["router_logit_mean"] == 0.0
    assert got["positions_ever_routed"] == 6 / 24
    assert got["topk_rate"] == pytest.approx(0.25)


def test_calibration_signals():
    # A predictor that is confidently wrong: score +8 on the non-routed tokens, -8 on the routed ones.
    B, S, C = 3, 16, 4
    o = make_output(B, S, C, seed=2)
    label = torch.zeros(B, S).scatter(1, o.routing.indices, 1.0)
    scores = torch.where(label > 0, -8.0, 8.0)
    o = o._replace(causal_scores=scores)
    health = RouterHealth([1], S)
    health.update([o])
    got = health.report()["layers"]["1"]
    assert_matches(got, oracle([([o], None)], 0, S))
    assert got["calibration_ece"] > 0.99 and got["causal_positive_rate"] == 0.75
    assert got["calibration_gap"] == pytest.approx(_sigmoid(8) * 0.75 + _sigmoid(-8) * 0.25 - 0.25)
    # a perfect one (up to sigmoid(+-30) = 1 - 1e-13)
    health.update([o._replace(causal_scores=torch.where(label > 0, 30.0, -30.0).double())])
    good = health.report()["layers"]["1"]
    assert good["calibration_ece"] < 1e-12 and abs(good["calibration_gap"]) < 1e-12


# --------------------------------------------------------------------------------------
# NaN / inf
# --------------------------------------------------------------------------------------

QUANTITIES = [
    ("router_logits", "nonfinite_router_logits", "router logits"),
    ("causal_scores", "nonfinite_causal_scores", "causal scores"),
    ("output", "nonfinite_output", "hidden states output"),
]


def _inject(o, quantity, where, value):
    """A copy of o with value written at where ((b, t) tokens) into the quantity."""
    if quantity == "router_logits":
        z = o.routing.router_logits.clone()
        for b, t in where:
            z[b, t] = value
        return o._replace(routing=o.routing._replace(router_logits=z))
    if quantity == "causal_scores":
        s = o.causal_scores.clone()
        for b, t in where:
            s[b, t] = value
        return o._replace(causal_scores=s)
    out = o.output.clone()
    for b, t in where:
        out[b, t, 1] = value
    return o._replace(output=out)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("quantity,field,text", QUANTITIES, ids=[q[0] for q in QUANTITIES])
def test_nonfinite_raises_naming_layer_and_quantity(quantity, field, text, value):
    B, S, C, D = 2, 8, 2, 4
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, 6:] = False
    outs = [make_output(B, S, C, D, seed=0, valid=valid), make_output(B, S, C, D, seed=1, valid=valid)]
    health = RouterHealth([1, 3], S)
    health.update(outs, valid=valid, step=40)
    outs = [outs[0], _inject(outs[1], quantity, [(0, 2), (1, 5)], value)]  # layer 3 only
    health.update(outs, valid=valid, step=49)
    with pytest.raises(RouterHealthError) as e:
        health.report()
    msg = str(e.value)
    total = 2 * 14 * (D if quantity == "output" else 1)
    assert msg.startswith(f"mod_ext: MoD layer 3: 2 of {total} ") and text in msg and "(steps 40-49)" in msg
    assert "MoD layer 1" not in msg
    assert e.value.layer_id == 3 and e.value.quantity == field
    rep = e.value.report
    assert rep["layers"]["3"][field] == 2 and rep["layers"]["1"][field] == 0
    assert sum(rep["layers"]["3"][f] for _, f, _ in QUANTITIES) == 2
    # the finite statistics ignore the non-finite values (the first update of layer 3 was clean)
    clean = make_output(B, S, C, D, seed=1, valid=valid)
    want = oracle([([clean], valid), ([outs[1]], valid)], 0, S)
    assert want[field] == 2
    assert_matches(rep["layers"]["3"], want)
    # the state was reset before raising
    assert health.report() == {"steps": None, "layers": {}}


def test_nonfinite_first_layer_named_first_and_others_listed():
    outs = [make_output(1, 5, 1, seed=s) for s in range(3)]
    outs = [_inject(outs[0], "output", [(0, 0)], math.nan), outs[1],
            _inject(_inject(outs[2], "causal_scores", [(0, 1)], math.inf), "router_logits", [(0, 3)], math.nan)]
    health = RouterHealth([1, 3, 5], 5)
    health.update(outs)
    with pytest.raises(RouterHealthError, match=r"^mod_ext: MoD layer 1: 1 of 20 values of the hidden states "
                                                r"output are NaN/inf \(1 update since the last report\)") as e:
        health.report()
    assert "MoD layers 5 too" in str(e.value)
    assert e.value.report["layers"]["5"]["nonfinite_router_logits"] == 1
    assert e.value.report["layers"]["5"]["nonfinite_causal_scores"] == 1
    # the first quantity of a layer is named first, the others after it
    health.update([outs[1], outs[1], outs[2]], step=7)
    with pytest.raises(RouterHealthError, match=r"^mod_ext: MoD layer 5: 1 of 5 router logits are NaN/inf "
                                                r"\(step 7\); also 1 of 5 causal scores"):
        health.report()


@pytest.mark.parametrize("quantity", [q[0] for q in QUANTITIES])
def test_nonfinite_in_padding_only_does_not_raise(quantity):
    B, S, C = 2, 8, 2
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, 5:] = False
    valid[1, :2] = False
    o = make_output(B, S, C, seed=4, valid=valid)
    bad = _inject(_inject(o, quantity, [(0, 6), (1, 0)], math.nan), quantity, [(0, 7)], math.inf)
    health = RouterHealth([2], S)
    health.update([bad], valid=valid, step=1)
    got = health.report()["layers"]["2"]
    assert_matches(got, oracle([([o], valid)], 0, S))  # as if the padding were finite
    assert all(math.isfinite(v) for v in got.values() if v is not None)


# --------------------------------------------------------------------------------------
# No host sync in update
# --------------------------------------------------------------------------------------


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "unique",
            "_unique2", "argwhere", "masked_scatter", "repeat_interleave", "nonzero_static"}


def test_update_does_no_host_sync(monkeypatch):
    model = small_model()
    health = RouterHealth(model.mod_layer_ids, 16, device="cpu")
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    valid = random_valid(2, 16, seed=0)
    outs = model(idx, idx, valid=valid, return_routing=True).mod_layer_outputs  # with grad: as in training

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"update called Tensor.{name}")
        return f

    for name in ("item", "tolist", "__bool__", "nonzero", "numpy", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    log = _OpLog()
    with log:
        health.update(outs, valid=valid, step=0)
        health.update(outs, step=1)
    monkeypatch.undo()
    assert log.ops, "the dispatch mode saw no ops"
    assert not SYNC_OPS & set(log.ops), sorted(SYNC_OPS & set(log.ops))
    assert not any(t.requires_grad for t in [health._acc])  # no graph kept alive
    assert health.report()["layers"]["1"]["tokens"] == int(valid.sum()) + 32


def test_update_runs_on_meta_tensors():
    # On the meta device there is no data: any read of a value (item, bool, nonzero,
    # a boolean mask index) raises, so this passing shows update reads none.
    B, S, C, D = 3, 10, 2, 4
    m = "meta"
    o = MoDBlockOutput(
        torch.empty(B, S, D, device=m, dtype=torch.bfloat16), None,
        MoDOutput(torch.empty(B, S, D, device=m), torch.empty(B, S, device=m, dtype=torch.bfloat16),
                  torch.zeros(B, C, dtype=torch.int64, device=m), torch.ones(B, C, dtype=torch.bool, device=m),
                  torch.empty(B, C, device=m)),
        torch.empty(B, S, device=m),
    )
    health = RouterHealth([1, 2], 16, device=m)
    health.update([o, o], valid=torch.ones(B, S, dtype=torch.bool, device=m), step=0)
    health.update([o, o], step=1)
    # and a device mismatch is a clear error, found on metadata only
    cpu = make_output(B, S, C, D)
    with pytest.raises(ValueError, match=r"outputs\[layer 1\]\.routing\.router_logits is on cpu, the accumulators "
                                         r"on meta"):
        health.update([cpu, cpu])


def test_update_under_inference_mode_then_outside():
    o = make_output(2, 6, 2)
    health = RouterHealth([0], 6)  # allocated lazily, inside inference_mode
    with torch.inference_mode():
        health.update([make_output(2, 6, 2)])
    health.update([o])
    assert health.report()["layers"]["0"]["tokens"] == 24


# --------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_ids,match", [
    ("13", "layer_ids must be a sequence of ints"),
    (5, "layer_ids must be a sequence of ints"),
    ([1, True], r"layer_ids\[1\] must be an int >= 0"),
    ([1, -1], r"layer_ids\[1\] must be an int >= 0"),
    ([1.5], r"layer_ids\[0\] must be an int >= 0"),
    ([1, 1], "layer_ids must be distinct"),
])
def test_constructor_layer_ids_errors(layer_ids, match):
    with pytest.raises(ValueError, match=match):
        RouterHealth(layer_ids, 8)


@pytest.mark.parametrize("seq_len", [0, -3, 1.5, True, None, "8"])
def test_constructor_seq_len_errors(seq_len):
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        RouterHealth([1], seq_len)


def test_constructor_accepts_numpy_like_ints_and_tuples():
    health = RouterHealth((torch.tensor(3), 1), torch.tensor(8))
    assert health.layer_ids == [3, 1] and health.seq_len == 8
    with pytest.raises(ValueError, match="device must be"):
        RouterHealth([1], 8, device="not-a-device")


def test_update_errors():
    B, S, C = 2, 8, 2
    health = RouterHealth([1, 3], S)
    o = make_output(B, S, C)
    with pytest.raises(ValueError, match=r"outputs has 1 entries, but this RouterHealth tracks 2 MoD layers"):
        health.update([o])
    with pytest.raises(ValueError, match="outputs must be a sequence of MoDBlockOutput"):
        health.update(o.output)
    long = make_output(B, S + 1, C)
    with pytest.raises(ValueError, match=r"outputs\[layer 1\]\.routing\.router_logits has S = 9 > seq_len = 8"):
        health.update([long, long])
    other = make_output(B + 1, S, C)
    with pytest.raises(ValueError, match=r"outputs\[layer 3\]\.routing\.router_logits has shape \(3, 8\), but "
                                         r"the first layer's has \(2, 8\)"):
        health.update([o, other])
    bad_idx = o._replace(routing=o.routing._replace(indices=o.routing.indices.int()))
    with pytest.raises(ValueError, match=r"outputs\[layer 3\]\.routing\.indices must be an int64 tensor"):
        health.update([o, bad_idx])
    bad_mask = o._replace(routing=o.routing._replace(slot_mask=o.routing.slot_mask[:, :1]))
    with pytest.raises(ValueError, match=r"routing\.slot_mask must be a bool tensor of shape \(B, C\) = \(2, 2\)"):
        health.update([bad_mask, o])
    bad_scores = o._replace(causal_scores=o.causal_scores[:, :4])
    with pytest.raises(ValueError, match=r"causal_scores must be a floating-point tensor of shape \(B, S\)"):
        health.update([o, bad_scores])
    bad_out = o._replace(output=o.output[:, :4])
    with pytest.raises(ValueError, match=r"outputs\[layer 1\]\.output must be a floating-point tensor"):
        health.update([bad_out, o])
    with pytest.raises(ValueError, match=r"outputs\[layer 1\]\.routing\.router_logits must be"):
        health.update([None, o])
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(B, S\) = \(2, 8\)"):
        health.update([o, o], valid=torch.ones(B, S))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(B, S\) = \(2, 8\)"):
        health.update([o, o], valid=torch.ones(B, S - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        health.update([o, o], step=1.5)
    # nothing was accumulated by the failed calls
    assert health.report() == {"steps": None, "layers": {}}


def test_no_mod_layers():
    health = RouterHealth([], 8)
    assert health.report() == {"steps": None, "layers": {}}
    health.update((), step=3)
    assert health.report() == {"steps": [3, 3], "layers": {}}


# --------------------------------------------------------------------------------------
# In a training loop
# --------------------------------------------------------------------------------------


def test_training_loop_update_every_step():
    model = small_model(n_layer=4, block_size=16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    health = RouterHealth(model.mod_layer_ids, model.cfg.block_size)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]
    reports = []
    for step in range(6):
        idx = torch.randint(0, 32, (4, 16), generator=g)
        valid = torch.ones(4, 16, dtype=torch.bool)
        valid[step % 4, : step + 1] = False
        out = model(idx[:, :-1], idx[:, 1:], valid=valid[:, :-1], return_routing=True)  # S = 15 < seq_len
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        health.update(out.mod_layer_outputs, valid=valid[:, :-1], step=step)
        if step % 3 == 2:
            reports.append(health.report())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    assert [r["steps"] for r in reports] == [[0, 2], [3, 5]]
    for r in reports:
        assert set(r["layers"]) == {"1", "3"}
        for f in r["layers"].values():
            assert set(f) == FIELDS
            assert f["nonfinite_router_logits"] == f["nonfinite_causal_scores"] == f["nonfinite_output"] == 0
            assert f["topk_rate"] == pytest.approx(f["routed_slots"] / f["tokens"])
            assert 0 < f["positions_ever_routed"] <= f["positions_ever_valid"] <= 15 / 16
            assert 0 <= f["routed_position_entropy"] <= 1 and 0 <= f["calibration_ece"] <= 1
            assert f["router_logit_min"] <= f["router_logit_mean"] <= f["router_logit_max"]
