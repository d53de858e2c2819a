"""Train the reference MoD language model, on one process or many (DDP or FSDP2).

    python -m mod_ext.train                                   # one process, Shakespeare
    python -m mod_ext.train --dense                           # the dense baseline
    torchrun --nproc-per-node 2 -m mod_ext.train --dist ddp   # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc-per-node 2 -m mod_ext.train --dist fsdp2 --resume   # continue from --out's last checkpoint

One command from one process to many, on PyTorch's own distributed engine:
``DistributedDataParallel`` (``--dist ddp``) or ``torch.distributed.fsdp.fully_shard``
per transformer block (``--dist fsdp2``), checkpoints through
``torch.distributed.checkpoint`` (DCP; a checkpoint saved on N processes resumes on M).

What is computed where (so that splitting the batch changes nothing):

* **Data.** Step s draws its whole global batch (``--batch-size`` G windows of
  ``--seq-len`` tokens) from a generator seeded by (seed, s), on every rank; the batch is
  cut into ``--grad-accum`` A micro-batches of G / A rows and each micro-batch into
  ``world_size`` W rank slices. One process with batch G sees the same rows as W
  processes with G / W each, and a resumed run the same rows as an uninterrupted one.
* **Loss.** Routing is per sequence (top-k over each row), so nothing couples rows
  except the loss normalisation. Every micro-batch's loss is its *sum* of token losses
  divided by the token count of the whole global batch (target tokens for the LM loss,
  valid tokens for the MoD aux loss), which every rank knows without communication.
  Summed over micro-batches and ranks this is exactly the global-batch mean, with or
  without padding. DDP and FSDP2 average gradients over ranks, so each rank's loss is
  multiplied by W.
* **Gradients.** DDP all-reduces in buckets (``no_sync`` on all but the last
  micro-batch); FSDP2 reduce-scatters per block (``set_requires_gradient_sync(False)``
  on all but the last). Gloo's ``ReduceOp.AVG`` summed instead of averaging in some
  PyTorch releases (pytorch/pytorch#162338), which silently doubled FSDP2's float32
  gradients on CPU: :func:`gloo_avg_is_broken` probes the installed PyTorch with the
  same collective FSDP2 calls, and where it is broken the run uses FSDP2's sum-based
  reduction (``set_force_sum_reduction_for_comms``) instead.
* **Parameters nothing trains** are frozen before wrapping, so DDP never needs
  ``find_unused_parameters``: the predictor when ``--aux-loss-weight 0`` (its only
  loss) or when training with ``--routing causal`` (causal mode has no top-k targets,
  and its thresholded decisions pass no gradient). Every other parameter gets a
  gradient every step: the router through ``r * f``, the predictor (or, with
  ``--causal-router router``, the router) through the aux loss.
* **Mixed precision** (``--dtype bfloat16``): autocast on one process and under DDP;
  under FSDP2 ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
  (torchtitan's split). Master weights and optimizer state stay float32.
  ``--dtype float64`` trains in float64 (for checking).

* **Causal routing** is scored after training: the causal thresholds are first
  calibrated on ``--calibrate-batches`` training batches (every rank the same whole
  batches, so the same thresholds), then ``causal_routing`` in metrics.json compares the
  decisions with top-k (:func:`mod_ext.routing_metrics`) per layer, beside threshold 0
  and, for a predictor model, the router logits at their own calibrated threshold.
* **Router health** (:class:`mod_ext.RouterHealth`) accumulates on the device every
  micro-batch and is read once per ``--log-every`` steps (``health`` in metrics.json);
  NaN/inf in router logits or hidden states stops every rank with an error naming the
  MoD layer. The predictors' gradients are clipped apart from the language model's, so a
  predictor can never scale the model's update.

Writes to ``--out`` (default runs/train): ``metrics.json`` (every step's loss, LM and aux
loss, gradient norms, learning rate, step time; evaluations; router health; causal
routing), ``loss.png``,
``checkpoints/step_XXXXXXXX/`` (DCP) and ``model.pt`` (the final model,
:func:`load_model`). Progress (tqdm) and logs on rank 0 only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .health import RouterHealth, RouterHealthError
from .layer import MoDBlock, routing_metrics
from .models import ModelConfig, MoDTransformer

__all__ = [
    "CHECKPOINT_FORMAT",
    "GlobalBatches",
    "DistEnv",
    "build_parser",
    "parse_args",
    "gloo_avg_is_broken",
    "init_distributed",
    "latest_checkpoint",
    "load_model",
    "lr_at",
    "main",
    "make_optimizer",
    "model_config",
    "prepare_model",
    "save_model",
    "frozen_parameters",
]

#: Version of the checkpoint layout (train_state.json + DCP files); resume refuses others.
CHECKPOINT_FORMAT = 1

# Defaults of a full run and of --quick (explicit command-line values override both).
FULL = dict(steps=200, batch_size=16, seq_len=256, d_model=128, n_layer=6, n_head=4, lr=2e-3,
            eval_every=50, eval_batches=4)
QUICK = dict(steps=6, batch_size=4, seq_len=64, d_model=32, n_layer=2, n_head=2, lr=3e-3,
             eval_every=3, eval_batches=1)

#: Options that change what is computed: a checkpoint resumes only with equal values.
RESUME_FIXED = ("steps", "batch_size", "seq_len", "d_model", "n_layer", "n_head", "dense",
                "capacity_factor", "mod_every", "causal_router", "router_activation", "aux_loss_weight",
                "routing", "lr", "min_lr", "warmup", "schedule", "weight_decay", "grad_clip", "seed",
                "pad_fraction", "dtype", "corpus_sha256", "random_routing", "router_aux_grad_scale")
# (router_aux_grad_scale only matters with --causal-router router, whose older checkpoints
# lack the Platt parameters and cannot resume anyway: predictor checkpoints still resume)
#: options added after the first checkpoint format, with the value older checkpoints mean
RESUME_DEFAULTS = {"random_routing": False, "router_aux_grad_scale": 0.3}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mod_ext.train",
        description="Train the reference MoD language model (or its dense baseline) on one process, "
                    "or under torchrun with --dist ddp|fsdp2.")
    a = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="UTF-8 text file to train on (90/10 split; default: Shakespeare)")
    g.add_argument("--cache-dir", default=None, help="Shakespeare corpus cache (default $MOD_EXT_CACHE or "
                   "~/.cache/mod_ext/shakespeare)")
    g.add_argument("--pad-fraction", type=float, default=0.0,
                   help="left-pad each window by a random 0..F of its tokens (padding mask; default 0)")
    g = p.add_argument_group("model")
    g.add_argument("--dense", action="store_true", help="the dense baseline (no MoD layers)")
    g.add_argument("--d-model", type=int, help=f"width (default {FULL['d_model']})")
    g.add_argument("--n-layer", type=int, help=f"layers (default {FULL['n_layer']})")
    g.add_argument("--n-head", type=int, help=f"attention heads (default {FULL['n_head']})")
    g.add_argument("--seq-len", type=int, help=f"tokens per window = block_size (default {FULL['seq_len']})")
    g.add_argument("--capacity-factor", type=float, default=0.125, help="MoD capacity factor c (default 0.125)")
    g.add_argument("--mod-every", type=int, default=2, help="every n-th layer is MoD (default 2)")
    g.add_argument("--causal-router", choices=["predictor", "router"], default="predictor",
                   help="what routes causally when sampling, trained by the aux loss (default predictor)")
    g.add_argument("--router-activation", choices=["sigmoid", "scaled_sigmoid", "identity"], default="sigmoid")
    g.add_argument("--aux-loss-weight", type=float, default=0.1, help="weight of the MoD aux loss (default 0.1)")
    g.add_argument("--router-aux-grad-scale", type=float, default=0.3,
                   help="with --causal-router router: share of the aux loss's gradient that reaches the hidden "
                        "states, in [0, 1] (default 0.3; 1 is the paper's aux loss)")
    g.add_argument("--random-routing", action="store_true",
                   help="top-k over random scores instead of the router's (the paper's random-routing baseline)")
    g.add_argument("--routing", choices=["topk", "causal"], default="topk",
                   help="routing while training (default topk, the paper's; causal freezes the predictor)")
    g = p.add_argument_group("budget and optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL['steps']})")
    g.add_argument("--flops", type=float, default=None,
                   help="training-FLOP budget instead of --steps: steps = flops / (3 x forward FLOPs per step)")
    g.add_argument("--batch-size", type=int, help=f"global batch in sequences, all ranks and micro-batches "
                   f"(default {FULL['batch_size']})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {FULL['lr']})")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 10%% of the steps)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay after warm-up (default cosine)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the initialisation and the data order")
    g = p.add_argument_group("execution")
    g.add_argument("--dist", choices=["none", "ddp", "fsdp2"], default="none",
                   help="none (one process), ddp or fsdp2 (launch with torchrun)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (one GPU per rank: LOCAL_RANK), else cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32",
                   help="bfloat16 = mixed precision (autocast, or FSDP2's MixedPrecisionPolicy)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile each transformer block (default backend inductor)")
    g.add_argument("--activation-checkpointing", choices=["none", "non-reentrant", "reentrant"], default="none",
                   help="recompute each block's activations in backward (default none)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: CPU cores / processes on this node)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    g.add_argument("--eval-every", type=int, help="evaluate every n steps, 0 = only at the end")
    g.add_argument("--eval-batches", type=int, help="held-out global batches per evaluation")
    g.add_argument("--calibrate-batches", type=int, default=8,
                   help="training batches that calibrate the causal thresholds before the final evaluation "
                        "(MoDTransformer.calibrate_causal_routing); 0 = keep the threshold at logit 0 (default 8)")
    g.add_argument("--log-every", type=int, default=10,
                   help="gather the losses every n steps (one host sync; every step is still recorded)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (default: only at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory (default: the latest in --out/checkpoints; "
                        "'auto': the latest if there is one, else start, e.g. for requeued jobs)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this step, e.g. to split a run over job allocations")
    g.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    a("--quick", action="store_true", help="tiny configuration for smoke tests (seconds)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the options (argparse errors name the option)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.flops is not None and args.steps is not None:
        p.error("--flops and --steps both set the number of steps: pass one")
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "batch_size", "seq_len", "d_model", "n_layer", "n_head", "grad_accum", "mod_every",
                 "log_every", "keep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "eval_batches", "save_every", "calibrate_batches"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.batch_size % args.grad_accum:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --grad-accum {args.grad_accum}")
    if not 0 < args.capacity_factor <= 1:
        p.error(f"--capacity-factor must be in (0, 1], got {args.capacity_factor}")
    if not 0 <= args.pad_fraction < 1:
        p.error(f"--pad-fraction must be in [0, 1), got {args.pad_fraction}")
    for name in ("lr", "aux_loss_weight", "weight_decay", "grad_clip"):
        v = getattr(args, name)
        if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v}")
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if not 0 <= args.min_lr <= args.lr:
        p.error(f"--min-lr must be in [0, --lr = {args.lr}], got {args.min_lr}")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --n-head ({args.n_head}) "
                "with an even head size (rotary embeddings)")
    if not args.dense and args.mod_every > args.n_layer:
        p.error(f"--mod-every {args.mod_every} > --n-layer {args.n_layer}: no layer would be MoD "
                "(use --dense for the baseline)")
    if args.data is not None and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    for parent in [Path(args.out)] + list(Path(args.out).parents):
        if parent.exists():
            if not parent.is_dir():
                p.error(f"--out {args.out}: {parent} is not a directory")
            break
    if args.resume not in (None, "latest", "auto") and not os.path.isdir(args.resume):
        p.error(f"--resume {args.resume}: no such directory")
    if args.flops is not None:
        if not math.isfinite(args.flops) or args.flops <= 0:
            p.error(f"--flops must be a finite number > 0, got {args.flops}")
        with torch.device("meta"):  # only the shapes are read: no weights allocated or initialised
            fpt = MoDTransformer(model_config(args, vocab_size=256)).flops_per_token(args.seq_len)
        per_step = 3 * fpt * args.batch_size * args.seq_len
        steps = int(args.flops // per_step)
        if steps < 1:
            p.error(f"--flops {args.flops:.3g} buys no step ({per_step:.3g} training FLOPs per step)")
        args.steps = steps
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        p.error(f"--stop-at must be in [1, --steps = {args.steps}], got {args.stop_at}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.dist != "none" and "WORLD_SIZE" not in os.environ and not (dist.is_available() and dist.is_initialized()):
        p.error(f"--dist {args.dist} needs a launcher: torchrun --nproc-per-node N -m mod_ext.train --dist "
                f"{args.dist} ... (WORLD_SIZE is not set)")
    if args.dist == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error(f"launched on {os.environ['WORLD_SIZE']} processes (WORLD_SIZE) with --dist none: "
                "pass --dist ddp or --dist fsdp2")
    return args


def model_config(args, vocab_size: int) -> ModelConfig:
    """The :class:`~mod_ext.models.ModelConfig` the options describe."""
    return ModelConfig(
        vocab_size=vocab_size, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
        d_model=args.d_model, capacity_factor=args.capacity_factor, mod_every=0 if args.dense else args.mod_every,
        router_activation=args.router_activation, causal_router=args.causal_router,
        aux_loss_weight=args.aux_loss_weight, random_routing=args.random_routing,
        router_aux_grad_scale=args.router_aux_grad_scale,
    )


# --------------------------------------------------------------------------------------
# Optimisation (also used by mod_ext.demo)
# --------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)) with weight decay on matrices only (nanoGPT); frozen
    parameters are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, steps: int, lr: float, min_lr: Optional[float] = None, warmup: Optional[int] = None,
          schedule: str = "cosine") -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``: linear warm-up over
    ``warmup`` steps (default 10% of the steps), then cosine (or linear) decay to
    ``min_lr`` (default lr / 10) at the last step, or constant."""
    min_lr = lr / 10 if min_lr is None else min_lr
    warmup = max(1, steps // 10) if warmup is None else warmup
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))  # 1 at the last step, steps - 1
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - t)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class GlobalBatches:
    """The global batch of every step, the same on every rank and in every run.

    ``batches(step)`` returns ``(x, y, valid)``: (G, T) int64 inputs, (G, T) int64
    targets (-100 on padding) and a (G, T) bool valid mask (None without padding), from
    random windows of ``data`` drawn with a generator seeded by ``(seed, step)``. With
    ``pad_fraction`` F > 0 each window's first ``n ~ U{0..floor(F T)}`` tokens are
    padding (left padding: token 0, never attended to or routed, no loss).
    """

    def __init__(self, data: Tensor, global_batch: int, seq_len: int, seed: int, pad_fraction: float = 0.0):
        if data.numel() < seq_len + 1:
            raise ValueError(f"mod_ext.train: a stream of {data.numel()} tokens is too short for "
                             f"--seq-len {seq_len} (a window is seq_len + 1 tokens)")
        self.data, self.global_batch, self.seq_len = data, global_batch, seq_len
        self.seed, self.pad_fraction = seed, pad_fraction

    def __call__(self, step: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        from .data import get_batch

        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2 ** 63))
        w = get_batch(self.data, self.global_batch, self.seq_len, g)  # (G, T + 1)
        x, y = w[:, :-1], w[:, 1:].clone()
        if self.pad_fraction == 0:
            return x, y, None
        n_pad = torch.randint(0, int(self.pad_fraction * self.seq_len) + 1, (self.global_batch,), generator=g)
        valid = torch.arange(self.seq_len)[None, :] >= n_pad[:, None]  # (G, T)
        return x.masked_fill(~valid, 0), y.masked_fill(~valid, -100), valid


def _rows(t: Optional[Tensor], micro: int, accum: int, rank: int, world: int) -> Optional[Tensor]:
    """Rank ``rank``'s slice of micro-batch ``micro`` of a global (G, ...) tensor."""
    if t is None:
        return None
    per = t.shape[0] // (accum * world)
    start = (micro * world + rank) * per
    return t[start: start + per]


# --------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    """Where this process runs: rank, world size, device, backend (None: one process)."""

    mode: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()


def init_distributed(mode: str, device: str = "auto") -> DistEnv:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``), or use the one already initialised: nccl when
    training on CUDA (one device per local rank), gloo on the CPU.

    Raises:
        ValueError: an unknown mode, or a process group whose backend does not suit the device.
    """
    if mode not in ("none", "ddp", "fsdp2"):
        raise ValueError(f"mod_ext.train: --dist must be none, ddp or fsdp2, got {mode!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if mode == "none":
        return DistEnv("none", device=torch.device("cuda" if use_cuda else "cpu"))
    created = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    backend = dist.get_backend()
    if not use_cuda and "gloo" not in str(backend):
        raise ValueError(f"mod_ext.train: training on the CPU needs a gloo process group, got {backend}")
    return DistEnv(mode, dist.get_rank(), dist.get_world_size(), local_rank,
                   int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
                   torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"), str(backend), created)


def gloo_avg_is_broken(group=None) -> bool:
    """True when this PyTorch's gloo backend sums where ``ReduceOp.AVG`` should average
    in the reduce-scatter FSDP2 uses for gradients (``dist.reduce_scatter_single``;
    pytorch/pytorch#162338). A collective: every rank of ``group`` must call it.
    False for other backends."""
    if "gloo" not in str(dist.get_backend(group)):
        return False
    world = dist.get_world_size(group)
    out = torch.empty(1)
    try:
        dist.reduce_scatter_single(out, torch.ones(world), op=dist.ReduceOp.AVG, group=group)
    except (RuntimeError, ValueError):  # AVG not supported at all: FSDP2 must not use it either
        return True
    return not math.isclose(out.item(), 1.0, rel_tol=1e-6)


# --------------------------------------------------------------------------------------
# The model under DDP / FSDP2
# --------------------------------------------------------------------------------------


def frozen_parameters(model: MoDTransformer, args) -> List[str]:
    """Names of the parameters nothing trains in this run (frozen before wrapping, so
    that DDP without ``find_unused_parameters`` sees a gradient for every parameter
    that requires one): each predictor when the aux loss weight is 0, or when training
    routes causally (no top-k targets; the threshold passes no gradient)."""
    names = []
    if args.aux_loss_weight == 0 or args.routing == "causal":
        for name, p in model.named_parameters():
            if ".predictor." in name:
                names.append(name)
    return names


def prepare_model(model: MoDTransformer, args, env: DistEnv) -> Tuple[nn.Module, List[str]]:
    """Freeze what nothing trains, apply activation checkpointing and torch.compile per
    transformer block, then wrap: DDP (``find_unused_parameters=False``) or FSDP2
    (``fully_shard`` on every block, then the root). Returns the module to call and
    the frozen parameter names. Checkpoint and compile wrap each layer's own
    transformer block in place, so state-dict keys stay those of the plain model."""
    frozen = frozen_parameters(model, args)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if args.dtype == "float64":
        model = model.double()
    model = model.to(env.device)
    if args.activation_checkpointing != "none":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        impl = CheckpointImpl.REENTRANT if args.activation_checkpointing == "reentrant" else CheckpointImpl.NO_REENTRANT
        for i, layer in enumerate(model.layers):
            if isinstance(layer, MoDBlock):  # the router, gather and scatter stay outside
                layer.block = checkpoint_wrapper(layer.block, checkpoint_impl=impl)
            else:
                model.layers[i] = checkpoint_wrapper(layer, checkpoint_impl=impl)
    if args.compile:
        for layer in model.layers:
            layer.compile(backend=args.compile)
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Reentrant checkpointing re-runs the forward inside backward, which DDP's
        # reducer only accepts with a static graph.
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   static_graph=args.activation_checkpointing == "reentrant"), frozen
    if env.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if args.dtype == "bfloat16" else MixedPrecisionPolicy())
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        if gloo_avg_is_broken():
            from torch.distributed.fsdp import FSDPModule

            for m in model.modules():  # the setter does not recurse: every block's own group
                if isinstance(m, FSDPModule):
                    m.set_force_sum_reduction_for_comms(True)
            if env.is_main:
                print("mod_ext.train: this PyTorch's gloo ReduceOp.AVG sums (pytorch/pytorch#162338): "
                      "FSDP2 reduces gradients with SUM and divides afterwards", flush=True)
    return model, frozen


def _raw(model: nn.Module) -> MoDTransformer:
    return model.module if hasattr(model, "module") and isinstance(model.module, MoDTransformer) else model


def _autocast(args, env: DistEnv):
    """Autocast for bfloat16 runs, except under FSDP2 (its MixedPrecisionPolicy casts)."""
    if args.dtype == "bfloat16" and env.mode != "fsdp2":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode_warnings():
    """Reentrant activation checkpointing warns that no input requires grad under the
    evaluations' no_grad (it has nothing to recompute there): expected, so silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad.*")
        yield


def _grad_sync(model: nn.Module, env: DistEnv, sync: bool):
    """Context for one micro-batch's backward: gradient reduction on the last only."""
    if env.mode == "ddp" and not sync:
        return model.no_sync()
    if env.mode == "fsdp2":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _micro_loss(model: nn.Module, x: Tensor, y: Tensor, valid: Optional[Tensor], routing: str,
                n_targets: int, n_valid: int, aux_weight: float, args, env: DistEnv,
                health: Optional[RouterHealth] = None, step: Optional[int] = None):
    """Loss of one rank's micro-batch, normalised by the global batch's token counts
    (see the module docstring); returns (loss to backprop, LM loss sum, aux loss sum).
    ``health`` accumulates the MoD layers' router signals (on device, no host sync)."""
    with _autocast(args, env):
        out = model(x, None, routing=routing, valid=valid, return_routing=health is not None)
    if health is not None:
        health.update(out.mod_layer_outputs, valid, step)
    V = out.logits.shape[-1]
    logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))  # bf16 up, float64 kept
    lm_sum = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100, reduction="sum")
    loss = lm_sum / n_targets
    aux_sum = None
    if out.aux_loss is not None:
        # aux_loss is the sum over MoD layers of each layer's mean over this slice's valid tokens
        local_valid = x.numel() if valid is None else valid.sum()
        aux_sum = out.aux_loss.to(torch.promote_types(out.aux_loss.dtype, torch.float32)) * local_valid
        if aux_weight:
            loss = loss + aux_weight * aux_sum / n_valid
    return loss * env.world_size, lm_sum.detach(), None if aux_sum is None else aux_sum.detach()


@torch.no_grad()
def evaluate(model: nn.Module, batches: List[Tuple[Tensor, Tensor, Optional[Tensor]]], routing: str, args,
             env: DistEnv) -> float:
    """Mean next-token cross-entropy (nats/token) over global held-out batches, each rank
    on its rows, summed over ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for x, y, valid in batches:
        xs, ys, vs = (_rows(t, 0, 1, env.rank, env.world_size) for t in (x, y, valid))
        xs, ys = xs.to(env.device), ys.to(env.device)
        vs = None if vs is None else vs.to(env.device)
        with _autocast(args, env), _eval_mode_warnings():
            logits = model(xs, None, routing=routing, valid=vs).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1),
                                    ignore_index=-100, reduction="sum").double()
        total[1] += (ys != -100).sum()
    if env.backend is not None:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp_min(1))


# --------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint)
# --------------------------------------------------------------------------------------


def _run_config(args) -> Dict:
    return {k: getattr(args, k) for k in RESUME_FIXED}


def corpus_sha256(corpus) -> str:
    """SHA-256 of a corpus' token streams (train, then validation): resume compares the
    data by content, not by the path it was given as."""
    import hashlib

    h = hashlib.sha256()
    for t in (corpus.train, corpus.val):
        h.update(t.contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``out/checkpoints`` (a ``step_XXXXXXXX``
    directory with ``train_state.json``, renamed into place only after every rank
    finished writing), or None. Unfinished ``*.tmp`` directories are ignored."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "train_state.json").is_file() and (p / ".metadata").is_file())
    return done[-1] if done else None


def _state(model: nn.Module, opt: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, args, env: DistEnv,
                    metrics: Dict) -> Path:
    """Save model + optimizer with DCP into ``out/checkpoints/step_XXXXXXXX.tmp`` on every
    rank, then (after a barrier) rank 0 writes ``train_state.json`` and renames the
    directory into place: a crash before that leaves only a ``.tmp`` directory, which
    resume never reads."""
    import torch.distributed.checkpoint as dcp

    root = Path(out) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(_state(model, opt), checkpoint_id=str(tmp), no_dist=env.backend is None)
    env.barrier()
    if env.is_main:
        train_state = dict(format=CHECKPOINT_FORMAT, step=step, world_size=env.world_size, dist=env.mode,
                           config=_run_config(args), mod_ext=__version__, torch=torch.__version__,
                           steps_log=metrics["steps"], evals_log=metrics["evals"],
                           health_log=metrics.get("health", []))
        (tmp / "train_state.json").write_text(json.dumps(train_state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-args.keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob("step_*.tmp"):  # left by an interrupted save; never read
            shutil.rmtree(p, ignore_errors=True)
    env.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, args, env: DistEnv) -> Dict:
    """Check ``path`` was written by a run of this configuration, load model and
    optimizer state into this run's layout (DCP reshards: N processes to M), and return
    its train_state.

    Raises:
        SystemExit: not a complete checkpoint, another format, another configuration
            (the differing options are named), or a world size that cannot split the
            global batch.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    meta = path / "train_state.json"
    if path.name.endswith(".tmp") or not meta.is_file() or not (path / ".metadata").is_file():
        raise SystemExit(f"mod_ext.train: --resume {path}: not a complete checkpoint (no train_state.json and "
                         "DCP .metadata: an interrupted save leaves only a step_*.tmp directory)")
    state = json.loads(meta.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"mod_ext.train: --resume {path}: checkpoint format {state.get('format')}, "
                         f"this mod_ext reads format {CHECKPOINT_FORMAT}")
    want = _run_config(args)
    saved = {**RESUME_DEFAULTS, **state["config"]}
    diff = {k: (saved.get(k), want[k]) for k in want if saved.get(k) != want[k]}
    if diff:
        what = ", ".join(("the data (SHA-256 of the token streams: --data's content) "
                          f"{str(a)[:12]}... in the checkpoint vs {str(b)[:12]}... now") if k == "corpus_sha256"
                         else f"--{k.replace('_', '-')} {a!r} in the checkpoint vs {b!r} now"
                         for k, (a, b) in diff.items())
        raise SystemExit(f"mod_ext.train: --resume {path} is a checkpoint of another configuration: {what}")
    if state["step"] >= args.steps:
        raise SystemExit(f"mod_ext.train: --resume {path}: the run already finished ({state['step']} of "
                         f"{args.steps} steps)")
    s = _state(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(s, checkpoint_id=str(path), no_dist=env.backend is None)
    set_state_dict(model, opt, model_state_dict=s["model"], optim_state_dict=s["optim"])
    return state


def load_model(path, map_location="cpu") -> MoDTransformer:
    """The :class:`~mod_ext.models.MoDTransformer` a run saved as ``--out/model.pt``
    (its config and full state dict), in eval mode.

    Raises:
        ValueError: the file is not a mod_ext.train model file.
    """
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("kind") != "mod_ext.train.model":
        raise ValueError(f"mod_ext.train.load_model: {path} is not a model saved by mod_ext.train")
    model = MoDTransformer(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(blob.get("dtype") and getattr(torch, blob["dtype"]) or torch.float32).eval()


def save_model(path, model: MoDTransformer, state_dict: Optional[Dict[str, Tensor]] = None) -> None:
    """Write ``model`` (its config and full state dict, on the CPU) to ``path`` in the
    format :func:`load_model` reads, atomically (a temporary file renamed into place).
    ``state_dict``: the full state dict when it is not ``model.state_dict()`` (a sharded
    model's, gathered)."""
    path = Path(path)
    sd = model.state_dict() if state_dict is None else state_dict
    dtype = next(iter(sd.values())).dtype if sd else torch.float32
    blob = dict(kind="mod_ext.train.model", config=dataclasses.asdict(_raw(model).cfg),
                dtype="float64" if dtype == torch.float64 else "float32",
                state_dict={k: v.detach().cpu() for k, v in sd.items()})
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _save_model(path: Path, model: nn.Module, env: DistEnv) -> None:
    """save_model of a (possibly DDP- or FSDP2-wrapped) model: every rank gathers, rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        save_model(path, _raw(model), sd)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _plot(metrics: Dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = metrics["steps"]
    # a step's record holds the loss of the model before that step's update
    ax.plot([s["step"] - 1 for s in steps], [s["lm_loss"] for s in steps], lw=1, label="train (LM loss)")
    if metrics["evals"]:
        ax.plot([e["step"] for e in metrics["evals"]], [e["val_loss"] for e in metrics["evals"]], "o-",
                label="validation (top-k routing)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run training; returns the metrics (also written to ``--out/metrics.json`` by rank 0)."""
    args = parse_args(argv)
    try:  # the [demo] extra: the corpus loader (numpy), progress bars, the loss plot
        import importlib

        from tqdm.auto import tqdm

        for name in ("numpy",) + (() if args.no_plot else ("matplotlib",)):
            importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise SystemExit(f"python -m mod_ext.train needs the [demo] extra ({e.name} is not installed): "
                         "pip install numpy tqdm matplotlib, or from the checkout "
                         "pip install --no-build-isolation -e \".[demo]\"") from e
    from .data import load_corpus

    env = init_distributed(args.dist, args.device)
    try:
        return _train(args, env, tqdm, load_corpus)
    finally:
        if env.created_group:
            dist.destroy_process_group()


def _train(args, env: DistEnv, tqdm, load_corpus) -> Dict:
    W, A = env.world_size, args.grad_accum
    if args.batch_size % (A * W):
        raise SystemExit(f"mod_ext.train: --batch-size {args.batch_size} must split into --grad-accum {A} "
                         f"micro-batches over {W} processes (a multiple of {A * W})")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    out = Path(args.out)
    # Rank 0 fetches the corpus first (once), the others then read the cache.
    if not env.is_main:
        env.barrier()
    corpus = load_corpus(args.data, args.cache_dir)
    if env.is_main:
        env.barrier()
    cfg = model_config(args, corpus.vocab_size)
    torch.manual_seed(args.seed)
    raw = MoDTransformer(cfg)
    fpt = raw.flops_per_token(args.seq_len)
    n_params = raw.num_params()
    model, frozen = prepare_model(raw, args, env)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    for split, stream in (("training", corpus.train), ("validation", corpus.val)):
        if stream.numel() < args.seq_len + 1:
            raise SystemExit(f"mod_ext.train: the {split} split of {corpus.name} ({corpus.split}) has "
                             f"{stream.numel()} tokens, too few for --seq-len {args.seq_len} (windows of "
                             f"seq_len + 1 tokens): use --seq-len {max(0, stream.numel() - 1)} or less, or more text")
    args.corpus_sha256 = corpus_sha256(corpus)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    batches = GlobalBatches(corpus.train, args.batch_size, args.seq_len, args.seed, args.pad_fraction)
    val = GlobalBatches(corpus.val, args.batch_size, args.seq_len, args.seed + 1, args.pad_fraction)
    val_batches = [val(i) for i in range(args.eval_batches)]

    metrics = dict(config=dict(vars(args), world_size=W, model=dataclasses.asdict(cfg), params=n_params,
                               flops_per_token=fpt, frozen=frozen, torch=torch.__version__, mod_ext=__version__,
                               corpus=corpus.name, device=str(env.device), backend=env.backend),
                   steps=[], evals=[], resumed_from=None)
    start = 0
    path = None
    if args.resume in ("latest", "auto"):
        path = latest_checkpoint(out)
        if path is None and args.resume == "latest":
            raise SystemExit(f"mod_ext.train: --resume: no complete checkpoint in {out / 'checkpoints'}")
    elif args.resume is not None:
        path = Path(args.resume)
    elif (existing := latest_checkpoint(out)) is not None:
        raise SystemExit(f"mod_ext.train: --out {out} already holds checkpoints of a run "
                         f"({existing.name}): pass --resume to continue it, or another --out")
    if path is not None and args.resume == "auto":
        done = json.loads((path / "train_state.json").read_text())
        if done.get("step", 0) >= args.steps and (out / "metrics.json").is_file():
            if env.is_main:
                print(f"mod_ext.train: --resume auto: the run in {out} already finished ({done['step']} of "
                      f"{args.steps} steps); nothing to do", flush=True)
            return json.loads((out / "metrics.json").read_text())
    if path is not None:
        state = load_checkpoint(path, model, opt, args, env)
        start = state["step"]
        metrics["steps"], metrics["evals"] = state["steps_log"], state["evals_log"]
        metrics["health"] = state.get("health_log", [])
        metrics["resumed_from"] = dict(path=str(path), step=start, world_size=state["world_size"],
                                       dist=state["dist"])
        if env.is_main:
            print(f"mod_ext.train: resumed from {path} (step {start}, saved on {state['world_size']} "
                  f"process(es), {state['dist']})", flush=True)
    stop = args.stop_at or args.steps
    if stop <= start:
        raise SystemExit(f"mod_ext.train: --stop-at {stop}: the checkpoint is already at step {start}")
    tokens_per_step = args.batch_size * args.seq_len
    if env.is_main:
        kind = "dense" if args.dense else f"MoD (c={args.capacity_factor}, every {args.mod_every} layers)"
        print(f"mod_ext.train: {kind}, {n_params:,} parameters, {fpt / 1e6:.2f} MFLOPs/token; "
              f"steps {start}..{stop} of {args.steps}; global batch {args.batch_size} x {args.seq_len} "
              f"= {A} micro-batch(es) x {W} process(es) x {args.batch_size // (A * W)}; "
              f"dist {env.mode} ({env.backend or 'single process'}) on {env.device}; {corpus.name}", flush=True)
        if frozen:
            print(f"mod_ext.train: frozen (nothing trains them in this run): {', '.join(frozen)}", flush=True)
        if args.routing == "causal" and args.causal_router == "predictor" and not args.dense and start == 0:
            print("mod_ext.train: warning: --routing causal routes by the predictor, which this run does not "
                  "train (it stays at its initialisation): resume a top-k-trained run, or use "
                  "--causal-router router (the router logits route and are trained through r * f)", flush=True)

    # (step, lr, LM loss sum, aux loss sum, grad norm, predictor grad norm, (global target count, global valid count))
    pending: List[Tuple[int, float, Tensor, Optional[Tensor], Tensor, Optional[Tensor], Tuple[int, int]]] = []
    # The predictors are clipped on their own: a shared norm would let the predictor's
    # gradient scale the language model's update (its stop-gradient keeps it off the LM loss).
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lm_params = [p for n, p in named if ".predictor." not in f".{n}"]
    predictor_params = [p for n, p in named if ".predictor." in f".{n}"]
    health = None if args.dense else RouterHealth(_raw(model).mod_layer_ids, args.seq_len, env.device)
    metrics.setdefault("health", [])

    def flush(times: List[float]):
        """Gather the pending steps' loss sums over ranks (one collective, one host read)."""
        if not pending:
            return
        zero = torch.zeros((), dtype=torch.float64, device=pending[0][2].device)
        vals = torch.stack([torch.stack([lm.double(), zero if aux is None else aux.double(), gn.double(),
                                         zero if pgn is None else pgn.double()])
                            for _, _, lm, aux, gn, pgn, _ in pending])
        if env.backend is not None:
            # grad norm is the same on every rank: sum it too, then divide by W
            dist.all_reduce(vals)
            vals[:, 2:] /= W
        vals = vals.tolist()
        for (step, lr, _, aux, _, pgn, n), v, dt in zip(pending, vals, times):
            nt, nv = n
            rec = dict(step=step + 1, lr=lr, lm_loss=v[0] / nt, grad_norm=v[2], step_time_s=dt,
                       tokens=tokens_per_step, valid_tokens=nv)
            rec["aux_loss"] = v[1] / nv if aux is not None else None
            rec["predictor_grad_norm"] = v[3] if pgn is not None else None
            rec["loss"] = rec["lm_loss"] + (args.aux_loss_weight * rec["aux_loss"] if aux is not None else 0.0)
            metrics["steps"].append(rec)
        pending.clear()

    def record_eval(step: int):
        _seed_random_routing(args, env, step, -1)
        metrics["evals"].append(dict(step=step, val_loss=evaluate(model, val_batches, "topk", args, env)))

    if start == 0 and args.eval_batches:
        record_eval(0)
    model.train()
    bar = tqdm(range(start, stop), desc="train", unit="step", dynamic_ncols=True, disable=not env.is_main,
               initial=start, total=stop)
    times: List[float] = []
    cuda = env.device.type == "cuda"
    t_flush = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        x, y, valid = batches(step)
        n_targets = int((y != -100).sum())
        n_valid = x.numel() if valid is None else int(valid.sum())
        lr = lr_at(step, args.steps, args.lr, args.min_lr, args.warmup, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        lm_total, aux_total = None, None
        for m in range(A):
            _seed_random_routing(args, env, step, m)
            xs, ys, vs = (_rows(t, m, A, env.rank, W) for t in (x, y, valid))
            xs, ys = xs.to(env.device, non_blocking=True), ys.to(env.device, non_blocking=True)
            vs = None if vs is None else vs.to(env.device, non_blocking=True)
            with _grad_sync(model, env, sync=m == A - 1):
                loss, lm_sum, aux_sum = _micro_loss(model, xs, ys, vs, args.routing, max(n_targets, 1),
                                                    max(n_valid, 1), args.aux_loss_weight, args, env,
                                                    health, step + 1)
                loss.backward()
            lm_total = lm_sum if lm_total is None else lm_total + lm_sum
            if aux_sum is not None:
                aux_total = aux_sum if aux_total is None else aux_total + aux_sum
        clip = args.grad_clip if args.grad_clip > 0 else math.inf
        gn, pgn = (_clip(ps, clip) if ps else None for ps in (lm_params, predictor_params))
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append((step, lr, lm_total, aux_total, gn, pgn, (max(n_targets, 1), max(n_valid, 1))))
        if not cuda:
            times.append(time.perf_counter() - t0)
        last = step + 1 == stop
        final = step + 1 == args.steps  # evaluated after the loop (with the causal metrics)
        eval_due = bool(args.eval_every and args.eval_batches and (step + 1) % args.eval_every == 0)
        save_due = bool(args.save_every and (step + 1) % args.save_every == 0)
        if len(pending) >= args.log_every or last or eval_due or save_due:
            n = len(pending)
            flush(times if not cuda else [0.0] * n)
            if cuda:  # the flush synchronised: spread the interval over its steps
                dt = (time.perf_counter() - t_flush) / n
                for rec in metrics["steps"][-n:]:
                    rec["step_time_s"] = dt
            t_flush = time.perf_counter()
            times = []
            rec = metrics["steps"][-1]
            bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", lr=f"{lr:.2e}")
            if health is not None:
                metrics["health"].append(_health_report(health, env))
        if eval_due and not final:
            record_eval(step + 1)
        if save_due and not last:  # (the last step's checkpoint is saved after the loop)
            save_checkpoint(out, step + 1, model, opt, args, env, metrics)
        if eval_due or save_due:
            t_flush = time.perf_counter()  # CUDA step times: not the evaluation or the save
    bar.close()

    if stop == args.steps:
        router_thr = None
        if not args.dense and args.calibrate_batches:  # also without evaluations: model.pt carries it
            _seed_random_routing(args, env, stop, -2)
            cal = GlobalBatches(corpus.train, args.batch_size, args.seq_len, args.seed + 2, args.pad_fraction)
            metrics["causal_thresholds"], router_thr = _calibrate(
                model, [cal(i) for i in range(args.calibrate_batches)], args, env)
        if args.eval_batches:
            record_eval(stop)
            if not args.dense:
                _seed_random_routing(args, env, stop, -3)
                metrics["causal_val_loss"] = evaluate(model, val_batches, "causal", args, env)
                metrics.update(_routing_quality(model, val_batches, args, env, router_thr))
    save_checkpoint(out, stop, model, opt, args, env, metrics)
    if stop == args.steps:
        _save_model(out / "model.pt", model, env)
    done = [s for s in metrics["steps"] if s["step"] > start]
    if done:
        med = statistics.median(s["step_time_s"] for s in done)
        mean = statistics.fmean(s["step_time_s"] for s in done)
        metrics["median_step_time_s"] = med
        metrics["tokens_per_s"] = tokens_per_step / med  # global batch tokens (padding included)
        metrics["tokens_per_s_mean_step"] = tokens_per_step / mean  # stalls included
        metrics["valid_token_fraction"] = sum(s["valid_tokens"] for s in done) / (len(done) * tokens_per_step)
    metrics["final_step"] = stop
    if env.is_main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if not args.no_plot:
            layout = f"{W} process(es), {env.mode}"
            if metrics["resumed_from"]:
                r = metrics["resumed_from"]
                layout = f"steps 1-{r['step']}: {r['world_size']} process(es), {r['dist']}; later: {layout}"
            _plot(metrics, out / "loss.png", f"{'dense' if args.dense else 'MoD'}: {corpus.name}, {layout}")
        at_stop = [e["val_loss"] for e in metrics["evals"] if e["step"] == stop]
        tps = metrics.get("tokens_per_s")
        print(f"mod_ext.train: step {stop}/{args.steps}"
              + (f": val loss {at_stop[-1]:.4f}" if at_stop else "")
              + (f", causal {metrics['causal_val_loss']:.4f}" if "causal_val_loss" in metrics else "")
              + (f"; {tps:,.0f} tokens/s (median step {metrics['median_step_time_s'] * 1e3:.0f} ms)" if tps else "")
              + f"; wrote {out}", flush=True)
    return metrics


def _seed_random_routing(args, env: DistEnv, *where: int) -> None:
    """Random routing draws its scores from torch's global generator: seed it from (seed,
    rank, where) so a resumed run draws what the uninterrupted one did and the ranks draw
    different scores. The scores of a row still depend on the process layout (its rank
    slice), so random-routing runs on N processes are not the one-process run."""
    if args.random_routing:
        torch.manual_seed(hash((args.seed, env.rank) + tuple(where)) % (2 ** 63))


def _clip(params: List[nn.Parameter], max_norm: float) -> Tensor:
    """clip_grad_norm_ of one parameter group; the total norm as a plain tensor."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(gn, "full_tensor"):  # a DTensor under FSDP2
        gn = gn.full_tensor()
    return gn.detach()


def _health_report(health: RouterHealth, env: DistEnv) -> Dict:
    """This rank's router health since the last report (one host read). NaN/inf on any
    rank stops every rank with the error of the rank that saw it."""
    err, report = None, None
    try:
        report = health.report()
    except RouterHealthError as e:
        err = e
    if env.backend is not None:
        flag = torch.tensor([0.0 if err is None else 1.0], device=env.device)
        dist.all_reduce(flag)
        if err is None and float(flag) > 0:
            raise SystemExit("mod_ext.train: another process found NaN/inf router logits or hidden states "
                             "(its error names the layer)")
    if err is not None:
        raise SystemExit(f"mod_ext.train: {err}")
    return report


@torch.no_grad()
def _calibrate(model: nn.Module, batches, args, env: DistEnv) -> Tuple[List[float], List[float]]:
    """Calibrate the causal thresholds on whole global training batches (every rank the
    same rows, so every rank gets the same thresholds); also the thresholds at which the
    router logits route the capacity (the router rule, reported beside the predictor),
    from the same forward passes."""
    dev = [(x.to(env.device), None if v is None else v.to(env.device)) for x, _, v in batches]
    with _autocast(args, env), _eval_mode_warnings():
        return _raw(model).calibrate_causal_routing(dev, return_router_thresholds=True)


_QUALITY = ("accuracy", "recall", "precision", "routed_fraction")


@torch.no_grad()
def _routing_quality(model: nn.Module, val_batches, args, env: DistEnv,
                     router_thresholds: Optional[List[float]] = None) -> Dict:
    """Causal routing against top-k on the held-out batches (routing_metrics), averaged
    over batches and ranks, per MoD layer and on average: ``causal_routing`` for the rule
    sampling uses (logits above the calibrated causal threshold),
    ``causal_routing_uncalibrated`` for the same logits at threshold 0 and, for a
    predictor model with calibration, ``causal_routing_router_logits`` for the router
    logits at their own calibrated threshold (the router rule, untrained by an aux loss).
    ``causal_accuracy`` etc. repeat ``causal_routing``'s means."""
    model.eval()
    raw = _raw(model)
    rules = ["", "_uncalibrated"] + (["_router_logits"] if router_thresholds and raw.cfg.causal_router ==
                                     "predictor" else [])
    L = len(raw.mod_layers)
    sums = torch.zeros(len(rules), L, len(_QUALITY) + 1, dtype=torch.float64, device=env.device)
    for x, _, valid in val_batches:
        xs = _rows(x, 0, 1, env.rank, env.world_size).to(env.device)
        vs = _rows(valid, 0, 1, env.rank, env.world_size)
        vs = None if vs is None else vs.to(env.device)
        with _autocast(args, env), _eval_mode_warnings():
            outs = model(xs, None, routing="topk", valid=vs, return_routing=True).mod_layer_outputs
        for j, (layer, o) in enumerate(zip(raw.mod_layers, outs)):
            K = layer.causal_capacity(xs.shape[1])
            scores = {"": o.causal_scores.float(),  # what sampling routes by
                      "_uncalibrated": o.causal_scores.float() + layer.causal_threshold.float()}
            if "_router_logits" in rules:
                scores["_router_logits"] = o.routing.router_logits.float() - router_thresholds[j]
            for r, rule in enumerate(rules):
                m = routing_metrics(scores[rule], o.routing.indices, K, vs)
                sums[r, j] += torch.stack([*(getattr(m, k) for k in _QUALITY), torch.ones_like(m.accuracy)]).double()
    if env.backend is not None:
        dist.all_reduce(sums)
    model.train()
    sums = sums.cpu()
    means = sums[..., :-1] / sums[..., -1:].clamp_min(1.0)  # (rules, L, 4)
    result: Dict = {"causal_rule": raw.cfg.causal_router}
    for r, rule in enumerate(rules):
        per_layer = {str(d): dict(zip(_QUALITY, means[r, j].tolist())) for j, d in enumerate(raw.mod_layer_ids)}
        result[f"causal_routing{rule}"] = dict(zip(_QUALITY, means[r].mean(0).tolist()), per_layer=per_layer)
    for k in _QUALITY:  # the rule sampling uses
        result[f"causal_{k}"] = result["causal_routing"][k]
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
