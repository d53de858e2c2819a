"""Two-process (gloo, CPU) tests of mod_ext.train: splitting the global batch over ranks
changes nothing.

Every comparison is against one process with the same global batch (``--dist none``, run
in this process), on every step's loss, LM loss, aux loss and gradient norm, every
evaluation, and the final parameters (model.pt). The gradient norm matters: AdamW
normalises the update and clipping rescales it, so parameters alone would not show a
gradient that is, say, twice what it should be.

The distributed runs are grouped into a few spawned 2-rank jobs (module-scoped
fixtures; workers in tests/train_workers.py), each running many configurations in turn,
because a spawn costs seconds and the runs themselves milliseconds.

Tolerances. float64 runs agree to float64 rounding (1e-10), aux loss included (the
predictor's logits and the aux term are float64 in float64 runs). This is far below what a
wrong normalisation or reduction gives (a factor of 2 in the gradient norm; asserted in
the gloo AVG tests). float32 runs: 1e-5.

Also in float32: FSDP2 reduces float32 gradients with ReduceOp.AVG (float64 with SUM and
a division), the collective pytorch/pytorch#162338 broke on gloo. The installed PyTorch
does not have that bug; the workers emulate it (tests/train_workers.py, "gloo_avg_bug").
With the emulated bug, mod_ext.train's workaround (sum-based reduction on every FSDP2
module) must still give one process's gradients.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from mod_ext import train
from mod_ext.data import load_corpus
from mod_ext.models import MoDTransformer
from tests import train_workers as W

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("the two-process tests need torch.distributed with gloo", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP on 1 process

BASE = W.BASE
# (rtol of the metrics, rtol of the parameters relative to each tensor's largest magnitude)
F64 = (1e-10, 1e-10)
# float32 parameters after 6 AdamW steps: AdamW divides by sqrt(v), so a weight whose
# gradient is tiny moves by up to lr x its relative rounding noise; a real error (a
# missing or doubled rank slice) moves weights by ~lr = 3e-3, 1e-3..1e-2 of their scale.
F32 = (1e-5, 1e-4)
EXACT = (0.0, 0.0)

MODES = {"dense": ["--dense"], "topk": [], "router": ["--causal-router", "router"], "causal": ["--routing", "causal"]}
VARIANTS = {"plain": [], "pad": ["--pad-fraction", "0.3"], "pad-accum2": ["--pad-fraction", "0.3", "--grad-accum", "2"]}
#: name -> (extra options, rtol): the full matrix in float64, two float32 configurations
AUX_MODES = ("topk", "router")
CONFIGS: Dict[str, tuple] = {f"{m}-{v}-float64": (MODES[m] + VARIANTS[v] + ["--dtype", "float64"],
                                                  F64 if m in AUX_MODES else F64)
                             for m in MODES for v in VARIANTS}
CONFIGS["topk-pad-float32"] = (VARIANTS["pad"], F32)
CONFIGS["router-accum2-float32"] = (MODES["router"] + ["--grad-accum", "2"], F32)
#: the model.pt keys of the predictor (the only parameters frozen in these runs)
PREDICTOR = "layers.1.predictor."


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def run_here(argv: List[str]) -> Dict:
    """``train.main(argv)`` in this process (one process), its global changes (torch
    threads, the seeded RNG) undone."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            return train.main(argv)
    finally:
        torch.set_num_threads(threads)


def argv(extra: List[str], dist: str, out: Path) -> List[str]:
    return BASE + list(extra) + ["--dist", dist, "--out", str(out)]


def job(extra: List[str], dist: str, out: Path, **kw) -> Dict:
    return dict(argv=argv(extra, dist, out), **kw)


def metrics(out: Path) -> Dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def params(out: Path) -> Dict[str, torch.Tensor]:
    return train.load_model(Path(out) / "model.pt").state_dict()


def _close(a: Optional[float], b: Optional[float], rtol: float) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= rtol * abs(b)


def compare_runs(run: Path, ref: Path, tol: tuple) -> List[str]:
    """Where run differs from ref beyond tol = (rtol, param_rtol): every step's loss,
    lm_loss, aux_loss, grad_norm and lr, every evaluation (rtol), and every tensor of
    model.pt (param_rtol, relative to the tensor's largest magnitude). [] when they
    agree; EXACT means bit-identical."""
    rtol, param_rtol = tol
    a, b = metrics(run), metrics(ref)
    bad = []
    if len(a["steps"]) != len(b["steps"]):
        bad.append(f"{len(a['steps'])} steps vs {len(b['steps'])}")
    for sa, sb in zip(a["steps"], b["steps"]):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            if not _close(sa[key], sb[key], rtol):
                bad.append(f"step {sa['step']} {key}: {sa[key]!r} vs {sb[key]!r}")
    if [e["step"] for e in a["evals"]] != [e["step"] for e in b["evals"]]:
        bad.append(f"evaluations at steps {[e['step'] for e in a['evals']]} vs {[e['step'] for e in b['evals']]}")
    for ea, eb in zip(a["evals"], b["evals"]):
        if not _close(ea["val_loss"], eb["val_loss"], rtol):
            bad.append(f"eval at step {ea['step']}: {ea['val_loss']!r} vs {eb['val_loss']!r}")
    pa, pb = params(run), params(ref)
    if pa.keys() != pb.keys():
        bad.append(f"parameters {sorted(pa.keys() ^ pb.keys())} in only one run")
    for k in sorted(pa.keys() & pb.keys()):
        if pa[k].dtype != pb[k].dtype:
            bad.append(f"{k}: {pa[k].dtype} vs {pb[k].dtype}")
            continue
        err = float((pa[k].double() - pb[k].double()).abs().max())
        if err > param_rtol * float(pb[k].double().abs().max()):
            bad.append(f"{k}: max |diff| {err:.3g} (max |ref| {float(pb[k].abs().max()):.3g})")
    return bad


def assert_same_run(run: Path, ref: Path, tol: tuple) -> None:
    bad = compare_runs(run, ref, tol)
    assert not bad, f"{run} differs from {ref} (tol {tol}):\n  " + "\n  ".join(bad[:20])


# --------------------------------------------------------------------------------------
# The matrix: DDP and FSDP2 on 2 processes = 1 process
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """Every configuration of CONFIGS on one process (here), and under DDP and FSDP2
    on 2 processes (one spawned job): ``root/<name>/{none,ddp,fsdp2}``."""
    root = tmp_path_factory.mktemp("matrix")
    jobs = []
    for name, (extra, _) in CONFIGS.items():
        run_here(argv(extra, "none", root / name / "none"))
        jobs += [job(extra, d, root / name / d) for d in ("ddp", "fsdp2")]
    W.spawn(W.train_jobs, jobs)
    return root


@pytest.mark.parametrize("dist", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_equal_one(matrix, name, dist):
    """2 ranks x half the batch (DDP or FSDP2; dense, MoD top-k with the predictor or
    the router as causal router, trained with causal routing; with and without padding
    and gradient accumulation) give every step's losses and gradient norm, the
    evaluations and the final parameters of one process with the whole batch. The DDP
    runs also prove DDP needs no find_unused_parameters in these modes (it would raise
    at step 2 if a parameter got no gradient)."""
    extra, tol = CONFIGS[name]
    assert_same_run(matrix / name / dist, matrix / name / "none", tol)
    m = metrics(matrix / name / dist)
    assert m["config"]["world_size"] == 2 and m["config"]["dist"] == dist
    assert len(m["steps"]) == train.QUICK["steps"]
    if "--grad-accum" in extra:  # 2 micro-batches x 2 ranks x 1 row
        assert m["config"]["grad_accum"] == 2 and m["config"]["batch_size"] == 4
    expect_frozen = "--routing" in extra  # causal training freezes the predictor
    assert bool(m["config"]["frozen"]) == expect_frozen
    assert all(n.startswith(PREDICTOR) for n in m["config"]["frozen"])


# --------------------------------------------------------------------------------------
# The other 2-rank job: frozen predictor, compile, bfloat16, gloo AVG, checkpoints
# --------------------------------------------------------------------------------------

AUX0 = ["--aux-loss-weight", "0"]
FLOAT64 = ["--dtype", "float64"]
BAD_BATCH = ["--batch-size", "2", "--grad-accum", "2", "--steps", "4"]


@pytest.fixture(scope="module")
def misc(tmp_path_factory) -> Path:
    """One spawned 2-rank job running, in order, the runs of the tests below (outputs
    under ``root/<name>``), and the one-process references they compare with."""
    root = tmp_path_factory.mktemp("misc")
    for name, extra in [("ref32", []), ("aux0/none", AUX0)]:
        run_here(argv(extra, "none", root / name))
    run_here(argv(BAD_BATCH + ["--stop-at", "2"], "none", root / "bad_batch"))  # saved on 1 process
    ck = root / "ddp_stop3" / "checkpoints" / "step_00000003"
    jobs = [
        job(AUX0, "ddp", root / "aux0/ddp"),
        job(AUX0, "fsdp2", root / "aux0/fsdp2"),
        job(["--compile", "aot_eager"], "ddp", root / "aot_eager"),
        job(["--dtype", "bfloat16"], "fsdp2", root / "bf16"),
        job([], "fsdp2", root / "avg_bug", patches=("gloo_avg_bug",)),
        job([], "fsdp2", root / "avg_bug_unhandled", patches=("gloo_avg_bug", "no_workaround")),
        job([], "fsdp2", root / "fsdp2_plain"),
        # checkpoints (float64: compared with the matrix's topk-plain-float64 runs)
        job(FLOAT64 + ["--stop-at", "3"], "fsdp2", root / "fsdp2_stop3"),
        job(FLOAT64 + ["--stop-at", "3"], "ddp", root / "ddp_stop3"),
        job(FLOAT64 + ["--resume", str(ck)], "ddp", root / "ddp_stop3_ddp"),
        job(FLOAT64 + ["--resume", str(ck)], "fsdp2", root / "ddp_stop3_fsdp2"),
        job(FLOAT64 + ["--resume", str(ck), "--lr", "1e-3"], "ddp", root / "changed_lr", expect_exit=True),
        job(BAD_BATCH + ["--resume"], "ddp", root / "bad_batch", expect_exit=True),
        # rank 1's router goes NaN: both ranks stop at the next logging interval
        job(["--log-every", "2", "--eval-batches", "0"], "ddp", root / "nan_rank1", patches=("nan_router_rank1",),
            expect_exit=True),
        # last: a DDP run with an unused parameter (the predictor, not frozen at aux weight 0) must raise
        job(AUX0, "ddp", root / "unused", patches=("no_freeze",), expect_error="finished reduction"),
    ]
    W.spawn(W.run_tasks, [("train_jobs", jobs),
                          ("probe_gloo_avg", str(root / "probe.json")),
                          ("fsdp2_tensor_types", str(root / "types.json"), ["--pad-fraction", "0.3"]),
                          ("ddp_flags", str(root / "ddp_flags.json"))])
    return root


def test_ddp_has_no_find_unused_parameters_and_would_catch_an_unused_one(misc):
    """prepare_model wraps with DDP(find_unused_parameters=False), and a parameter that
    gets no gradient then fails the run at step 2 (so the matrix's DDP runs prove every
    trainable parameter gets a gradient)."""
    assert json.loads((misc / "ddp_flags.json").read_text()) == dict(find_unused_parameters=False,
                                                                      static_graph=False)
    err = (misc / "unused" / "error_rank0.txt").read_text()
    assert "finished reduction" in err


def test_aux_loss_weight_0_freezes_the_predictor(misc):
    """With --aux-loss-weight 0 the predictor is frozen (metrics.json config.frozen
    lists its parameters, model.pt keeps their initial values) and DDP / FSDP2 on 2
    processes still equal one process."""
    args = train.parse_args(BASE + AUX0)
    torch.manual_seed(args.seed)
    init = MoDTransformer(train.model_config(args, load_corpus(W.FIXTURE).vocab_size)).state_dict()
    predictor = sorted(k for k in init if k.startswith(PREDICTOR))
    assert predictor
    for d in ("none", "ddp", "fsdp2"):
        out = misc / "aux0" / d
        assert sorted(metrics(out)["config"]["frozen"]) == predictor
        p = params(out)
        for k in predictor:
            assert torch.equal(p[k], init[k]), f"{d}: {k} was trained"
        assert not torch.equal(p["lm_head.weight"], init["lm_head.weight"])
    for d in ("ddp", "fsdp2"):
        assert_same_run(misc / "aux0" / d, misc / "aux0" / "none", F32)
        assert metrics(misc / "aux0" / d)["steps"][0]["aux_loss"] is not None  # still reported


def test_compile_aot_eager_under_ddp_equals_eager(misc):
    """--compile aot_eager (each block through torch.compile) under DDP on 2 processes
    equals the eager one-process run."""
    assert metrics(misc / "aot_eager")["config"]["compile"] == "aot_eager"
    assert_same_run(misc / "aot_eager", misc / "ref32", F32)


def test_fsdp2_bfloat16_mixed_precision(misc):
    """FSDP2 with --dtype bfloat16 (MixedPrecisionPolicy) runs, stays within 2e-2 of the
    float32 one-process losses, and is not float32 in disguise (the losses differ)."""
    a, b = metrics(misc / "bf16")["steps"], metrics(misc / "ref32")["steps"]
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert math.isfinite(sa["grad_norm"])
        for key in ("loss", "lm_loss", "aux_loss"):
            assert sa[key] == pytest.approx(sb[key], rel=2e-2), (sa["step"], key)
    assert any(abs(sa["lm_loss"] - sb["lm_loss"]) > 1e-5 * sb["lm_loss"] for sa, sb in zip(a, b))
    assert params(misc / "bf16")["lm_head.weight"].dtype == torch.float32  # float32 master weights


def test_fsdp2_mod_ops_see_plain_tensors(misc):
    """Under FSDP2 (fully_shard per block) the MoD layers and the torch.ops.mod_ext ops
    see plain tensors, in forward and in backward, although the parameters are
    DTensors between calls."""
    plain = {"Tensor", "Parameter"}
    r = json.loads((misc / "types.json").read_text())
    assert r["sharded_type"] == ["DTensor"]  # the test would see a DTensor
    assert r["param_types"] and set(r["param_types"]) <= plain
    assert r["grad_types"] and {t for pair in r["grad_types"] for t in pair} <= plain
    ops = {(phase, op) for phase, op, _ in r["op_types"]}
    assert {("forward", "mod_ext::topk_route"), ("forward", "mod_ext::gather_tokens"),
            ("forward", "mod_ext::scatter_add_weighted"), ("forward", "mod_ext::router_logits"),
            ("backward", "mod_ext::gather_tokens_backward"),
            ("backward", "mod_ext::scatter_add_weighted_backward")} <= ops
    seen = {t for _, _, types in r["op_types"] for t in types}
    assert seen <= plain, r["op_types"]


# --------------------------------------------------------------------------------------
# gloo ReduceOp.AVG (pytorch/pytorch#162338), emulated
# --------------------------------------------------------------------------------------


def test_gloo_avg_probe_tells_the_truth(misc):
    """gloo_avg_is_broken() answers what a direct reduce_scatter_single(AVG) of 1 and 2
    shows, on the real gloo and under the emulated bug (which sums: 3)."""
    r = json.loads((misc / "probe.json").read_text())
    assert r["direct"] in (1.5, 3.0)
    assert r["probe"] == (r["direct"] != 1.5)
    assert r["direct_bug"] == 3.0 and r["probe_bug"] is True


def test_the_probe_detects_the_gloo_avg_bug_in_a_run(misc):
    """Under the emulated bug, the probe in prepare_model answers True on every rank and
    rank 0 says it works around it; on the real gloo it answers False, and FSDP2
    equals one process."""
    for r in (0, 1):
        assert json.loads((misc / "avg_bug" / f"probe_rank{r}.json").read_text()) == [True]
        assert json.loads((misc / "fsdp2_plain" / f"probe_rank{r}.json").read_text()) == [False]
    assert "pytorch/pytorch#162338" in (misc / "avg_bug" / "log_rank0.txt").read_text()
    assert "pytorch/pytorch#162338" not in (misc / "fsdp2_plain" / "log_rank0.txt").read_text()
    assert_same_run(misc / "fsdp2_plain", misc / "ref32", F32)


def test_fsdp2_with_the_gloo_avg_bug_still_equals_one_process(misc):
    """With gloo's AVG summing, FSDP2 with mod_ext.train's workaround still equals one
    process (gradient norms included)."""
    assert_same_run(misc / "avg_bug", misc / "ref32", F32)


def test_the_comparison_catches_the_unhandled_gloo_avg_bug(misc):
    """With the bug and without the workaround, FSDP2's gradients are twice the right
    ones: compare_runs reports it (gradient norm 2x at step 1, same loss), so these
    tests would catch such a bug."""
    bad = compare_runs(misc / "avg_bug_unhandled", misc / "ref32", F32)
    assert any("grad_norm" in b for b in bad), bad
    a, b = metrics(misc / "avg_bug_unhandled")["steps"][0], metrics(misc / "ref32")["steps"][0]
    assert a["loss"] == pytest.approx(b["loss"], rel=F32[0])
    assert a["grad_norm"] == pytest.approx(2 * b["grad_norm"], rel=F32[0])


# --------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------

TOPK64 = "topk-plain-float64"


def test_fsdp2_checkpoint_resumes_on_one_process(matrix, misc, tmp_path):
    """FSDP2 on 2 processes stopped at step 3 (--stop-at 3), resumed on one process,
    equals the uninterrupted one-process run."""
    out = tmp_path / "resumed"
    shutil.copytree(misc / "fsdp2_stop3", out)
    run_here(argv(FLOAT64 + ["--resume"], "none", out))
    m = metrics(out)
    assert m["resumed_from"]["step"] == 3 and m["resumed_from"]["world_size"] == 2
    assert m["resumed_from"]["dist"] == "fsdp2"
    assert_same_run(out, matrix / TOPK64 / "none", F64)


def test_ddp_checkpoint_resumes_under_fsdp2(matrix, misc):
    """A DDP checkpoint (2 processes, step 3) resumed under FSDP2 (2 processes) equals
    the uninterrupted FSDP2 run."""
    assert metrics(misc / "ddp_stop3_fsdp2")["resumed_from"]["dist"] == "ddp"
    assert_same_run(misc / "ddp_stop3_fsdp2", matrix / TOPK64 / "fsdp2", F64)


def test_same_world_size_resume_is_bit_exact(matrix, misc):
    """DDP 2 -> DDP 2: the resumed run's steps, evaluations and parameters are
    bit-identical to the uninterrupted DDP run's."""
    assert metrics(misc / "ddp_stop3")["final_step"] == 3
    assert len(metrics(misc / "ddp_stop3")["steps"]) == 3
    assert metrics(misc / "ddp_stop3_ddp")["resumed_from"]["step"] == 3
    assert_same_run(misc / "ddp_stop3_ddp", matrix / TOPK64 / "ddp", EXACT)


def test_resume_refusals_name_the_option(misc):
    """Resuming on a world size that cannot split the global batch, or with a changed
    option, is a clear SystemExit (on every rank) naming the option."""
    for r in (0, 1):
        msg = (misc / "bad_batch" / f"exit_rank{r}.txt").read_text()
        assert "--batch-size 2" in msg and "--grad-accum 2" in msg and "2 processes" in msg, msg
        msg = (misc / "changed_lr" / f"exit_rank{r}.txt").read_text()
        assert "--lr" in msg and "another configuration" in msg, msg


def test_nan_router_on_one_rank_stops_every_rank(misc):
    """A NaN router on rank 1 only: rank 1's error names the MoD layer; rank 0 stops too
    (no hang at the next collective), naming the layer itself (DDP's gradient all-reduce
    has spread the NaN into its parameters by then) or pointing at the other process."""
    msg1 = (misc / "nan_rank1" / "exit_rank1.txt").read_text()
    assert "MoD layer 1" in msg1 and "router logits are NaN/inf" in msg1, msg1
    msg0 = (misc / "nan_rank1" / "exit_rank0.txt").read_text()
    assert "MoD layer 1: " in msg0 or "another process found NaN/inf" in msg0, msg0
    assert len(metrics_or_none(misc / "nan_rank1")) == 0  # stopped before writing metrics.json


def metrics_or_none(out: Path) -> list:
    return [out / "metrics.json"] if (out / "metrics.json").exists() else []


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """A 2-rank DDP run (float64, --save-every 2, 6 steps) whose rank 1 raises while
    saving the step-4 checkpoint (a 15 s process-group timeout for rank 0)."""
    out = tmp_path_factory.mktemp("crash") / "run"
    with pytest.raises(Exception):  # rank 1's error, or rank 0's (its peer went away) if that came first
        W.spawn(W.train_jobs, [job(FLOAT64 + ["--save-every", "2"], "ddp", out, patches=("crash_save_step4_rank1",))],
                timeout_s=15)
    assert "emulated crash of rank 1" in (out / "error_rank1.txt").read_text()
    return out


def test_a_crash_during_a_save_leaves_the_last_checkpoint(crashed, matrix):
    """After a rank crashed in the step-4 save, latest_checkpoint is step 2 (not the
    step_00000004.tmp left behind), and --resume continues from step 2 to the end of the
    uninterrupted run."""
    ckpts = crashed / "checkpoints"
    assert (ckpts / "step_00000004.tmp").is_dir()
    assert not (ckpts / "step_00000004").exists()
    assert train.latest_checkpoint(crashed) == ckpts / "step_00000002"
    run_here(argv(FLOAT64 + ["--resume"], "none", crashed))
    m = metrics(crashed)
    assert m["resumed_from"]["step"] == 2 and m["resumed_from"]["world_size"] == 2
    assert_same_run(crashed, matrix / TOPK64 / "none", F64)


# --------------------------------------------------------------------------------------
# The real launcher
# --------------------------------------------------------------------------------------


def test_torchrun_ddp(tmp_path):
    """python -m torch.distributed.run --nproc-per-node 2 -m mod_ext.train --dist ddp
    trains (rank 0 writes metrics.json on 2 processes); --dist nonsense is an argparse
    error naming --dist."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mod_ext.train"]
    out = tmp_path / "run"
    r = subprocess.run(cmd + BASE + ["--dist", "ddp", "--steps", "2", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = metrics(out)
    assert m["config"]["world_size"] == 2 and m["config"]["backend"] == "gloo" and len(m["steps"]) == 2
    r = subprocess.run([sys.executable, "-m", "mod_ext.train", "--dist", "nonsense"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--dist" in r.stderr and "invalid choice" in r.stderr, r.stderr
