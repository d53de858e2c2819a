"""Benchmark each mod_ext op against the plain-PyTorch composite a user would write,
eager and under torch.compile, in the same run.

    python benchmarks/bench_ops.py --quick                      # CPU, < 1 minute
    python benchmarks/bench_ops.py --json out/ops_cpu.json      # CPU, default shapes
    python benchmarks/bench_ops.py --device cuda --json out/ops_cuda.json
    python benchmarks/bench_ops.py --ops autograd --repeats 31   # the autograd figures only

The "autograd" section times forward + ``.sum().backward()`` of gather_tokens and
scatter_add_weighted against the plain-PyTorch composite (``torch.gather``;
``x.scatter_add(1, idx_expanded, w[..., None] * y)``), interleaved, at the CPU benchmark
shape and on a tiny (1, 8, 8) input where per-call overhead dominates, where the forward
alone (with and without requires_grad) is timed too (targets: >= 1.5x at the big shape on
the CPU; <= 1.2x the torch time on the tiny one). Use --threads 1 on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_common_args, compiled, env_info, grad_fn, judge, md_table,  # noqa: E402
                    interleaved_medians, mod_ext, print_env, setup, Results)
from mod_ext.reference import threshold_route_ref  # noqa: E402

# Targets (mod_ext speedup over each baseline; fraction of device-copy bandwidth).
CPU_SPEEDUP = {"topk_route": 1.5, "gather_tokens": 3.0, "scatter_add_weighted": 1.5}
GPU_SPEEDUP = {"topk_route": 3.0}
GPU_COPY_FRACTION = {"gather_tokens": 0.85, "scatter_add_weighted": 0.85}
AUTOGRAD_SPEEDUP = 1.5    # fwd + .sum().backward() at the benchmark shape, CPU
OVERHEAD_RATIO = 1.2      # mod_ext time / torch time on a tiny input, at most


# --------------------------------------------------------------------------------------
# Plain-PyTorch baselines
# --------------------------------------------------------------------------------------


def topk_base(logits, k):
    return torch.sort(torch.topk(logits, k, dim=1).indices, dim=1).values


def threshold_base(scores, k):
    return threshold_route_ref(scores, k)[0]


def gather_base(x, idx):
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_base(x, y, idx, w):
    idx_exp = idx[..., None].expand(-1, -1, x.shape[-1])
    return x.clone().scatter_add_(1, idx_exp, w[..., None].to(y.dtype) * y)


# --------------------------------------------------------------------------------------
# Byte counts (the traffic an ideal kernel needs; e = element size of x)
# --------------------------------------------------------------------------------------


def gather_bytes(B, S, D, k, e, backward):
    # fwd: read idx (8 B each) and the k routed rows of x, write the (B, k, D) output.
    fwd = 8 * B * k + 2 * B * k * D * e
    # bwd: read idx and grad_out (B, k, D), write the whole grad_x (B, S, D) (zeros + rows).
    bwd = 8 * B * k + B * k * D * e + B * S * D * e
    return fwd + (bwd if backward else 0)


def scatter_bytes(B, S, D, k, e, backward):
    # fwd: read x (B, S, D), y (B, k, D), w (fp32) and idx; write out (B, S, D).
    fwd = 2 * B * S * D * e + B * k * D * e + 4 * B * k + 8 * B * k
    # bwd: grad_x is grad_out itself (no traffic); read idx, w, the k routed rows of
    # grad_out and y (B, k, D); write grad_y (B, k, D) and grad_w (B, k) fp32.
    bwd = 8 * B * k + 4 * B * k + 3 * B * k * D * e + 4 * B * k
    return fwd + (bwd if backward else 0)


# --------------------------------------------------------------------------------------


def compare(rows, args, op, shape, pas, mod_fn, base_fn, inputs, grad_out=None, nbytes=None):
    """Time mod_ext against the eager (and compiled) baseline on the same inputs; append rows."""
    gpu = args.gpu_shapes
    speedup_target = (GPU_SPEEDUP if gpu else CPU_SPEEDUP).get(op)
    copy_target = GPU_COPY_FRACTION.get(op) if gpu else None

    def call(fn):
        return grad_fn(fn, inputs, grad_out) if grad_out is not None else (lambda: fn(*inputs))

    fns = {"mod_ext": call(mod_fn), "torch eager": call(base_fn)}
    if args.compile:
        fns["torch compiled"] = call(compiled(base_fn))
    if nbytes is not None:
        # Reference: dst.copy_(src) of a tensor with nbytes bytes; it reads and writes
        # nbytes each, so its bandwidth is 2 * nbytes / time.
        src = torch.empty(nbytes // inputs[0].element_size(), dtype=inputs[0].dtype, device=args.device)
        dst = torch.empty_like(src)
        fns["copy"] = lambda: dst.copy_(src)
    # Interleaved: every implementation (and the copy) is timed under the same load.
    times = dict(zip(fns, interleaved_medians(list(fns.values()), args.repeats)))
    copy_ms = times.pop("copy") * 1e3 if nbytes is not None else None

    for impl, t in times.items():
        row = {"op": op, "shape": shape, "pass": pas, "impl": impl, "ms": t * 1e3}
        if nbytes is not None:
            row["bytes"] = nbytes
            row["gbps"] = nbytes / t / 1e9
            row["copy_frac"] = row["gbps"] / (2 * nbytes / copy_ms / 1e6)
        if impl == "mod_ext":
            if copy_target is not None:
                row["target"] = f">= {copy_target:.0%} of copy"
                row["status"] = judge(row["copy_frac"], copy_target, True)
        else:
            row["speedup"] = t / times["mod_ext"]
            if speedup_target is not None:
                row["target"] = f">= {speedup_target}x"
                row["status"] = judge(row["speedup"], speedup_target, True)
        rows.add(row)
    if nbytes is not None:
        rows.add({"op": op, "shape": shape, "pass": pas, "impl": f"copy_ {nbytes / 2**20:.1f} MiB (ref)",
                  "ms": copy_ms, "bytes": 2 * nbytes, "gbps": 2 * nbytes / copy_ms / 1e6, "copy_frac": 1.0})
    for r in rows[-len(times) - (nbytes is not None):]:
        print(f"  {op:21s} {shape:32s} {pas:8s} {r['impl']:22s} {r['ms']:9.3f} ms", flush=True)


def _sum_backward(fn, leaves):
    """fn(*leaves).sum().backward(), with the leaves' .grad reset first (no accumulation)."""
    def call():
        for t in leaves:
            t.grad = None
        fn(*leaves).sum().backward()
    return call


def autograd_rows(rows, args, dev, dt, B, S, D, k):
    """Forward + .sum().backward() through autograd (C++ autograd::Function for mod_ext),
    interleaved with the plain-PyTorch composite, at (B, S, D), k and at (1, 8, 8), k = 2."""
    for shape_kind, (b, s, d, kk) in (("bench", (B, S, D, k)), ("tiny", (1, 8, 8, 2))):
        shape = f"B={b} S={s} D={d} k={kk} {args.dtype}"
        x = torch.randn(b, s, d, device=dev, dtype=dt, requires_grad=True)
        y = torch.randn(b, kk, d, device=dev, dtype=dt, requires_grad=True)
        w = torch.rand(b, kk, device=dev, dtype=dt, requires_grad=True)
        idx = mod_ext.topk_route(torch.randn(b, s, device=dev), kk)[0]
        idx_exp = idx[..., None].expand(-1, -1, d)
        pairs = {
            "gather_tokens": (_sum_backward(lambda x: mod_ext.gather_tokens(x, idx), [x]),
                              _sum_backward(lambda x: torch.gather(x, 1, idx_exp), [x])),
            "scatter_add_weighted": (
                _sum_backward(lambda x, y, w: mod_ext.scatter_add_weighted(x, y, idx, w), [x, y, w]),
                _sum_backward(lambda x, y, w: x.scatter_add(1, idx_exp, w[..., None] * y), [x, y, w])),
        }
        passes = [(op, "fwd+.sum().bwd", fns) for op, fns in pairs.items()]
        if shape_kind == "tiny":  # per-call overhead of the forward alone, with and without grad
            xd, yd, wd = x.detach(), y.detach(), w.detach()
            for sfx, (xa, ya, wa) in (("", (xd, yd, wd)), (" (requires_grad)", (x, y, w))):
                passes.append(("gather_tokens", "fwd" + sfx, (lambda xa=xa: mod_ext.gather_tokens(xa, idx),
                                                              lambda xa=xa: torch.gather(xa, 1, idx_exp))))
                passes.append(("scatter_add_weighted", "fwd" + sfx, (
                    lambda xa=xa, ya=ya, wa=wa: mod_ext.scatter_add_weighted(xa, ya, idx, wa),
                    lambda xa=xa, ya=ya, wa=wa: xa.scatter_add(1, idx_exp, wa[..., None] * ya))))
        for op, pas, (mod_fn, base_fn) in passes:
            t_mod, t_base = interleaved_medians([mod_fn, base_fn], args.repeats)
            speedup = t_base / t_mod
            if shape_kind == "bench":
                target, status = f">= {AUTOGRAD_SPEEDUP}x", judge(speedup, AUTOGRAD_SPEEDUP, True)
            else:
                target, status = f"<= {OVERHEAD_RATIO}x torch time", judge(t_mod / t_base, OVERHEAD_RATIO, False)
            rows.add({"op": op, "shape": shape, "pass": pas, "impl": "mod_ext", "ms": t_mod * 1e3,
                      "target": target if not args.gpu_shapes else "", "status": status if not args.gpu_shapes else ""})
            rows.add({"op": op, "shape": shape, "pass": pas, "impl": "torch eager", "ms": t_base * 1e3,
                      "speedup": speedup})
            print(f"  {op:21s} {shape:32s} {pas:22s} mod_ext {t_mod * 1e6:9.1f} us  torch {t_base * 1e6:9.1f} us"
                  f"  speedup {speedup:.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch", type=int, help="B for all ops (default: per-op default shapes)")
    p.add_argument("--seq", type=int, help="S for all ops")
    p.add_argument("--dim", type=int, help="D for gather/scatter")
    p.add_argument("--k", type=int, help="capacity k for all ops")
    p.add_argument("--ops", default="topk_route,threshold_route,gather_tokens,scatter_add_weighted,autograd",
                   help="comma-separated subset of ops (autograd: the fwd + .sum().backward() section)")
    args = p.parse_args()
    setup(args)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    ops = args.ops.split(",")
    env = env_info(args)
    print_env(env)

    if args.gpu_shapes:
        route_shapes, (B, S, D, k) = [(8, 8192, 1024), (64, 4096, 512)], (8, 8192, 4096, 1024)
    else:
        route_shapes, (B, S, D, k) = [(16, 4096, 512), (64, 2048, 256)], (8, 1024, 512, 128)
    if args.batch or args.seq or args.k:
        b0, s0, k0 = route_shapes[0]
        route_shapes = [(args.batch or b0, args.seq or s0, args.k or k0)]
    B, S, D, k = args.batch or B, args.seq or S, args.dim or D, args.k or k

    rows = Results(args.json, env)
    # Router logits/scores are float32 whatever --dtype is (MOD_SPEC 1.1; mod_block does this).
    for rb, rs, rk in route_shapes:
        shape = f"B={rb} S={rs} k={rk} fp32"
        logits = torch.randn(rb, rs, device=dev)
        if "topk_route" in ops:
            assert torch.equal(mod_ext.topk_route(logits, rk)[0], topk_base(logits, rk))
            compare(rows, args, "topk_route", shape, "fwd", lambda l, c: mod_ext.topk_route(l, c)[0],
                    topk_base, [logits, rk])
        if "threshold_route" in ops:
            assert torch.equal(mod_ext.threshold_route(logits, rk)[0], threshold_base(logits, rk))
            compare(rows, args, "threshold_route", shape, "fwd", lambda l, c: mod_ext.threshold_route(l, c)[0],
                    threshold_base, [logits, rk])

    shape = f"B={B} S={S} D={D} k={k} {args.dtype}"
    x = torch.randn(B, S, D, device=dev, dtype=dt)
    idx = mod_ext.topk_route(torch.randn(B, S, device=dev), k)[0]  # unique, ascending
    e = x.element_size()
    if "gather_tokens" in ops:
        assert torch.equal(mod_ext.gather_tokens(x, idx), gather_base(x, idx))
        compare(rows, args, "gather_tokens", shape, "fwd", mod_ext.gather_tokens, gather_base, [x, idx],
                nbytes=gather_bytes(B, S, D, k, e, False))
        xg = x.clone().requires_grad_()
        compare(rows, args, "gather_tokens", shape, "fwd+bwd", lambda x: mod_ext.gather_tokens(x, idx),
                lambda x: gather_base(x, idx), [xg],
                grad_out=torch.randn(B, k, D, device=dev, dtype=dt), nbytes=gather_bytes(B, S, D, k, e, True))
    if "scatter_add_weighted" in ops:
        y = torch.randn(B, k, D, device=dev, dtype=dt)
        w = torch.rand(B, k, device=dev)  # router weights are float32
        # The baseline rounds w * y to x.dtype before adding; mod_ext rounds once (fp32 math).
        tol = {} if dt == torch.float32 else {"atol": 0.05, "rtol": 0.02}
        torch.testing.assert_close(mod_ext.scatter_add_weighted(x, y, idx, w), scatter_base(x, y, idx, w), **tol)
        compare(rows, args, "scatter_add_weighted", shape, "fwd", mod_ext.scatter_add_weighted, scatter_base,
                [x, y, idx, w], nbytes=scatter_bytes(B, S, D, k, e, False))
        leaves = [t.clone().requires_grad_() for t in (x, y, w)]
        compare(rows, args, "scatter_add_weighted", shape, "fwd+bwd",
                lambda x, y, w: mod_ext.scatter_add_weighted(x, y, idx, w),
                lambda x, y, w: scatter_base(x, y, idx, w), leaves,
                grad_out=torch.randn(B, S, D, device=dev, dtype=dt), nbytes=scatter_bytes(B, S, D, k, e, True))

    if "autograd" in ops:
        autograd_rows(rows, args, dev, dt, B, S, D, k)

    print()
    print(md_table(rows, [("op", "op", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("impl", "impl", ""),
                          ("median ms", "ms", ".3f"), ("mod_ext speedup", "speedup", ".2f"),
                          ("GB/s", "gbps", ".1f"), ("of copy BW", "copy_frac", ".0%"),
                          ("target", "target", ""), ("status", "status", "")]))
    rows.save()


if __name__ == "__main__":
    main()
