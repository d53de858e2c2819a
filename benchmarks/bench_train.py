"""Training throughput of the reference model, dense vs MoD, on 1 and more processes:
the real entry point, ``python -m mod_ext.train`` (``torchrun ... --dist ddp|fsdp2`` for
more than one process), timed from its own per-step records.

    python benchmarks/bench_train.py --quick                       # CPU smoke run (< 1 minute)
    python benchmarks/bench_train.py --json out/train_cpu.json     # CPU: width 512, 8 layers, 1 and 2 processes
    python benchmarks/bench_train.py --gpu --json out/train_gpu.json  # GPU: width 2048, 16 layers, bf16

Each case is one training run of ``--steps`` optimizer steps on a global batch of
``--batch-size`` x ``--seq-len`` tokens (the same global batch for every process count,
so a step is the same work), AdamW, gradient clipping, float32 on the CPU (bfloat16
autocast with ``--gpu``), top-k routing at capacity 0.125 on every other layer for MoD.
tokens/s = global batch tokens / the median step time (forward, backward, gradient
reduction, optimizer step; evaluation and start-up excluded; the first ``--warmup``
steps, which allocate and compile, are left out of the median). Dense and MoD runs
alternate (dense, MoD, dense, MoD, ... ``--repeats`` times each) so load changes on a
shared machine hit both, and the median over repeats is reported. Data: any text
(throughput does not depend on it; default this repository's README.md, so the run is
offline).

Target (CPU, full run; a benchmark, not a test): MoD >= 1.4x the dense model's tokens/s
at width 512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Results, judge, md_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU shapes: width 2048, 16 layers, bf16, nccl")
    p.add_argument("--procs", default=None, help="comma-separated process counts (default 1,2 on CPU; "
                   "1 and the GPU count with --gpu)")
    p.add_argument("--dist", choices=["ddp", "fsdp2"], default="ddp", help="for more than one process")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (sequences)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--repeats", type=int, default=None, help="runs of each case (default 2, quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: CPU cores / processes)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, help="pass --compile to mod_ext.train")
    p.add_argument("--data", default=str(ROOT / "README.md"), help="text to train on (default README.md)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    if args.gpu:
        defaults = dict(d_model=2048, n_layer=16, n_head=16, seq_len=2048, batch_size=8, steps=12, dtype="bfloat16")
    elif args.quick:
        defaults = dict(d_model=64, n_layer=2, n_head=2, seq_len=64, batch_size=4, steps=5, dtype="float32")
    else:
        defaults = dict(d_model=512, n_layer=8, n_head=8, seq_len=256, batch_size=8, steps=12, dtype="float32")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.procs is None:
        if args.gpu:
            import torch

            n = torch.cuda.device_count()
            args.procs = "1" if n <= 1 else f"1,{n}"
        else:
            args.procs = "1" if args.quick else "1,2"
    args.procs = [int(v) for v in args.procs.split(",")]
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def run_case(args, dense: bool, procs: int, out: Path) -> dict:
    """One training run; returns its metrics.json."""
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // procs)
    train = ["--data", args.data, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--d-model", str(args.d_model), "--n-layer", str(args.n_layer),
             "--n-head", str(args.n_head), "--dtype", args.dtype, "--threads", str(threads),
             "--eval-batches", "0", "--log-every", str(args.steps), "--no-plot", "--out", str(out),
             "--device", "cuda" if args.gpu else "cpu"]
    if dense:
        train.append("--dense")
    if args.compile:
        train += ["--compile", args.compile]
    if procs == 1:
        cmd = [sys.executable, "-m", "mod_ext.train"] + train
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "mod_ext.train", "--dist", args.dist] + train
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench_train: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def main(argv=None):
    args = parse_args(argv)
    import platform

    import torch

    import mod_ext

    env = dict(torch=torch.__version__, cuda=torch.version.cuda, mod_ext=mod_ext.__version__,
               device=torch.cuda.get_device_name() if args.gpu else platform.processor() or platform.machine(),
               cpu_count=os.cpu_count(), load_avg_1min=os.getloadavg()[0], options=vars(args))
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=ROOT).stdout.strip()
    except OSError:
        env["git_commit"] = ""
    import datetime

    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# {env['date']} torch {env['torch']} (CUDA {env['cuda']}) {env['device']} cpus {env['cpu_count']} "
          f"load {env['load_avg_1min']:.2f}; width {args.d_model}, {args.n_layer} layers, global batch "
          f"{args.batch_size} x {args.seq_len}, {args.dtype}, {args.steps} steps (median after {args.warmup})")
    results = Results(args.json, env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for procs in args.procs:
            samples = {True: [], False: []}
            info = {}
            for r in range(args.repeats):
                for dense in (True, False):
                    m = run_case(args, dense, procs, Path(tmp) / f"p{procs}-{'dense' if dense else 'mod'}-{r}")
                    times = [s["step_time_s"] for s in m["steps"][args.warmup:]]
                    samples[dense].append(statistics.median(times))
                    info[dense] = m["config"]
            row = dict(procs=procs, dist="none" if procs == 1 else args.dist,
                       dense_step_ms=1e3 * statistics.median(samples[True]),
                       mod_step_ms=1e3 * statistics.median(samples[False]))
            tokens = args.batch_size * args.seq_len
            row["dense_tokens_s"] = tokens / (row["dense_step_ms"] / 1e3)
            row["mod_tokens_s"] = tokens / (row["mod_step_ms"] / 1e3)
            row["speedup"] = row["mod_tokens_s"] / row["dense_tokens_s"]
            row["dense_mflops_token"] = info[True]["flops_per_token"] / 1e6
            row["mod_mflops_token"] = info[False]["flops_per_token"] / 1e6
            row["threads_per_proc"] = info[True]["threads"] or max(1, (os.cpu_count() or 1) // procs)
            row["target"] = judge(row["speedup"], TARGET, True) if not args.gpu and not args.quick else ""
            row["samples_ms"] = {"dense": [1e3 * t for t in samples[True]], "mod": [1e3 * t for t in samples[False]]}
            rows.append(row)
            results.add(row)
            print(f"procs {procs}: dense {row['dense_tokens_s']:,.0f} tokens/s, MoD {row['mod_tokens_s']:,.0f} "
                  f"tokens/s: {row['speedup']:.2f}x", flush=True)
    print()
    print(md_table(rows, [("processes", "procs", "d"), ("dist", "dist", "s"), ("threads/proc", "threads_per_proc", "d"),
                          ("dense step ms", "dense_step_ms", ".0f"), ("MoD step ms", "mod_step_ms", ".0f"),
                          ("dense tokens/s", "dense_tokens_s", ",.0f"), ("MoD tokens/s", "mod_tokens_s", ",.0f"),
                          ("MoD / dense", "speedup", ".2f"), (f"target >= {TARGET}x", "target", "s")]))
    results.save()
    return rows


if __name__ == "__main__":
    main()
