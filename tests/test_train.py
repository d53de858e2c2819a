"""Single-process tests of the training entry point (mod_ext.train), offline, on a tiny text fixture.

What is checked against what:

* the loss a step backprops (``_micro_loss`` summed over micro-batches and emulated rank
  slices) against a plain-PyTorch oracle of the global-batch loss computed from one
  full-batch forward, also its gradients, with and without padding;
* the data (``GlobalBatches``, ``_rows``), the schedule (``lr_at``) and the option checks;
* whole runs (``main``): checkpoint/resume against an uninterrupted run (bit-exact), the
  checkpoint refusals, the outputs (metrics.json against an independent computation on
  the seeded initial model, loss.png, model.pt against the DCP checkpoint), frozen
  parameters, dtypes, activation checkpointing and torch.compile against eager.

The multi-process (DDP / FSDP2) tests are in tests/test_train_dist.py.
"""

import json
import math
import shutil
import subprocess
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mod_ext import calibrated_threshold, routing_metrics
from mod_ext import data as mdata
from mod_ext import train
from mod_ext.layer import MoDBlock
from mod_ext.models import Block, ModelConfig, MoDTransformer

FIXTURE = Path(__file__).parent / "fixtures" / "tiny.txt"
BASE = ["--data", str(FIXTURE), "--quick", "--threads", "1"]
QUICK_STEPS = train.QUICK["steps"]  # 6
W_AUX = 0.1  # the default --aux-loss-weight

# float64 oracle comparisons: exact to float64 rounding for the dense model; the MoD
# model's aux loss is the predictor's BCE, which is float32 by design (MoDPredictor
# returns float32 logits, the precision routing decisions are made at), so there the
# limit is float32's. Both far below what a wrong normalisation gives (about 1e-3 in the
# loss and 1e-1 in the gradients on these batches; asserted below).
RTOL = {True: 1e-11, False: 1e-6}  # by dense


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Offline (fail loudly on any corpus download), no launcher environment, and
    main()'s global changes (torch threads, the seeded RNG) undone after each test."""

    def no_network(*args, **kwargs):
        raise AssertionError("the mod_ext.train tests must not touch the network")

    monkeypatch.setattr(mdata, "fetch_shakespeare", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setenv("MOD_EXT_CACHE", str(tmp_path / "cache"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


def run(out: Path, *extra: str, plot: bool = False) -> dict:
    """One quick single-process run into ``out``; returns its metrics (main's value,
    checked equal to metrics.json)."""
    argv = BASE + ["--out", str(out), *extra] + ([] if plot else ["--no-plot"])
    with warnings.catch_warnings():
        # DCP: "torch.distributed is disabled ... assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        # reentrant checkpointing under the evaluations' no_grad
        warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad.*")
        metrics = train.main(argv)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    return metrics


def losses(metrics: dict, key: str = "loss"):
    return [s[key] for s in metrics["steps"]]


def corpus():
    return mdata.load_corpus(str(FIXTURE), None)


def state_dict_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted quick float32 run (module-scoped: several tests compare with it)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setattr(mdata, "fetch_shakespeare", lambda *a, **k: pytest.fail("network"))
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            mp.delenv(name, raising=False)
        threads = torch.get_num_threads()
        try:
            metrics = run(out, plot=True)
        finally:
            torch.set_num_threads(threads)
    return out, metrics


# --------------------------------------------------------------------------------------
# 1. Loss normalisation: micro-batch / rank losses against the global-batch oracle
# --------------------------------------------------------------------------------------

G, T = 8, 32


def _small_model(dense: bool) -> MoDTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, block_size=T, n_layer=4, n_head=2, d_model=16, capacity_factor=0.25,
                      mod_every=0 if dense else 2, aux_loss_weight=W_AUX)
    model = MoDTransformer(cfg).double()
    with torch.no_grad():  # spread the per-token losses (at init they are all about log 256)
        model.wte.weight.mul_(30)
    return model


def _global_batch(pad: bool):
    return train.GlobalBatches(corpus().train, G, T, seed=7, pad_fraction=0.3 if pad else 0.0)(0)


def _oracle_loss(model: MoDTransformer, x, y, valid):
    """Global-batch loss from one full-batch forward, in plain PyTorch: mean CE over the
    targets != -100, plus W_AUX times the sum over MoD layers of the mean BCE of the
    layer's predictor logits against per-row top-k membership, over the valid tokens."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(model.mod_layers)]
    try:
        out = model(x, routing="topk", valid=valid, return_routing=True)
    finally:
        for h in hooks:
            h.remove()
    V = out.logits.shape[-1]
    ce = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1).clamp_min(0), reduction="none")
    target = y.reshape(-1) != -100
    loss = ce[target].sum() / target.sum()
    mask = torch.ones_like(x, dtype=torch.bool) if valid is None else valid
    for i, (layer, o) in enumerate(zip(model.mod_layers, out.mod_layer_outputs)):
        logits = layer.predictor(inputs[i]).double()  # (G, T)
        member = torch.zeros_like(logits)
        for b in range(G):
            member[b, o.routing.indices[b][o.routing.slot_mask[b]]] = 1.0
        if valid is None:  # every row routes its capacity
            assert int(member.sum()) == G * math.ceil(layer.capacity_factor * T)
        bce = F.binary_cross_entropy_with_logits(logits, member, reduction="none")
        loss = loss + W_AUX * bce[mask].sum() / mask.sum()
    return loss


def _micro_total(model, x, y, valid, accum: int, world: int):
    """What one step backprops, summed over its micro-batches and (emulated) ranks:
    each rank's _micro_loss is multiplied by W (DDP/FSDP2 average), so divide back."""
    n_targets = int((y != -100).sum())
    n_valid = x.numel() if valid is None else int(valid.sum())
    args = types.SimpleNamespace(dtype="float64")
    total = 0
    for m in range(accum):
        for r in range(world):
            env = train.DistEnv("ddp", rank=r, world_size=world)
            xs, ys, vs = (train._rows(t, m, accum, r, world) for t in (x, y, valid))
            loss, lm_sum, aux_sum = train._micro_loss(model, xs, ys, vs, "topk", n_targets, n_valid, W_AUX,
                                                      args, env)
            assert (aux_sum is None) == (not model.mod_layers)
            total = total + loss / world
    return total


def _naive_mean_of_means(model, x, y, valid, world: int = 4):
    """A per-rank mean averaged over ranks: wrong when the slices hold different counts."""
    return sum(model(*(train._rows(t, 0, 1, r, world) for t in (x, y)),
                     valid=train._rows(valid, 0, 1, r, world)).loss for r in range(world)) / world


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _worst_grad_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)) for n in want)


@pytest.mark.parametrize("pad", [False, True], ids=["no-pad", "pad"])
@pytest.mark.parametrize("dense", [False, True], ids=["mod", "dense"])
def test_micro_losses_sum_to_the_global_batch_loss(dense, pad):
    model = _small_model(dense)
    x, y, valid = _global_batch(pad)
    oracle = _oracle_loss(model, x, y, valid).detach().item()
    # the oracle is the model's own global-batch loss definition (which takes the BCE in float32)
    assert oracle == pytest.approx(model(x, y, valid=valid).loss.detach().item(), rel=1e-7)
    want = _grads(model, lambda: _oracle_loss(model, x, y, valid))
    assert set(want) == {n for n, _ in model.named_parameters()}  # every parameter gets a gradient
    for accum, world in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (4, 2), (8, 1)]:
        ctx = f"grad_accum {accum}, world_size {world}"
        total = _micro_total(model, x, y, valid, accum, world).detach().item()
        assert total == pytest.approx(oracle, rel=RTOL[dense]), ctx
        got = _grads(model, lambda: _micro_total(model, x, y, valid, accum, world))
        assert _worst_grad_error(got, want) < RTOL[dense], ctx
    if pad:
        # The slices hold different token counts, so a per-rank mean averaged over ranks
        # is a different loss: the comparison above can tell the two apart.
        counts = [int((train._rows(y, 0, 1, r, 4) != -100).sum()) for r in range(4)]
        assert len(set(counts)) > 1, counts
        naive = _naive_mean_of_means(model, x, y, valid).detach().item()
        assert abs(naive - oracle) > 100 * RTOL[False] * oracle
        assert _worst_grad_error(_grads(model, lambda: _naive_mean_of_means(model, x, y, valid)), want) \
            > 100 * RTOL[False]


def test_micro_loss_is_float64_for_a_float64_model():
    model = _small_model(dense=True)
    x, y, valid = _global_batch(pad=True)
    loss, lm_sum, _ = train._micro_loss(model, x, y, valid, "topk", int((y != -100).sum()), int(valid.sum()),
                                        W_AUX, types.SimpleNamespace(dtype="float64"), train.DistEnv("none"))
    assert lm_sum.dtype == torch.float64
    assert loss.detach().item() == pytest.approx(_oracle_loss(model, x, y, valid).detach().item(), rel=1e-12)


# --------------------------------------------------------------------------------------
# 2. GlobalBatches and _rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_fraction", [0.0, 0.3])
def test_global_batches_are_a_function_of_the_step(pad_fraction):
    data = corpus().train
    a = train.GlobalBatches(data, 8, 16, seed=3, pad_fraction=pad_fraction)
    b = train.GlobalBatches(data, 8, 16, seed=3, pad_fraction=pad_fraction)
    for step in (0, 5, 5, 0):  # any order, any instance
        for ta, tb in zip(a(step), b(step)):
            assert (ta is None and tb is None) or torch.equal(ta, tb)
    x, y, valid = a(0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert (valid is None) == (pad_fraction == 0)
    assert not torch.equal(a(0)[0], a(1)[0])
    assert not torch.equal(a(0)[0], train.GlobalBatches(data, 8, 16, seed=4, pad_fraction=pad_fraction)(0)[0])


def test_global_batches_padding():
    data = corpus().train
    F_, Tlen, steps = 0.3, 20, 12
    max_pad = math.floor(F_ * Tlen)  # 6
    plain = train.GlobalBatches(data, 16, Tlen, seed=5)
    padded = train.GlobalBatches(data, 16, Tlen, seed=5, pad_fraction=F_)
    seen = []
    for step in range(steps):
        x0, y0, none = plain(step)
        x, y, valid = padded(step)
        assert none is None and valid.dtype == torch.bool and valid.shape == x.shape
        n_pad = (~valid).sum(1)
        seen += n_pad.tolist()
        # left padding: False for the first n_pad[b] positions, then True
        assert torch.equal(valid, torch.arange(Tlen)[None, :] >= n_pad[:, None])
        assert (x[~valid] == 0).all() and (y[~valid] == -100).all()
        # the valid tokens are the unpadded windows' tokens
        assert torch.equal(x[valid], x0[valid]) and torch.equal(y[valid], y0[valid])
        assert torch.equal(y[:, :-1][valid[:, 1:] & valid[:, :-1]], x[:, 1:][valid[:, 1:] & valid[:, :-1]])
    assert max(seen) == max_pad and min(seen) == 0  # at most floor(F T) per row, and that bound is reached


def test_global_batches_refuse_a_too_short_stream():
    with pytest.raises(ValueError, match="too short for --seq-len 16"):
        train.GlobalBatches(torch.zeros(16, dtype=torch.uint8), 2, 16, seed=0)
    x, y, _ = train.GlobalBatches(torch.arange(17, dtype=torch.uint8), 2, 16, seed=0)(0)  # one window fits
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[0], torch.arange(1, 17))


@pytest.mark.parametrize("accum,world", [(1, 1), (1, 4), (4, 1), (2, 2), (2, 4), (8, 1), (1, 8)])
def test_rows_partition_the_global_batch(accum, world):
    t = torch.arange(8 * 3).view(8, 3)
    slices = [train._rows(t, m, accum, r, world) for m in range(accum) for r in range(world)]
    assert all(s.shape == (8 // (accum * world), 3) for s in slices)
    assert torch.equal(torch.cat(slices), t)  # micro-batch-major, then rank: each row exactly once
    assert train._rows(None, 0, accum, 0, world) is None


# --------------------------------------------------------------------------------------
# 3. The learning-rate schedule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_lr_at_warmup_and_decay(warmup):
    steps, lr, min_lr = 20, 1e-2, 1e-3
    for s in range(warmup):
        assert train.lr_at(s, steps, lr, min_lr, warmup) == pytest.approx(lr * (s + 1) / warmup, rel=1e-12)
    for schedule in ("cosine", "linear", "constant"):
        after = [train.lr_at(s, steps, lr, min_lr, warmup, schedule) for s in range(warmup, steps)]
        assert after[0] == pytest.approx(lr, rel=1e-12), schedule  # decay starts at the peak
        if schedule == "constant":
            assert after == [lr] * len(after)
            continue
        assert all(a >= b for a, b in zip(after, after[1:])), schedule  # non-increasing
        assert all(min_lr <= a <= lr * (1 + 1e-12) for a in after), schedule
        assert after[-1] < after[0], schedule
    lin = [train.lr_at(s, steps, lr, min_lr, warmup, "linear") for s in range(warmup, steps)]
    # linear: equal decrements; cosine: the cosine of the same decay fraction t
    assert all(abs((a - b) - (lin[0] - lin[1])) < 1e-12 for a, b in zip(lin, lin[1:]))
    for s, v in zip(range(warmup, steps), lin):
        t = 1 - (v - min_lr) / (lr - min_lr)
        want = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        assert train.lr_at(s, steps, lr, min_lr, warmup, "cosine") == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_lr_at_defaults():
    for steps in (6, 10, 95):
        for s in range(steps):
            assert train.lr_at(s, steps, 3e-3) == train.lr_at(s, steps, 3e-3, 3e-3 / 10, max(1, steps // 10), "cosine")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_at_ends_at_min_lr(schedule):
    assert train.lr_at(19, 20, 1e-2, 1e-3, 2, schedule) == pytest.approx(1e-3, rel=1e-12)


# --------------------------------------------------------------------------------------
# 4. Option errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,env,message", [
    (["--dist", "mpi"], {}, "argument --dist: invalid choice: 'mpi'"),
    (["--dist", "ddp"], {}, "--dist ddp needs a launcher: torchrun"),
    (["--dist", "fsdp2"], {}, "(WORLD_SIZE is not set)"),
    ([], {"WORLD_SIZE": "2"}, "launched on 2 processes (WORLD_SIZE) with --dist none"),
    (["--batch-size", "5", "--grad-accum", "2"], {}, "--batch-size 5 is not a multiple of --grad-accum 2"),
    (["--capacity-factor", "0"], {}, "--capacity-factor must be in (0, 1], got 0.0"),
    (["--capacity-factor", "1.5"], {}, "--capacity-factor must be in (0, 1], got 1.5"),
    (["--flops", "1000"], {}, "--flops 1e+03 buys no step"),
    (["--stop-at", "0"], {}, f"--stop-at must be in [1, --steps = {QUICK_STEPS}], got 0"),
    (["--stop-at", "7"], {}, f"--stop-at must be in [1, --steps = {QUICK_STEPS}], got 7"),
    (["--pad-fraction", "1"], {}, "--pad-fraction must be in [0, 1), got 1.0"),
    (["--data", "/nonexistent/corpus.txt"], {}, "--data /nonexistent/corpus.txt: no such file"),
    (["--flops", "1e12", "--steps", "3"], {}, "--flops and --steps both set the number of steps"),
    (["--resume", "/nonexistent/ckpt"], {}, "--resume /nonexistent/ckpt: no such directory"),
], ids=["dist-choice", "ddp-no-launcher", "fsdp2-no-launcher", "world-size-dist-none", "batch-accum",
        "capacity-0", "capacity-1.5", "flops", "stop-at-0", "stop-at-7", "pad-fraction", "data", "flops-and-steps",
        "resume-missing"])
def test_option_errors_name_the_option(argv, env, message, monkeypatch, capsys, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(BASE + ["--out", str(out), "--no-plot"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()  # nothing started


def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as e:
            train.main(BASE + ["--out", str(out), "--no-plot"])
        assert e.value.code == 2 and f"{f} is not a directory" in capsys.readouterr().err


def test_a_split_too_short_for_the_windows_names_it(tmp_path):
    """tiny.txt's validation split (its last 10%, 390 bytes) cannot hold a 400-token
    window: the error names the split and the longest --seq-len that works, and nothing is
    written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"the validation split .* has 390 tokens.*use --seq-len 389 or less"):
        run(out, "--seq-len", "400")
    assert not out.exists()


def test_flops_budget_sets_the_steps():
    args = train.parse_args(BASE)
    per_step = 3 * MoDTransformer(train.model_config(args, 256)).flops_per_token(args.seq_len) \
        * args.batch_size * args.seq_len
    assert train.parse_args(BASE + ["--flops", str(4.5 * per_step)]).steps == 4


# --------------------------------------------------------------------------------------
# 5. Checkpoints and resume (one process)
# --------------------------------------------------------------------------------------


def _without_times(records):
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in records]


def test_resume_equals_an_uninterrupted_run(reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "split"
    first = run(out, "--stop-at", "3")
    assert [s["step"] for s in first["steps"]] == [1, 2, 3]
    assert train.latest_checkpoint(out) == out / "checkpoints" / "step_00000003"
    assert not (out / "model.pt").exists()  # the run is not finished
    second = run(out, "--resume")
    assert second["resumed_from"]["step"] == 3 and second["final_step"] == QUICK_STEPS
    assert [s["step"] for s in second["steps"]] == list(range(1, QUICK_STEPS + 1))
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
        assert losses(second, key) == losses(ref, key), key  # bit-exact
    assert _without_times(second["steps"]) == _without_times(ref["steps"])
    ref_evals = {e["step"]: e["val_loss"] for e in ref["evals"]}
    assert all(ref_evals[e["step"]] == e["val_loss"] for e in second["evals"])
    assert second["causal_val_loss"] == ref["causal_val_loss"]
    got, want = state_dict_of(out / "model.pt"), state_dict_of(ref_out / "model.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_split_run_records_the_same_evaluations(reference, tmp_path):
    out = tmp_path / "split"
    run(out, "--stop-at", "3")
    assert [e["step"] for e in run(out, "--resume")["evals"]] == [e["step"] for e in reference[1]["evals"]]


@pytest.fixture
def stopped(tmp_path):
    """A run stopped (with a checkpoint) after step 3 of 6."""
    out = tmp_path / "stopped"
    run(out, "--stop-at", "3")
    return out


@pytest.mark.parametrize("change,name", [(["--lr", "1e-3"], "--lr"), (["--seq-len", "32"], "--seq-len"),
                                         (["--pad-fraction", "0.2"], "--pad-fraction"), (["--dense"], "--dense")])
def test_resume_refuses_another_configuration(stopped, change, name):
    with pytest.raises(SystemExit, match="checkpoint of another configuration") as e:
        run(stopped, "--resume", *change)
    assert f"{name} " in str(e.value) and "in the checkpoint vs" in str(e.value)


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--resume: no complete checkpoint in"):
        run(tmp_path / "empty", "--resume")


def test_resume_auto(reference, tmp_path):
    """--resume auto starts a fresh run where there is no checkpoint and continues one
    where there is (a requeued job runs the same command again)."""
    out = tmp_path / "auto"
    first = run(out, "--resume", "auto", "--stop-at", "3")
    assert first["resumed_from"] is None and [s["step"] for s in first["steps"]] == [1, 2, 3]
    second = run(out, "--resume", "auto")
    assert second["resumed_from"]["step"] == 3
    assert losses(second) == losses(reference[1])


def test_resume_auto_of_a_finished_run_is_a_no_op(reference, tmp_path, capsys):
    """A requeued job whose run already finished exits cleanly with the run's metrics."""
    out = tmp_path / "done"
    shutil.copytree(reference[0], out)
    again = run(out, "--resume", "auto")
    assert again == json.loads((reference[0] / "metrics.json").read_text())
    assert "already finished" in capsys.readouterr().out


def test_resume_compares_the_data_by_content(tmp_path):
    """The same text under another path resumes; other text under the same path is
    refused (a path string alone would get both wrong)."""
    text = tmp_path / "text.txt"
    shutil.copy(FIXTURE, text)
    out = tmp_path / "run"
    argv = ["--stop-at", "3"]
    train.main(["--data", str(text), "--quick", "--threads", "1", "--no-plot", "--out", str(out)] + argv)
    copy = tmp_path / "elsewhere" / "copy.txt"
    copy.parent.mkdir()
    shutil.copy(FIXTURE, copy)
    text.write_text(FIXTURE.read_text()[::-1])  # other content, same path
    with pytest.raises(SystemExit, match=r"another configuration: the data \(SHA-256"):
        train.main(["--data", str(text), "--quick", "--threads", "1", "--no-plot", "--out", str(out), "--resume"])
    resumed = train.main(["--data", str(copy), "--quick", "--threads", "1", "--no-plot", "--out", str(out),
                          "--resume"])
    assert resumed["resumed_from"]["step"] == 3 and resumed["final_step"] == QUICK_STEPS


def test_resume_with_another_grad_accum_continues_the_run(reference, tmp_path):
    """Gradient accumulation does not change the step's gradient (the loss is normalised by
    the global batch), so a resume may change it, e.g. to fit fewer devices."""
    out = tmp_path / "accum"
    run(out, "--stop-at", "3")
    second = run(out, "--resume", "--grad-accum", "2")
    assert losses(second) == pytest.approx(losses(reference[1]), rel=1e-5)


def test_a_fresh_run_refuses_an_out_with_checkpoints(stopped):
    """Starting over in a directory that holds another run's checkpoints would mix the two
    runs' checkpoints (and a later --resume could pick the other run's)."""
    with pytest.raises(SystemExit, match="already holds checkpoints of a run .*step_00000003.*--resume"):
        run(stopped)


def test_resume_ignores_and_refuses_unfinished_checkpoints(stopped):
    root = stopped / "checkpoints"
    good = root / "step_00000003"
    crashed = root / "step_00000009.tmp"  # a save that crashed before its rename
    shutil.copytree(good, crashed)  # even with every file in it
    no_meta = root / "step_00000005"  # a directory without DCP's .metadata
    shutil.copytree(good, no_meta)
    (no_meta / ".metadata").unlink()
    no_state = root / "step_00000004"  # one without train_state.json
    shutil.copytree(good, no_state)
    (no_state / "train_state.json").unlink()
    assert train.latest_checkpoint(stopped) == good
    for bad in (crashed, no_meta, no_state):
        with pytest.raises(SystemExit, match="not a complete checkpoint"):
            run(stopped, "--resume", str(bad))
    assert run(stopped, "--resume")["resumed_from"]["path"] == str(good)


def test_resume_refuses_a_finished_run_and_an_early_stop_at(tmp_path, stopped):
    with pytest.raises(SystemExit, match="--stop-at 3: the checkpoint is already at step 3"):
        run(stopped, "--resume", "--stop-at", "3")
    run(stopped, "--resume")
    with pytest.raises(SystemExit, match=f"the run already finished \\({QUICK_STEPS} of {QUICK_STEPS} steps\\)"):
        run(stopped, "--resume")


def test_keep_limits_the_checkpoints(tmp_path):
    out = tmp_path / "keep"
    run(out, "--save-every", "1", "--keep", "1", "--eval-batches", "0")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{QUICK_STEPS:08d}"]
    out2 = tmp_path / "keep2"
    run(out2, "--save-every", "2", "--keep", "2", "--eval-batches", "0")
    assert sorted(p.name for p in (out2 / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    state = json.loads((out2 / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["step"] == 4 and state["format"] == train.CHECKPOINT_FORMAT and state["config"]["lr"] == 3e-3


def test_a_save_every_checkpoint_holds_every_step(tmp_path):
    out = tmp_path / "run"
    run(out, "--save-every", "2", "--keep", "3", "--eval-batches", "0")
    state = json.loads((out / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert [s["step"] for s in state["steps_log"]] == [1, 2, 3, 4]
    resumed = run(tmp_path / "other", "--resume", str(out / "checkpoints" / "step_00000004"), "--eval-batches", "0")
    assert [s["step"] for s in resumed["steps"]] == list(range(1, QUICK_STEPS + 1))


# --------------------------------------------------------------------------------------
# 6. Outputs
# --------------------------------------------------------------------------------------


def test_metrics_against_the_initial_model(reference):
    """Step 1's recorded losses and gradient norm, and the step-0 evaluation, recomputed
    on the seeded initial model and the step's global batch."""
    out, metrics = reference
    args = train.parse_args(BASE)
    c = corpus()
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == list(range(1, QUICK_STEPS + 1))
    for s in steps:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "step_time_s"):
            assert math.isfinite(s[key]), (s["step"], key)
        assert s["tokens"] == args.batch_size * args.seq_len
        assert s["lr"] == train.lr_at(s["step"] - 1, args.steps, args.lr, args.min_lr, args.warmup, args.schedule)
        assert s["loss"] == pytest.approx(s["lm_loss"] + W_AUX * s["aux_loss"], rel=1e-12)
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"]  # it learns
    assert metrics["tokens_per_s"] > 0 and metrics["final_step"] == QUICK_STEPS
    assert [e["step"] for e in metrics["evals"]] == [0, 3, 6]
    assert all(math.isfinite(e["val_loss"]) for e in metrics["evals"])
    for key in ("causal_val_loss", "causal_accuracy", "causal_recall", "causal_precision", "causal_routed_fraction"):
        assert math.isfinite(metrics[key]), key
    cfg = metrics["config"]
    assert cfg["world_size"] == 1 and cfg["frozen"] == [] and cfg["corpus"] == "tiny.txt"

    torch.manual_seed(args.seed)
    model = MoDTransformer(train.model_config(args, 256))
    x, y, _ = train.GlobalBatches(c.train, args.batch_size, args.seq_len, args.seed)(0)
    o = model(x, y)
    assert steps[0]["lm_loss"] == pytest.approx(o.lm_loss.item(), rel=1e-5)
    assert steps[0]["aux_loss"] == pytest.approx(o.aux_loss.item(), rel=1e-5)
    o.loss.backward()
    # clipped in two groups: the language model, and the predictors (which must not scale its update)
    lm = [p.grad.norm() for n, p in model.named_parameters() if ".predictor." not in n]
    pred = [p.grad.norm() for n, p in model.named_parameters() if ".predictor." in n]
    assert steps[0]["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(torch.stack(lm))), rel=1e-4)
    assert steps[0]["predictor_grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(torch.stack(pred))),
                                                            rel=1e-4)
    with torch.no_grad():
        val = train.GlobalBatches(c.val, args.batch_size, args.seq_len, args.seed + 1)
        model.eval()
        want = sum(float(model(*val(i)[:2]).lm_loss) for i in range(args.eval_batches)) / args.eval_batches
    assert metrics["evals"][0]["val_loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("every,evals", [("2", [0, 2, 4, 6]), ("4", [0, 4, 6]), ("0", [0, 6])])
def test_evaluation_steps(tmp_path, every, evals):
    assert [e["step"] for e in run(tmp_path / "run", "--eval-every", every)["evals"]] == evals


def test_loss_plot(reference, tmp_path):
    out, _ = reference
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    run(tmp_path / "noplot", "--eval-batches", "0")
    assert not (tmp_path / "noplot" / "loss.png").exists()


def test_load_model_equals_the_last_checkpoint(reference):
    import torch.distributed.checkpoint as dcp

    out, _ = reference
    model = train.load_model(out / "model.pt")
    assert isinstance(model, MoDTransformer) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    fresh = MoDTransformer(train.model_config(train.parse_args(BASE), 256))
    sd = fresh.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"model": sd}, checkpoint_id=str(train.latest_checkpoint(out)))
    assert train.latest_checkpoint(out).name == f"step_{QUICK_STEPS:08d}"
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    assert not torch.equal(sd["wte.weight"], MoDTransformer(fresh.cfg).state_dict()["wte.weight"])  # trained
    idx = torch.tensor([list(b"To be")])
    sample = model.generate(idx, 8, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (1, 13) and sample.dtype == torch.int64 and torch.equal(sample[:, :5], idx)


def test_load_model_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {}}, path)
    with pytest.raises(ValueError, match="is not a model saved by mod_ext.train"):
        train.load_model(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="is not a model saved by mod_ext.train"):
        train.load_model(path)


# --------------------------------------------------------------------------------------
# 7. Frozen parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,frozen", [
    ([], False), (["--aux-loss-weight", "0"], True), (["--routing", "causal"], True),
    (["--dense", "--aux-loss-weight", "0"], False), (["--causal-router", "router", "--aux-loss-weight", "0"], False),
    (["--causal-router", "router"], False),
])
def test_frozen_parameters(extra, frozen):
    args = train.parse_args(BASE + extra)
    model = MoDTransformer(train.model_config(args, 256))
    predictors = [n for n, _ in model.named_parameters() if ".predictor." in n]
    assert train.frozen_parameters(model, args) == (predictors if frozen else [])
    if frozen:
        assert len(predictors) == 4 * len(model.mod_layers) > 0


@pytest.mark.parametrize("extra", [["--aux-loss-weight", "0"], ["--routing", "causal"]], ids=["aux-0", "causal"])
def test_frozen_predictor_is_not_trained(tmp_path, extra):
    out = tmp_path / "run"
    metrics = run(out, *extra, "--eval-batches", "0")
    args = train.parse_args(BASE + extra)
    torch.manual_seed(args.seed)
    init = MoDTransformer(train.model_config(args, 256)).state_dict()
    final = state_dict_of(out / "model.pt")
    predictors = [k for k in init if ".predictor." in k]
    assert predictors and metrics["config"]["frozen"] == predictors
    for k in predictors:
        assert torch.equal(final[k], init[k]), k
    for k in ("layers.1.router_weight", "layers.1.block.attn.qkv.weight", "wte.weight"):
        assert not torch.equal(final[k], init[k]), k
    assert all(math.isfinite(v) for v in losses(metrics))


# --------------------------------------------------------------------------------------
# 8. Dtypes, activation checkpointing, torch.compile
# --------------------------------------------------------------------------------------


def test_float64_and_bfloat16_runs(reference, tmp_path):
    _, ref = reference
    f64 = run(tmp_path / "f64", "--dtype", "float64", "--eval-batches", "0")
    assert next(train.load_model(tmp_path / "f64" / "model.pt").parameters()).dtype == torch.float64
    bf16 = run(tmp_path / "bf16", "--dtype", "bfloat16", "--eval-batches", "0")
    assert next(train.load_model(tmp_path / "bf16" / "model.pt").parameters()).dtype == torch.float32
    for m in (f64, bf16):
        assert len(m["steps"]) == QUICK_STEPS and all(math.isfinite(v) for v in losses(m) + losses(m, "grad_norm"))
    assert losses(f64) == pytest.approx(losses(ref), rel=1e-4)
    assert losses(bf16)[:3] == pytest.approx(losses(ref)[:3], rel=0.02)
    assert losses(bf16) != losses(ref)  # autocast did something


@pytest.mark.parametrize("impl", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_changes_nothing(tmp_path, impl):
    plain = run(tmp_path / "plain", "--dtype", "float64", "--eval-batches", "0")
    ckpt = run(tmp_path / impl, "--dtype", "float64", "--eval-batches", "0", "--activation-checkpointing", impl)
    for key in ("loss", "grad_norm"):
        assert losses(ckpt, key) == pytest.approx(losses(plain, key), rel=1e-12, abs=1e-12), key
    got, want = state_dict_of(tmp_path / impl / "model.pt"), state_dict_of(tmp_path / "plain" / "model.pt")
    assert got.keys() == want.keys()  # checkpoint wrappers leave the state-dict keys alone
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


def test_compile_aot_eager_equals_eager(reference, tmp_path):
    _, ref = reference
    compiled = run(tmp_path / "compiled", "--compile", "aot_eager")
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
        assert losses(compiled, key) == pytest.approx(losses(ref, key), rel=2e-5), key
    assert [e["val_loss"] for e in compiled["evals"]] == pytest.approx([e["val_loss"] for e in ref["evals"]],
                                                                        rel=2e-5)


# --------------------------------------------------------------------------------------
# 9. router_bias: (1,) now, old 0-d state dicts still load
# --------------------------------------------------------------------------------------


def test_old_0d_router_bias_state_dicts_load():
    cfg = ModelConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, d_model=16)
    layer = MoDBlock(Block(cfg), 16, max_seq_len=16)
    assert layer.router_bias.shape == (1,)
    sd = layer.state_dict()
    sd["router_bias"] = torch.tensor(0.75)  # as saved before the change
    layer.load_state_dict(sd)  # strict
    assert layer.router_bias.shape == (1,) and layer.router_bias.item() == 0.75
    assert sd["router_bias"].dim() == 0  # the caller's dict is left alone
    model = MoDTransformer(cfg)
    msd = model.state_dict()
    msd["layers.1.router_bias"] = torch.tensor(-0.5)
    model.load_state_dict(msd)
    assert model.layers[1].router_bias.shape == (1,) and model.layers[1].router_bias.item() == -0.5
    with pytest.raises(RuntimeError, match="router_bias"):  # other shapes are still refused
        layer.load_state_dict({**sd, "router_bias": torch.zeros(2)})


# --------------------------------------------------------------------------------------
# 10. Causal routing quality (calibration), router health, random routing (issue 12)
# --------------------------------------------------------------------------------------


def test_calibrated_causal_metrics_against_the_saved_model(reference):
    """The final causal thresholds are calibrated on training batches and saved with the
    model; the recorded causal metrics equal routing_metrics recomputed on the loaded
    model (oracle), for the calibrated rule, threshold 0 and the router logits."""
    out, metrics = reference
    args = train.parse_args(BASE)
    model = train.load_model(out / "model.pt")
    thr = [float(m.causal_threshold) for m in model.mod_layers]
    assert thr == pytest.approx(metrics["causal_thresholds"]) and any(t != 0.0 for t in thr)
    c = corpus()
    cal = train.GlobalBatches(c.train, args.batch_size, args.seq_len, args.seed + 2)
    twin = MoDTransformer(model.cfg)
    twin.load_state_dict(model.state_dict())
    assert twin.calibrate_causal_routing([cal(i)[0] for i in range(args.calibrate_batches)]) == pytest.approx(thr)
    val = train.GlobalBatches(c.val, args.batch_size, args.seq_len, args.seed + 1)
    sums = {"": [], "_uncalibrated": [], "_router_logits": []}
    with torch.no_grad():
        router = [[] for _ in thr]
        for i in range(args.calibrate_batches):
            for j, o in enumerate(model(cal(i)[0], return_routing=True).mod_layer_outputs):
                router[j].append(o.routing.router_logits)
        router_thr = [mod_ext_calibrated(torch.cat(z)) for z in router]
        for i in range(args.eval_batches):
            outs = model(val(i)[0], return_routing=True).mod_layer_outputs
            for j, (m, o) in enumerate(zip(model.mod_layers, outs)):
                K = m.causal_capacity(args.seq_len)
                for rule, s in (("", o.causal_scores), ("_uncalibrated", o.causal_scores + thr[j]),
                                ("_router_logits", o.routing.router_logits - router_thr[j])):
                    sums[rule].append(mod_ext_metrics(s, o.routing.indices, K))
    for rule, ms in sums.items():
        got = metrics[f"causal_routing{rule}"]
        for k in ("accuracy", "recall", "precision", "routed_fraction"):
            assert got[k] == pytest.approx(sum(float(getattr(m, k)) for m in ms) / len(ms), abs=1e-6), (rule, k)
        assert set(got["per_layer"]) == {str(d) for d in model.mod_layer_ids}
    assert metrics["causal_recall"] == metrics["causal_routing"]["recall"]
    with torch.no_grad():
        want = sum(float(model(*val(i)[:2], routing="causal").lm_loss) for i in range(args.eval_batches))
    assert metrics["causal_val_loss"] == pytest.approx(want / args.eval_batches, rel=1e-5)


def mod_ext_calibrated(z):
    return calibrated_threshold(z, 0.125)


def mod_ext_metrics(s, idx, K):
    return routing_metrics(s.float(), idx, K)


def test_no_calibration_keeps_threshold_zero(tmp_path):
    m = run(tmp_path / "run", "--calibrate-batches", "0")
    assert "causal_thresholds" not in m and "causal_routing_router_logits" not in m
    assert m["causal_routing"] == {**m["causal_routing_uncalibrated"]}
    model = train.load_model(tmp_path / "run" / "model.pt")
    assert all(float(x.causal_threshold) == 0.0 for x in model.mod_layers)


def test_predictor_does_not_change_the_language_model(tmp_path):
    """Stop-gradient and its own clipping group: the predictor's loss weight changes the
    predictor only; every LM loss and LM gradient norm is bit-identical."""
    a = run(tmp_path / "a", "--aux-loss-weight", "0.1", "--grad-clip", "0.05")
    b = run(tmp_path / "b", "--aux-loss-weight", "10", "--grad-clip", "0.05")
    assert losses(a, "lm_loss") == losses(b, "lm_loss") and losses(a, "grad_norm") == losses(b, "grad_norm")
    assert [e["val_loss"] for e in a["evals"]] == [e["val_loss"] for e in b["evals"]]
    assert losses(a, "predictor_grad_norm") != losses(b, "predictor_grad_norm")


def test_router_health_in_metrics(reference):
    _, metrics = reference
    health = metrics["health"]
    assert health and health[-1]["steps"][1] == QUICK_STEPS
    layers = health[-1]["layers"]
    assert set(layers) == {"1"}
    h = layers["1"]
    assert math.isfinite(h["router_logit_mean"]) and h["router_logit_std"] > 0
    assert 0 < h["positions_ever_routed"] <= 1 and 0 <= h["calibration_ece"] <= 1
    assert h["nonfinite_router_logits"] == h["nonfinite_output"] == 0


def test_nan_router_stops_training_naming_the_layer(tmp_path, monkeypatch):
    """A router gone NaN (here: injected from the third forward on) stops the run at the
    next logging interval with an error naming the MoD layer, not a silent NaN loss."""
    import mod_ext.layer as L
    calls = {"n": 0}
    real = L._router_logits

    def nan_after_two(x, w, b=None):
        calls["n"] += 1
        z = real(x, w, b)
        return z * float("nan") if calls["n"] > 2 else z
    monkeypatch.setattr(L, "_router_logits", nan_after_two)
    with pytest.raises(SystemExit, match=r"MoD layer 1: .*router logits are NaN/inf"):
        run(tmp_path / "run", "--log-every", "2", "--eval-batches", "0")


def test_random_routing_run(tmp_path):
    m = run(tmp_path / "run", "--random-routing")
    assert m["config"]["model"]["random_routing"] is True
    model = train.load_model(tmp_path / "run" / "model.pt")
    assert model.cfg.random_routing and all(x.random_routing for x in model.mod_layers)
    run(tmp_path / "part", "--stop-at", "3", "--eval-batches", "0")
    with pytest.raises(SystemExit, match="--random-routing False in the checkpoint vs True now"):
        run(tmp_path / "part", "--resume", "--random-routing", "--eval-batches", "0")


def test_calibrated_without_evaluations_and_random_routing_resumes_bit_exact(tmp_path):
    """--eval-batches 0 still calibrates (model.pt carries the thresholds); a random-routing
    run stopped and resumed equals the uninterrupted one (its random scores are seeded per
    step), health history included."""
    m = run(tmp_path / "noeval", "--eval-batches", "0")
    assert m["causal_thresholds"] and any(t != 0 for t in m["causal_thresholds"])
    model = train.load_model(tmp_path / "noeval" / "model.pt")
    assert [float(x.causal_threshold) for x in model.mod_layers] == pytest.approx(m["causal_thresholds"])
    full = run(tmp_path / "full", "--random-routing", "--log-every", "2")
    run(tmp_path / "part", "--random-routing", "--log-every", "2", "--stop-at", "3")
    resumed = run(tmp_path / "part", "--random-routing", "--log-every", "2", "--resume")
    assert losses(resumed) == losses(full) and losses(resumed, "grad_norm") == losses(full, "grad_norm")
    assert resumed["evals"] == full["evals"] and resumed["causal_thresholds"] == full["causal_thresholds"]
    assert resumed["causal_routing"] == full["causal_routing"]
    assert [h["steps"] for h in resumed["health"]] == [h["steps"] for h in full["health"]] == [[1, 2], [3, 3],
                                                                                                 [4, 5], [6, 6]]
