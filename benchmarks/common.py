"""Shared helpers for the mod_ext benchmarks: command-line options, environment record,
timing (torch.utils.benchmark.Timer), markdown tables, and the plain-PyTorch MoD
baseline (what a user would write without mod_ext)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import benchmark

warnings.filterwarnings("ignore", message="No CUDA runtime is found")
import mod_ext  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------
# Options and setup
# --------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="hidden-state dtype (default: float32; bfloat16 with GPU shapes)")
    p.add_argument("--gpu-shapes", action="store_true",
                   help="use the GPU shapes (automatic with --device cuda)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed blocks per measurement; the median is reported (default 15, quick 5)")
    p.add_argument("--threads", type=int, default=cpu_count(),
                   help="torch.set_num_threads (default: the CPU count, %(default)s)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time the torch.compile versions (default on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--quick", action="store_true", help="smaller/fewer runs: under a minute on CPU")
    p.add_argument("--json", metavar="OUT", help="write results and environment as JSON")


def setup(args: argparse.Namespace) -> None:
    """Resolve defaults that depend on other options, set threads, check the device."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if not mod_ext.cuda_built():
            raise SystemExit(f"--device cuda: mod_ext was built without CUDA: {mod_ext.build_info()}")
        args.gpu_shapes = True
    if args.dtype is None:
        args.dtype = "bfloat16" if args.gpu_shapes else "float32"
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    if args.compile is None:
        args.compile = not args.quick
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def env_info(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": args.device,
        "device_name": name,
        "cpu_count": cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mod_ext": mod_ext.__version__,
        "mod_ext_build": mod_ext.build_info(),
        "git_commit": commit,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
    }


def print_env(env: dict) -> None:
    print(f"# {env['date']}  torch {env['torch']} (CUDA {env['cuda']})  device {env['device']}: "
          f"{env['device_name']}  cpus {env['cpu_count']}  threads {env['threads']}  "
          f"load {env['load_avg_1min']}  mod_ext {env['mod_ext']} ({env['mod_ext_build']['backend']})")


class Results(list):
    """Result rows, rewritten to the JSON file (with the environment) after every row,
    so a run cut short by a timeout still leaves what it measured."""

    def __init__(self, path: Optional[str], env: dict):
        super().__init__()
        self.path, self.env = path, env

    def add(self, row: dict) -> None:
        self.append(row)
        self.save(final=False)

    def save(self, final: bool = True) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump({"env": self.env, "complete": final, "results": list(self)}, f, indent=1)
        if final:
            print(f"\nwrote {self.path}")


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def median_time(fn: Callable[[], object], repeats: int, block_s: float = 0.02, warmup: int = 2) -> float:
    """Median seconds per call of ``fn()`` over ``repeats`` timed blocks.

    torch.utils.benchmark.Timer synchronises the accelerator around each block and runs
    with the current thread count. Each block repeats ``fn`` enough times to last about
    ``block_s`` (calibrated on one call after the warm-up calls, which also compile)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    for _ in range(warmup):
        fn()
    one = timer.timeit(1).median
    number = max(1, int(block_s / max(one, 1e-9)))
    return statistics.median(timer.timeit(number).median for _ in range(repeats))


def interleaved_medians(fns: list, repeats: int, block_s: float = 0.02, warmup: int = 2) -> list:
    """Median seconds per call of each fn, timing one block of each in turn (A, B, C, A,
    B, C, ...) so that load changes on a shared machine hit every implementation alike
    and their ratios stay fair. Blocks last about ``block_s`` each (calibrated per fn
    after its warm-up calls, which also compile); torch.utils.benchmark.Timer
    synchronises the accelerator around each block."""
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for fn in fns]
    numbers = []
    for fn, timer in zip(fns, timers):
        for _ in range(warmup):
            fn()
        numbers.append(max(1, int(block_s / max(timer.timeit(1).median, 1e-9))))
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, (timer, n) in enumerate(zip(timers, numbers)):
            samples[i].append(timer.timeit(n).median)
    return [statistics.median(x) for x in samples]


def compiled(fn: Callable, **kw) -> Callable:
    """torch.compile(fn) with a clean dynamo cache (each case compiles for its own shapes)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **kw)


def grad_fn(fn: Callable[..., Tensor], inputs: list, grad_out: Tensor) -> Callable[[], object]:
    """Forward + backward via autograd with a fixed random grad_output; autograd.grad
    (rather than .backward) so no .grad accumulation is timed."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def judge(value: Optional[float], target: Optional[float], higher_is_better: bool) -> str:
    """'met' / 'missed' from a measurement; '' without a target."""
    if target is None or value is None:
        return ""
    return "met" if (value >= target if higher_is_better else value <= target) else "missed"


def fmt(v, spec: str = ".3f") -> str:
    if v is None or v == "":
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def md_table(rows: list, columns: list) -> str:
    """columns: list of (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), s) for _, k, s in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# A transformer block and the plain-PyTorch MoD baseline
# --------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm, causal SDPA attention, SwiGLU (or GELU) MLP.

    ``update(x)`` is the residual function f (attention + MLP output, no residual), the
    thing MoD routes; ``forward(x) = x + update(x)`` is the dense layer."""

    def __init__(self, dim: int, heads: int, mlp: str = "swiglu"):
        super().__init__()
        self.heads, self.mlp = heads, mlp
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        if mlp == "swiglu":
            hidden = 64 * round(8 * dim / 3 / 64)
            self.w_in = nn.Linear(dim, 2 * hidden, bias=False)  # gate and value in one matmul
        else:
            hidden = 4 * dim
            self.w_in = nn.Linear(dim, hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def attention(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))

    def feed_forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.mlp == "swiglu":
            gate, val = h.chunk(2, dim=-1)
            h = F.silu(gate) * val
        else:
            h = F.gelu(h)
        return self.w_out(h)

    def update(self, x: Tensor) -> Tensor:
        a = self.attention(self.norm1(x))
        return a + self.feed_forward(self.norm2(x + a))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.update(x)


def torch_mod_block(x: Tensor, router_weight: Tensor, block_fn: Callable[[Tensor], Tensor], k: int) -> Tensor:
    """The MoD layer as a user would write it with stock ops: top-k + sort of the indices,
    gather with an expanded index, the block on the routed tokens, multiply by the
    router weight, scatter_add back. Same semantics as mod_ext.mod_block with
    router_activation="sigmoid" (float32 logits, no padding)."""
    logits = x.float() @ router_weight.float()  # (B, S)
    idx = torch.sort(torch.topk(logits.detach(), k, dim=1).indices, dim=1).values  # (B, k)
    r = torch.sigmoid(logits.gather(1, idx))  # (B, k)
    idx_exp = idx[..., None].expand(-1, -1, x.shape[-1])
    f = block_fn(torch.gather(x, 1, idx_exp))
    return x.scatter_add(1, idx_exp, r[..., None].to(x.dtype) * f)
