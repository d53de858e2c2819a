"""Spawn-able two-process workers for tests/test_train_dist.py (gloo on the CPU).

:func:`spawn` runs ``fn(rank, *args)`` on two spawned ranks that share a gloo process
group; ``mod_ext.train.main`` then uses that group (it neither creates nor destroys it).
A worker's exception fails :func:`spawn` with the worker's traceback
(``torch.multiprocessing.ProcessRaisedException``).

The workers are module-level functions (spawn pickles them by name) and take only
picklable arguments: a *job* is a dict ``{"argv": [...], "patches": (...), "expect_exit":
bool}`` run by :func:`train_jobs`. Each job writes, beside rank 0's ``metrics.json`` and
``model.pt``, every rank's captured stdout/stderr (``log_rank{r}.txt``), what the
gloo-AVG probe answered (``probe_rank{r}.json``), the SystemExit message of an
``expect_exit`` job (``exit_rank{r}.txt``) and the error of a failed or ``expect_error``
job (``error_rank{r}.txt``).

Patches (emulations of failures the installed PyTorch does not have):

* ``"gloo_avg_bug"``: ``torch.distributed.reduce_scatter_single`` sums where
  ``ReduceOp.AVG`` should average (pytorch/pytorch#162338); FSDP2 and
  ``mod_ext.train.gloo_avg_is_broken`` both call it.
* ``"no_workaround"``: ``mod_ext.train.gloo_avg_is_broken`` answers False (as if the
  probe did not exist).
* ``"no_freeze"``: ``mod_ext.train.frozen_parameters`` freezes nothing.
* ``"crash_save_step4_rank1"``: ``torch.distributed.checkpoint.save`` raises on rank 1
  when saving the step-4 checkpoint.
* ``"nan_router_rank1"``: on rank 1 only, the router logits (``mod_ext.layer._router_logits``)
  are NaN from the third call on (a router gone NaN on one process).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import socket
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FIXTURE = str(Path(__file__).resolve().parent / "fixtures" / "tiny.txt")
#: every run: one thread, the tiny offline corpus, the --quick model, no plot
BASE = ["--threads", "1", "--data", FIXTURE, "--quick", "--no-plot"]
WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, timeout_s: float, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, *args, timeout_s: float = 60.0) -> None:
    """Run ``fn(rank, *args)`` on 2 spawned gloo ranks; re-raises a worker's exception."""
    mp.start_processes(_entry, args=(free_port(), timeout_s, fn, args), nprocs=WORLD, join=True,
                       start_method="spawn")


# --------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------


def _out_of(argv: Sequence[str]) -> Path:
    return Path(argv[list(argv).index("--out") + 1])


@contextlib.contextmanager
def _patched(names: Sequence[str], rank: int, probe_log: List[bool]):
    import torch.distributed.checkpoint as dcp

    import mod_ext.layer as L
    import mod_ext.train as T

    unknown = set(names) - {"gloo_avg_bug", "no_workaround", "no_freeze", "crash_save_step4_rank1",
                            "nan_router_rank1"}
    if unknown:
        raise ValueError(f"unknown patches {sorted(unknown)}")
    saved = [(dist, "reduce_scatter_single", dist.reduce_scatter_single),
             (T, "gloo_avg_is_broken", T.gloo_avg_is_broken),
             (T, "frozen_parameters", T.frozen_parameters),
             (dcp, "save", dcp.save),
             (L, "_router_logits", L._router_logits)]
    real_rs, real_probe, _, real_save, real_logits = (s[2] for s in saved)

    if "gloo_avg_bug" in names:
        def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if op == dist.ReduceOp.AVG:
                op = dist.ReduceOp.SUM
            return real_rs(output, input, op=op, group=group, async_op=async_op)

        dist.reduce_scatter_single = reduce_scatter_single

    def probe(group=None):
        answer = real_probe(group)  # always run: it is a collective
        probe_log.append(answer)
        return False if "no_workaround" in names else answer

    T.gloo_avg_is_broken = probe
    if "no_freeze" in names:
        T.frozen_parameters = lambda model, args: []

    if "crash_save_step4_rank1" in names and rank == 1:
        def save(state_dict, *a, checkpoint_id=None, **kw):
            if str(checkpoint_id).endswith("step_00000004.tmp"):
                raise RuntimeError("emulated crash of rank 1 while saving the step-4 checkpoint")
            return real_save(state_dict, *a, checkpoint_id=checkpoint_id, **kw)

        dcp.save = save
    if "nan_router_rank1" in names and rank == 1:
        calls = [0]

        def router_logits(x, w, b=None):
            calls[0] += 1
            z = real_logits(x, w, b)
            return z * float("nan") if calls[0] > 2 else z

        L._router_logits = router_logits
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


def run_tasks(rank: int, tasks: List[tuple]) -> None:
    """Run the workers ``(name, *args)`` of this module in turn (one spawn for all)."""
    for name, *args in tasks:
        globals()[name](rank, *args)


def train_jobs(rank: int, jobs: List[Dict]) -> None:
    """Run ``mod_ext.train.main(job["argv"])`` for each job, in order, on this rank.

    A job with ``expect_exit`` must end in SystemExit (its message goes to
    ``exit_rank{r}.txt``), one with ``expect_error`` (a substring) in an exception
    saying so (``error_rank{r}.txt``); any other SystemExit or exception fails the
    worker (its traceback also goes to ``error_rank{r}.txt``)."""
    import mod_ext.train as T

    for job in jobs:
        argv = list(job["argv"])
        out = _out_of(argv)
        probes: List[bool] = []
        log = io.StringIO()
        expect_error = job.get("expect_error")
        try:
            with _patched(job.get("patches", ()), rank, probes), contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                try:
                    T.main(argv)
                except SystemExit as e:
                    if not job.get("expect_exit"):
                        raise RuntimeError(f"mod_ext.train.main({argv}) exited: {e}") from e
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"exit_rank{rank}.txt").write_text(str(e))
                except Exception as e:
                    if not expect_error or expect_error not in str(e):
                        raise
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"error_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
                else:
                    if job.get("expect_exit") or expect_error:
                        raise AssertionError(f"mod_ext.train.main({argv}) did not fail")
        except BaseException:
            if out.is_dir():
                (out / f"error_rank{rank}.txt").write_text(traceback.format_exc())
            raise
        finally:
            if out.is_dir():
                (out / f"log_rank{rank}.txt").write_text(log.getvalue())
                (out / f"probe_rank{rank}.json").write_text(json.dumps(probes))


def probe_gloo_avg(rank: int, out: str) -> None:
    """Rank 0 writes {"direct": <AVG of 1 and 2 by reduce_scatter_single>, "probe": gloo_avg_is_broken(),
    "direct_bug", "probe_bug": the same under the emulated bug} to ``out``."""
    import mod_ext.train as T

    def direct() -> float:
        o = torch.empty(1)
        dist.reduce_scatter_single(o, torch.full((WORLD,), float(rank + 1)), op=dist.ReduceOp.AVG)
        return o.item()

    probe = T.gloo_avg_is_broken
    res = dict(direct=direct(), probe=probe())
    with _patched(("gloo_avg_bug",), rank, []):
        res.update(direct_bug=direct(), probe_bug=probe())
    if rank == 0:
        Path(out).write_text(json.dumps(res))


class _OpArgTypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the types of the tensor arguments of every torch.ops.mod_ext call."""

    def __init__(self):
        super().__init__()
        self.seen: List[tuple] = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mod_ext":
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            self.seen.append((self.phase, func.name(), sorted({type(t).__name__ for t in flat
                                                              if isinstance(t, torch.Tensor)})))
        return func(*args, **kwargs)


def fsdp2_tensor_types(rank: int, out: str, extra: Sequence[str]) -> None:
    """Wrap the model with mod_ext.train.prepare_model under FSDP2, run one forward and
    backward, and (rank 0) write what the MoD layers and the mod_ext ops saw to ``out``:
    ``param_types`` (type of router_weight in each MoDBlock forward pre-hook, after
    FSDP2's own), ``grad_types`` (router-logit gradient and router_weight types in
    backward), ``op_types`` ([phase, op, tensor types] of every torch.ops.mod_ext call)
    and ``sharded_type`` (router_weight's type outside forward: DTensor)."""
    import mod_ext.train as T
    from mod_ext.data import load_corpus
    from mod_ext.layer import MoDBlock
    from mod_ext.models import MoDTransformer

    args = T.parse_args(BASE + ["--dist", "fsdp2", "--out", out + ".run", *extra])
    env = T.init_distributed("fsdp2", args.device)
    corpus = load_corpus(args.data)
    torch.manual_seed(args.seed)
    model, _ = T.prepare_model(MoDTransformer(T.model_config(args, corpus.vocab_size)), args, env)
    blocks = [m for m in model.modules() if isinstance(m, MoDBlock)]
    assert blocks, "no MoDBlock in the model"
    rec: Dict[str, list] = dict(param_types=[], grad_types=[], op_types=[])
    rec["sharded_type"] = sorted({type(b.router_weight).__name__ for b in blocks})

    def pre_hook(module, inputs):
        rec["param_types"].append(type(module.router_weight).__name__)

    def post_hook(module, inputs, output):
        def on_grad(g):
            rec["grad_types"].append([type(g).__name__, type(module.router_weight).__name__])

        output.routing.router_logits.register_hook(on_grad)
        output.output.register_hook(on_grad)

    for b in blocks:
        b.register_forward_pre_hook(pre_hook)
        b.register_forward_hook(post_hook)
    x, y, valid = T.GlobalBatches(corpus.train, args.batch_size, args.seq_len, args.seed, args.pad_fraction)(0)
    rows = slice(rank * args.batch_size // WORLD, (rank + 1) * args.batch_size // WORLD)
    mode = _OpArgTypes()
    with mode:
        o = model(x[rows], None, routing=args.routing, valid=None if valid is None else valid[rows])
        loss = torch.nn.functional.cross_entropy(o.logits.float().flatten(0, 1), y[rows].flatten(), ignore_index=-100)
        if o.aux_loss is not None:
            loss = loss + o.aux_loss
        mode.phase = "backward"
        loss.backward()
    rec["op_types"] = mode.seen
    if rank == 0:
        Path(out).write_text(json.dumps(rec))


def ddp_flags(rank: int, out: str) -> None:
    """Rank 0 writes how mod_ext.train.prepare_model configures DDP to ``out``."""
    import mod_ext.train as T
    from mod_ext.models import MoDTransformer

    args = T.parse_args(BASE + ["--dist", "ddp", "--out", out + ".run"])
    env = T.init_distributed("ddp", args.device)
    model, _ = T.prepare_model(MoDTransformer(T.model_config(args, 256)), args, env)
    if rank == 0:
        Path(out).write_text(json.dumps(dict(find_unused_parameters=model.find_unused_parameters,
                                             static_graph=model.static_graph)))
