"""Train a dense baseline and a Mixture-of-Depths model on Shakespeare, and compare them.

    python -m mod_ext.demo                 # ~3 minutes on 2 CPU cores, fetches the corpus once
    python -m mod_ext.demo --data my.txt   # any UTF-8 text file (90/10 split)
    python -m mod_ext.demo --quick         # tiny smoke-test configuration (seconds)

All models share every setting (data order, seed, optimizer, schedule); the MoD models
route 12.5% of the tokens through every other layer (Raposo et al. 2024). Two MoD models
are trained, one per way of routing causally when sampling (paper Section 3.5): a
stop-gradient predictor (``mod``), and the router's own auxiliary BCE loss
(``mod_router_aux``); each one's causal threshold is then calibrated to the capacity on
training batches (``MoDTransformer.calibrate_causal_routing``). By default every model
gets the same training-FLOP budget (``--match flops``): the dense model trains
``--steps`` steps and each MoD model as many steps as the same FLOPs buy. ``--match
steps`` gives all the same number of steps instead.

Writes to ``--out`` (default runs/demo): report.json, summary.md, loss_curves.png,
routing.png, and the trained models, dense.pt, mod.pt and mod_router_aux.pt
(``mod_ext.train.load_model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

try:  # the [demo] extra: the core package needs only torch
    import matplotlib
    import numpy  # noqa: F401  (the corpus loader, mod_ext.data)
    import tqdm  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"python -m mod_ext.demo needs the [demo] extra ({e.name} is not installed): "
        "pip install numpy tqdm matplotlib, or from the checkout "
        "pip install --no-build-isolation -e \".[demo]\"", name=e.name
    ) from e

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import __version__  # noqa: E402
from .data import BatchSampler, Corpus, decode, encode, get_batch, load_corpus  # noqa: E402
from .layer import routing_metrics  # noqa: E402
from .generation import MoDKVCache  # noqa: E402
from .health import RouterHealth  # noqa: E402
from .models import ModelConfig, MoDTransformer, dense_config  # noqa: E402
from .ops import threshold_route  # noqa: E402
from .train import lr_at, make_optimizer, save_model  # noqa: E402  (one optimizer and schedule for both)

# Defaults of the full run and of --quick; explicit command-line values override both.
FULL = dict(steps=160, batch_size=16, seq_len=256, d_model=128, n_layer=6, n_head=4,
            lr=2e-3, eval_batches=6, n_evals=8, sample_tokens=200, passage_chars=192)
QUICK = dict(steps=6, batch_size=4, seq_len=64, d_model=32, n_layer=2, n_head=2,
             lr=3e-3, eval_batches=2, n_evals=2, sample_tokens=24, passage_chars=64)
PROMPT = "To be, or not to be"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options (None means: take the FULL or QUICK preset)."""
    p = argparse.ArgumentParser(prog="python -m mod_ext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="UTF-8 text file to train on instead of Shakespeare")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, help=f"dense-model training steps (default {FULL['steps']})")
    p.add_argument("--match", choices=["flops", "steps"], default="flops",
                   help="give the MoD model the dense model's FLOP budget (default) or its step count")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {FULL['batch_size']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {FULL['seq_len']})")
    p.add_argument("--d-model", type=int, help=f"model width (default {FULL['d_model']})")
    p.add_argument("--n-layer", type=int, help=f"layers (default {FULL['n_layer']})")
    p.add_argument("--n-head", type=int, help=f"attention heads (default {FULL['n_head']})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {FULL['lr']})")
    p.add_argument("--capacity-factor", type=float, default=0.125, help="MoD capacity (default 0.125)")
    p.add_argument("--mod-every", type=int, default=2, help="every n-th layer is MoD (default 2)")
    p.add_argument("--causal-router", choices=["predictor", "router"], default="predictor",
                   help="the MoD model to sample from and plot in routing.png: the predictor's (default) or "
                        "the router aux loss's (both are trained and reported)")
    p.add_argument("--aux-loss-weight", type=float, default=0.1, help="weight of the MoD aux loss")
    p.add_argument("--calibrate-batches", type=int, default=8,
                   help="training batches that calibrate the causal thresholds (0: threshold at logit 0)")
    p.add_argument("--eval-batches", type=int, help="held-out batches per evaluation")
    p.add_argument("--n-evals", type=int, help="evaluations per training run (plus one at step 0)")
    p.add_argument("--sample-tokens", type=int, help="tokens to sample from each model (both sample through the KV cache)")
    p.add_argument("--passage-chars", type=int, help="length of the passage in routing.png")
    p.add_argument("--seed", type=int, default=1337, help="seed for init, data order and sampling")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--cache-dir", default=None, help="corpus cache (default $MOD_EXT_CACHE or "
                   "~/.cache/mod_ext/shakespeare)")
    p.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Fail before training, not after it.
    for name in ("steps", "batch_size", "seq_len", "d_model", "n_layer", "n_head", "eval_batches",
                 "n_evals", "passage_chars", "threads", "mod_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.calibrate_batches < 0:
        p.error(f"--calibrate-batches must be >= 0, got {args.calibrate_batches}")
    if args.sample_tokens < 0:
        p.error(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    if args.sample_tokens and len(PROMPT.encode()) + args.sample_tokens - 1 > args.seq_len:
        p.error(f"--sample-tokens {args.sample_tokens}: the prompt ({len(PROMPT.encode())} tokens) plus the "
                f"sample must fit in --seq-len {args.seq_len} (the KV cache's length)")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --n-head ({args.n_head}) "
                "with an even head size (rotary embeddings)")
    if args.mod_every > args.n_layer:
        p.error(f"--mod-every {args.mod_every} > --n-layer {args.n_layer}: the MoD model would have "
                "no MoD layer (layers i with i % mod_every == mod_every - 1 are MoD)")
    if not 0 < args.capacity_factor <= 1:
        p.error(f"--capacity-factor must be in (0, 1], got {args.capacity_factor}")
    if args.data is not None and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    return args


@torch.no_grad()
def evaluate(model: MoDTransformer, batches, routing: str = "topk") -> float:
    """Mean next-token cross-entropy (nats) over fixed (x, y) batches."""
    model.eval()
    losses = []
    for x, y in batches:
        losses.append(model(x, y, routing=routing).lm_loss.item())
    model.train()
    return sum(losses) / len(losses)


def train(name: str, cfg: ModelConfig, corpus: Corpus, args, steps: int, val_batches) -> Dict:
    """Train one model; return the model, its curve, timing and router health."""
    torch.manual_seed(args.seed)
    model = MoDTransformer(cfg)
    opt = make_optimizer(model, args.lr)
    # Clipped apart: the predictor's gradient must not scale the language model's update.
    lm_params = [p for n, p in model.named_parameters() if ".predictor." not in f".{n}"]
    predictor_params = [p for n, p in model.named_parameters() if ".predictor." in f".{n}"]
    health = RouterHealth(model.mod_layer_ids, args.seq_len) if model.mod_layers else None
    health_log = []
    sampler = BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed)
    fpt = model.flops_per_token(args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    eval_steps = sorted({round(i * steps / args.n_evals) for i in range(args.n_evals + 1)})
    curve, step_times, wall = [], [], 0.0

    def record(step):
        curve.append(dict(step=step, train_flops=3 * fpt * tokens_per_step * step, wall_s=wall,
                          val_loss=evaluate(model, val_batches)))

    record(0)
    bar = tqdm(range(steps), desc=f"{name:>5}", unit="step", dynamic_ncols=True)
    for step in bar:
        x, y = next(sampler)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr)
        out = model(x, y, return_routing=health is not None)  # out.loss = lm_loss + aux_loss_weight * aux_loss
        if health is not None:
            health.update(out.mod_layer_outputs, step=step + 1)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        if predictor_params:
            torch.nn.utils.clip_grad_norm_(predictor_params, 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        wall += dt
        if step + 1 in eval_steps:
            record(step + 1)
        if step % 10 == 0 or step + 1 in eval_steps:
            bar.set_postfix(ce=f"{out.lm_loss.item():.3f}", val=f"{curve[-1]['val_loss']:.3f}")
        if health is not None and ((step + 1) % 10 == 0 or step + 1 == steps):
            health_log.append(health.report())  # RouterHealthError (naming the layer) on NaN/inf
    bar.close()
    return dict(
        model=model,
        result=dict(
            val_loss=curve[-1]["val_loss"],
            train_flops=3 * fpt * tokens_per_step * steps,
            flops_per_token=fpt,
            step_time_s=statistics.median(step_times),
            # from the median step: a stall of the machine (load) does not count as training
            tokens_per_s=tokens_per_step / statistics.median(step_times),
            tokens_per_s_wall=tokens_per_step * steps / wall,  # stalls included
            train_wall_s=wall,
            steps=steps,
            params=model.num_params(),
            curve=curve,
            health=health_log,
        ),
    )


_QUALITY = ("accuracy", "recall", "precision", "routed_fraction")


@torch.no_grad()
def causal_routing_metrics(model: MoDTransformer, val_batches, router_thresholds: Optional[List[float]] = None
                           ) -> Dict[str, Dict]:
    """Causal routing vs top-k on held-out batches (:func:`mod_ext.routing_metrics`),
    averaged over batches, per MoD layer and over layers: ``causal_routing`` for the rule
    sampling uses (causal logits above the calibrated threshold),
    ``causal_routing_uncalibrated`` (threshold 0) and, when ``router_thresholds`` are
    given, ``causal_routing_router_logits`` (the router logits above their own calibrated
    threshold)."""
    model.eval()
    rules = ["", "_uncalibrated"] + (["_router_logits"] if router_thresholds else [])
    sums = {r: [[0.0] * len(_QUALITY) for _ in model.mod_layers] for r in rules}
    for x, _ in val_batches:
        outs = model(x, routing="topk", return_routing=True).mod_layer_outputs
        for j, (m, o) in enumerate(zip(model.mod_layers, outs)):
            scores = {"": o.causal_scores, "_uncalibrated": o.causal_scores + m.causal_threshold}
            if router_thresholds:
                scores["_router_logits"] = o.routing.router_logits - router_thresholds[j]
            for r in rules:
                q = routing_metrics(scores[r].float(), o.routing.indices, m.causal_capacity(x.shape[1]))
                sums[r][j] = [a + float(getattr(q, k)) for a, k in zip(sums[r][j], _QUALITY)]
    model.train()
    n = len(val_batches)
    result = {}
    for r in rules:
        per_layer = {str(d): {k: v / n for k, v in zip(_QUALITY, sums[r][j])} for j, d in enumerate(model.mod_layer_ids)}
        result[f"causal_routing{r}"] = dict(
            {k: sum(p[k] for p in per_layer.values()) / len(per_layer) for k in _QUALITY}, per_layer=per_layer)
    return result


def held_out_passage(corpus: Corpus, n_chars: int) -> torch.Tensor:
    """A fixed held-out passage of n_chars tokens, starting after a blank line if possible."""
    val = corpus.val
    n_chars = min(n_chars, val.numel())
    start = val.numel() // 3
    j = bytes(val[start: start + 4 * n_chars].tolist()).find(b"\n\n")
    if j >= 0:
        start += j + 2
    start = min(start, val.numel() - n_chars)
    return val[start: start + n_chars].long()  # (n_chars,)


def plot_curves(results: Dict[str, Dict], path: Path, title: str) -> None:
    """Two panels: validation loss vs training FLOPs and vs wall-clock seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dense": dict(color="tab:blue", marker="o"), "mod": dict(color="tab:orange", marker="s"),
              "mod_router_aux": dict(color="tab:green", marker="^")}
    for key, label in (("dense", "dense baseline"), ("mod", "MoD, predictor"),
                       ("mod_router_aux", "MoD, router aux loss")):
        if key not in results:
            continue
        curve = results[key]["curve"]
        kw = dict(label=label, markersize=4, **styles[key])
        axes[0].plot([p["train_flops"] for p in curve], [p["val_loss"] for p in curve], **kw)
        axes[1].plot([p["wall_s"] for p in curve], [p["val_loss"] for p in curve], **kw)
    axes[0].set_xlabel("training FLOPs")
    axes[1].set_xlabel("training wall-clock (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
        lo = min(p["val_loss"] for r in results.values() for p in r["curve"])
        hi = sorted(p["val_loss"] for r in results.values() for p in r["curve"])[-3]  # skip step 0
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _show_char(c: str) -> str:
    return {"\n": "\u21b5", "\t": "\u2192", "\r": " "}.get(c, c if c.isprintable() else "\ufffd")


@torch.no_grad()
def plot_routing(model: MoDTransformer, passage: torch.Tensor, path: Path, width: int = 64) -> None:
    """Grid of a held-out passage per MoD layer: shaded = routed by top-k, red bar = routed causally."""
    model.eval()
    report = model.routing_report(passage[None])
    model.train()
    cells = [_show_char(chr(b)) if b < 128 else "\ufffd" for b in passage.tolist()]  # one cell per byte
    n = len(cells)
    n_lines = math.ceil(n / width)
    n_layers = len(report)
    fig, axes = plt.subplots(n_layers, 1, figsize=(0.19 * width + 0.6, (0.32 * n_lines + 0.45) * n_layers + 0.3),
                             squeeze=False)
    for ax, layer in zip(axes[:, 0], report):
        routed = set(layer["indices"][0][layer["slot_mask"][0]].tolist())
        c_idx, c_mask = threshold_route(layer["causal_scores"], layer["causal_capacity"])
        causal = set(c_idx[0][c_mask[0]].tolist())
        for t, ch in enumerate(cells):
            col, row = t % width, t // width
            if t in routed:
                ax.add_patch(Rectangle((col, row), 1, 1, color="tab:orange", alpha=0.55, lw=0))
            if t in causal:
                ax.add_patch(Rectangle((col + 0.1, row + 0.86), 0.8, 0.12, color="tab:red", lw=0))
            ax.text(col + 0.5, row + 0.5, ch, ha="center", va="center", family="DejaVu Sans Mono", fontsize=8)
        ax.set_xlim(0, width)
        ax.set_ylim(n_lines, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"layer {layer['layer']}: {len(routed)} of {n} tokens routed by top-k (shaded); "
                     f"{len(causal)} routed causally by the {model.cfg.causal_router} (red bar)",
                     fontsize=9, loc="left")
    fig.suptitle("Which tokens of a held-out passage each MoD layer processes (\u21b5 = newline)",
                 fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def timed_sample(model: MoDTransformer, prompt: torch.Tensor, args, repeats: int = 3
                 ) -> Tuple[torch.Tensor, Optional[float], Optional[MoDKVCache]]:
    """Sample args.sample_tokens tokens after prompt (1, T0) with the KV cache
    (temperature 0.8, seeded); returns the ids, the sampled tokens per second (prefill
    included; the median of ``repeats`` identical seeded runs, since one run of a few
    hundred milliseconds swings with the machine's load; None when nothing was sampled)
    and the KV cache of the last run (None when nothing was sampled)."""
    model.eval()
    times = []
    for _ in range(repeats):
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        ids, cache = model.generate(prompt, args.sample_tokens, temperature=0.8, generator=gen, return_cache=True)
        times.append(time.perf_counter() - t0)
    model.train()
    rate = args.sample_tokens * prompt.shape[0] / statistics.median(times) if args.sample_tokens else None
    return ids, rate, cache


def summary_table(report: Dict) -> str:
    """Markdown table of the headline numbers."""
    d, m, r = report["dense"], report["mod"], report["mod_router_aux"]

    def row(label, fmt, dense=True):
        return (label, fmt(d) if dense else "-", fmt(m), fmt(r))

    def quality(x, rule=""):
        q = x[f"causal_routing{rule}"]
        return f"{q['accuracy']:.3f} / {q['recall']:.3f} / {q['routed_fraction']:.3f}"

    rows = [
        row("parameters", lambda x: f"{x['params']:,}"),
        row("forward FLOPs / token", lambda x: f"{x['flops_per_token'] / 1e6:.2f} M"),
        row("training steps", lambda x: f"{x['steps']}"),
        row("training FLOPs", lambda x: f"{x['train_flops']:.3g}"),
        row("median step time", lambda x: f"{x['step_time_s'] * 1e3:.0f} ms"),
        row("training tokens / s (median step)", lambda x: f"{x['tokens_per_s']:,.0f}"),
        row("training wall-clock", lambda x: f"{x['train_wall_s']:.1f} s"),
        row("val loss (top-k routing)", lambda x: f"{x['val_loss']:.4f}"),
        row("val loss (causal routing)", lambda x: f"{x['causal_val_loss']:.4f}", dense=False),
        row("causal routing vs top-k: accuracy / recall / routed fraction (held-out)", quality, dense=False),
        row("same, threshold 0 (uncalibrated)", lambda x: quality(x, "_uncalibrated"), dense=False),
    ]
    if "causal_routing_router_logits" in m:
        rows.append(("same, router logits at a calibrated threshold", "-", quality(m, "_router_logits"), "-"))
    s = m if m.get("sampled") else r
    col = 2 if m.get("sampled") else 3
    if d.get("decode_tokens_per_s") and s.get("decode_tokens_per_s"):
        cells = ["sampling tokens / s (KV cache, batch 1)", f"{d['decode_tokens_per_s']:,.0f}", "-", "-"]
        cells[col] = f"{s['decode_tokens_per_s']:,.0f}"
        rows.append(tuple(cells))
    if s.get("sample_drops_per_layer") is not None:
        routed = ", ".join(f"{k}: {v}" for k, v in s["sample_routed_per_layer"].items())
        drops = ", ".join(f"{k}: {v}" for k, v in s["sample_drops_per_layer"].items())
        cells = ["sample: routed / dropped tokens per MoD layer", "-", "-", "-"]
        cells[col] = f"{routed} / {drops}"
        rows.append(tuple(cells))
    c = report["config"]
    head = (f"Dense vs MoD (capacity {c['capacity_factor']}, every {c['mod_every']} layers) on {c['corpus']}; "
            f"{c['budget']}; {c['tokens_per_step']} tokens/step, {c['n_layer']} layers, d_model "
            f"{c['d_model']}, {c['threads']} CPU threads; causal thresholds calibrated on "
            f"{c['calibrate_batches']} training batches.")
    lines = [head, "", "| | dense | MoD, predictor | MoD, router aux loss |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c_} | {e} |" for a, b, c_, e in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the demo; returns the report (also written to <out>/report.json)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(args.data, args.cache_dir)
    timings = {"corpus_s": time.perf_counter() - t_start}
    if corpus.val.numel() <= args.seq_len + 1 or corpus.train.numel() <= args.seq_len + 1:
        raise SystemExit(f"mod_ext.demo: corpus too small for --seq-len {args.seq_len}")
    mod_cfg = ModelConfig(
        vocab_size=corpus.vocab_size, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
        d_model=args.d_model, capacity_factor=args.capacity_factor, mod_every=args.mod_every,
        causal_router="predictor", aux_loss_weight=args.aux_loss_weight,
    )
    router_cfg = dataclasses.replace(mod_cfg, causal_router="router")
    dense_cfg = dense_config(mod_cfg)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = []
    for _ in range(args.eval_batches):
        w = get_batch(corpus.val, args.batch_size, args.seq_len, val_gen)  # (B, T+1)
        val_batches.append((w[:, :-1], w[:, 1:]))

    with torch.device("meta"):  # shapes only: FLOPs per token without building the weights
        fpt_dense, fpt_mod, fpt_router = (MoDTransformer(c).flops_per_token(args.seq_len)
                                          for c in (dense_cfg, mod_cfg, router_cfg))
    mod_steps = args.steps if args.match == "steps" else max(1, round(args.steps * fpt_dense / fpt_mod))
    router_steps = args.steps if args.match == "steps" else max(1, round(args.steps * fpt_dense / fpt_router))
    print(f"corpus: {corpus.name}: {corpus.train.numel():,} train / {corpus.val.numel():,} val tokens "
          f"({corpus.split}{': ' + ', '.join(corpus.val_works) if corpus.val_works else ''})")
    print(f"dense: {args.steps} steps, MoD (predictor): {mod_steps} steps, MoD (router aux loss): {router_steps} "
          f"steps (matched {args.match}); "
          f"{args.batch_size} x {args.seq_len} tokens per step, {args.threads} threads")

    t0 = time.perf_counter()
    dense = train("dense", dense_cfg, corpus, args, args.steps, val_batches)
    timings["dense_s"] = time.perf_counter() - t0  # training + evaluations
    t0 = time.perf_counter()
    mod = train("mod", mod_cfg, corpus, args, mod_steps, val_batches)
    timings["mod_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mod_router = train("mod-r", router_cfg, corpus, args, router_steps, val_batches)
    timings["mod_router_aux_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    results = {"dense": dense["result"], "mod": mod["result"], "mod_router_aux": mod_router["result"]}
    cal_gen = torch.Generator().manual_seed(args.seed + 2)
    cal_batches = [get_batch(corpus.train, args.batch_size, args.seq_len, cal_gen)[:, :-1]
                   for _ in range(args.calibrate_batches)]
    for key, trained in (("mod", mod), ("mod_router_aux", mod_router)):
        m, r = trained["model"], results[key]
        r["causal_rule"] = m.cfg.causal_router
        router_thr = None
        if cal_batches:
            # also the router logits' own thresholds (the router rule), from the same passes
            r["causal_thresholds"], router_thr = m.calibrate_causal_routing(cal_batches, return_router_thresholds=True)
        r["causal_val_loss"] = evaluate(m, val_batches, routing="causal")
        r.update(causal_routing_metrics(m, val_batches, router_thr if m.cfg.causal_router == "predictor" else None))
        for k in _QUALITY:
            r[f"causal_{k}"] = r["causal_routing"][k]
    main_key = "mod" if args.causal_router == "predictor" else "mod_router_aux"
    model = (mod if main_key == "mod" else mod_router)["model"]
    results[main_key]["sampled"] = True

    prompt = encode(PROMPT).long()[None]  # (1, T0)
    sample_ids, results[main_key]["decode_tokens_per_s"], cache = timed_sample(model, prompt, args)
    sample = decode(sample_ids[0].tolist())
    if cache is not None:  # per MoD layer: tokens of the sample that it routed / dropped
        results[main_key]["sample_routed_per_layer"] = dict(zip(map(str, model.mod_layer_ids),
                                                                cache.fill_counts()[:, 0].tolist()))
        results[main_key]["sample_drops_per_layer"] = dict(zip(map(str, model.mod_layer_ids),
                                                               cache.drops[:, 0].tolist()))
    dense_ids, results["dense"]["decode_tokens_per_s"], _ = timed_sample(dense["model"], prompt, args)
    results["dense"]["sample"] = decode(dense_ids[0].tolist())

    passage = held_out_passage(corpus, min(args.passage_chars, args.seq_len))
    plot_curves(results, out / "loss_curves.png",
                f"{corpus.name}: dense vs MoD (c={args.capacity_factor}, every {args.mod_every} layers), "
                f"matched {args.match}")
    plot_routing(model, passage, out / "routing.png")
    # Both trained models, for sampling afterwards: mod_ext.train.load_model(out / "mod.pt")
    save_model(out / "dense.pt", dense["model"])
    save_model(out / "mod.pt", mod["model"])
    save_model(out / "mod_router_aux.pt", mod_router["model"])

    report = dict(
        config=dict(
            **vars(args),
            corpus=corpus.name,
            split=corpus.split,
            held_out_works=corpus.val_works,
            train_works=corpus.train_works,
            train_tokens=int(corpus.train.numel()),
            val_tokens=int(corpus.val.numel()),
            n_tokens=corpus.n_tokens,
            tokens_per_step=args.batch_size * args.seq_len,
            dense_steps=args.steps,
            mod_steps=mod_steps,
            mod_router_aux_steps=router_steps,
            budget=("same training FLOPs" if args.match == "flops" else "same number of steps"),
            model_mod=dataclasses.asdict(mod_cfg),
            model_mod_router_aux=dataclasses.asdict(router_cfg),
            model_dense=dataclasses.asdict(dense_cfg),
            optimizer="AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices), warmup 10% + cosine to lr/10, "
                      "grad clip 1.0",
            eval="mean cross-entropy on a fixed set of held-out batches; wall_s excludes evaluation",
            prompt=PROMPT,
            passage=decode(passage.tolist()),
            torch=torch.__version__,
            mod_ext=__version__,
        ),
        dense=results["dense"],
        mod=results["mod"],
        mod_router_aux=results["mod_router_aux"],
        sample=sample,
    )
    timings["analysis_s"] = time.perf_counter() - t0  # calibration, causal eval, metrics, sample, plots
    report["timings"] = timings
    report["load_avg_1min"] = dict(start=load_start, end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    report["total_wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = summary_table(report)
    (out / "summary.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nsample (MoD with the {args.causal_router}, causal routing):\n{sample}\n")
    print(f"wrote {out / 'report.json'}, {out / 'loss_curves.png'}, {out / 'routing.png'}, "
          f"{out / 'dense.pt'}, {out / 'mod.pt'}, {out / 'mod_router_aux.pt'} "
          f"({report['total_wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
