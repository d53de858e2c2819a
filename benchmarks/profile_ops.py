"""Where the time of gather_tokens and scatter_add_weighted forward+backward goes (CPU):
each op alone, the allocation it cannot avoid, and the autograd path, at the CPU
benchmark shape (8, 1024, 512), k = 128, fp32. The breakdowns behind the "profiled"
sections of benchmarks/RESULTS.md.

    python benchmarks/profile_ops.py                 # markdown rows: what | ms
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/profile_ops.py   # PyTorch's huge-page allocations

Timing: time.perf_counter over `--calls` calls, median of `--repeats` rounds, after 3
warm-up calls. "kept" rows keep the last two results alive, so every call gets freshly
mapped memory (as in a training step, where many tensors are alive), while "freed" rows
drop each result at once and the allocator hands the same warm pages back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_count, mod_ext  # noqa: E402


def median_ms(fn, calls, repeats):
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(rounds)


def kept(fn):
    """fn, with its last two results kept alive."""
    alive = []

    def call():
        alive.append(fn())
        if len(alive) > 2:
            alive.pop(0)

    return call


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, S, D, k = 8, 1024, 512, 128
    ops = torch.ops.mod_ext
    x = torch.randn(B, S, D)
    idx = mod_ext.topk_route(torch.randn(B, S), k)[0]
    idx_exp = idx[..., None].expand(-1, -1, D)
    g_sel = torch.randn(B, k, D)  # gradient of the gathered rows
    y, w, g_out = torch.randn(B, k, D), torch.rand(B, k), torch.randn(B, S, D)
    xl, yl, wl = (t.clone().requires_grad_() for t in (x, y, w))

    def scatter_base(x, y, w):
        return x.clone().scatter_add_(1, idx_exp, w[..., None] * y)

    scatter_compiled = torch.compile(scatter_base, dynamic=False)
    rows = [
        ("gather", "mod_ext forward op", lambda: ops.gather_tokens(x, idx)),
        ("gather", "torch.gather forward (expanded index)", lambda: torch.gather(x, 1, idx_exp)),
        ("gather", "mod_ext backward op, results freed (warm pages)", lambda: ops.gather_tokens_backward(g_sel, idx, S)),
        ("gather", "mod_ext backward op, results kept (fresh pages)",
         kept(lambda: ops.gather_tokens_backward(g_sel, idx, S))),
        ("gather", "torch.zeros(B, S, D), freed", lambda: torch.zeros(B, S, D)),
        ("gather", "torch.zeros(B, S, D), kept", kept(lambda: torch.zeros(B, S, D))),
        ("gather", "mod_ext forward + backward via autograd",
         lambda: torch.autograd.grad(mod_ext.gather_tokens(xl, idx), [xl], g_sel)),
        ("gather", "torch eager forward + backward via autograd",
         lambda: torch.autograd.grad(torch.gather(xl, 1, idx_exp), [xl], g_sel)),
        ("scatter", "mod_ext forward op (out of place)", lambda: ops.scatter_add_weighted(x, y, idx, w)),
        ("scatter", "x.clone() (the copy an out-of-place forward makes)", lambda: x.clone()),
        ("scatter", "mod_ext backward op (grad_y and grad_w fused)",
         lambda: ops.scatter_add_weighted_backward(g_out, y, idx, w)),
        ("scatter", "mod_ext forward + backward via autograd",
         lambda: torch.autograd.grad(mod_ext.scatter_add_weighted(xl, yl, idx, wl), [xl, yl, wl], g_out)),
        ("scatter", "torch eager forward + backward",
         lambda: torch.autograd.grad(scatter_base(xl, yl, wl), [xl, yl, wl], g_out)),
        ("scatter", "torch compiled forward + backward",
         lambda: torch.autograd.grad(scatter_compiled(xl, yl, wl), [xl, yl, wl], g_out)),
        ("scatter", "mod_ext in-place forward (used under no_grad)",
         lambda: ops.scatter_add_weighted_(x, y, idx, w)),
    ]
    # Dispatch overhead: the same calls on a (1, 8, 8) input, in microseconds.
    xs = torch.randn(1, 8, 8, requires_grad=True)
    ids = mod_ext.topk_route(torch.randn(1, 8), 2)[0]
    gs = torch.randn(1, 2, 8)
    tiny = [
        ("mod_ext gather forward + backward via autograd",
         lambda: torch.autograd.grad(mod_ext.gather_tokens(xs, ids), [xs], gs)),
        ("torch.gather forward + backward via autograd",
         lambda: torch.autograd.grad(torch.gather(xs, 1, ids[..., None].expand(-1, -1, 8)), [xs], gs)),
        ("mod_ext gather ops called directly (no autograd)",
         lambda: ops.gather_tokens_backward(ops.gather_tokens(xs.detach(), ids), ids, 8)),
    ]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, mod_ext {mod_ext.__version__} "
          f"({mod_ext.build_info()['backend']}), THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')}")
    print(f"\n(B, S, D) = ({B}, {S}, {D}), k = {k}, float32\n\n| op | what | ms |\n|---|---|---:|")
    for op, what, fn in rows:
        print(f"| {op} | {what} | {median_ms(fn, args.calls, args.repeats):.3f} |", flush=True)
    print("\n(1, 8, 8), k = 2: per-call overhead\n\n| what | us |\n|---|---:|")
    for what, fn in tiny:
        print(f"| {what} | {median_ms(fn, 10 * args.calls, args.repeats) * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
