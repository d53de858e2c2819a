"""The paper's ablations at small scale, on CPU: which of Mixture-of-Depths' findings hold?

    python benchmarks/ablations.py              # 8 configurations x 3 seeds, about 25 min on 2 cores
    python benchmarks/ablations.py --quick      # CI smoke: a tiny model, seconds per run
    python benchmarks/ablations.py --report     # redo table, plot and findings from the saved runs

Every configuration trains the reference model (``python -m mod_ext.train``, in this
process) on the same data (Shakespeare, or ``--data``) at the same *training FLOPs*: the
dense baseline's budget at ``--dense-steps`` steps (``--flops``: each MoD variant buys as
many steps as its cheaper forward pass allows). Three seeds each (``--seeds``). The
configurations, after Raposo et al. 2024 (arXiv 2404.02258), Sections 4.1-4.3:

* ``dense``: the isoFLOP baseline (no routing).
* ``mod_c0.125_every2``: MoD, capacity 12.5% on every other layer, learned routing,
  predictor for causal routing (the paper's best configuration).
* ``mod_c0.125_every1``: MoD on every layer.
* ``mod_c0.25_every2``, ``mod_c0.5_every2``: larger capacities.
* ``random_c0.125_every2``: top-k over random scores instead of the router's (the router
  weight still scales the update), the paper's "learned routing matters" control.
* ``router_aux_c0.125_every2``: causal routing by the router's own aux loss (BCE towards
  top-k membership, weight ``--aux-loss-weight``) instead of the predictor.
* ``identity_c0.125_every2``: the router weight is the raw logit (``router_activation=
  "identity"``, the paper's r = w.x) instead of a sigmoid: does it blow hidden states up?

Outputs: ``--out`` (default runs/ablations) keeps every run (metrics.json, model.pt);
``--docs`` (default docs/, or --out with --quick) gets ``ablations.md`` (table of mean +-
std over seeds of validation loss with top-k and causal routing, causal recall, training
tokens/s from the median step, FLOPs per forward token, steps; the findings, point by
point, computed from the numbers), ``ablations.png`` (validation loss against training
FLOPs, mean and range over seeds) and ``ablations.json`` (every run's numbers).
Throughput is measured on whatever else the machine is doing: run it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mod_ext import train  # noqa: E402
from mod_ext.models import MoDTransformer  # noqa: E402

#: name -> (label, extra mod_ext.train options)
CONFIGS = {
    "dense": ("dense baseline", ["--dense"]),
    "mod_c0.125_every2": ("MoD c=0.125, every 2nd layer", []),
    "mod_c0.125_every1": ("MoD c=0.125, every layer", ["--mod-every", "1"]),
    "mod_c0.25_every2": ("MoD c=0.25, every 2nd layer", ["--capacity-factor", "0.25"]),
    "mod_c0.5_every2": ("MoD c=0.5, every 2nd layer", ["--capacity-factor", "0.5"]),
    "random_c0.125_every2": ("random routing c=0.125, every 2nd", ["--random-routing"]),
    "router_aux_c0.125_every2": ("MoD c=0.125, router aux loss", ["--causal-router", "router"]),
    "identity_c0.125_every2": ("MoD c=0.125, identity router weight", ["--router-activation", "identity"]),
}
FULL = dict(d_model=128, n_layer=6, n_head=4, seq_len=256, batch_size=8, dense_steps=150, lr=2e-3,
            eval_every=25, eval_batches=8)
QUICK = dict(d_model=32, n_layer=4, n_head=2, seq_len=64, batch_size=4, dense_steps=8, lr=3e-3,
             eval_every=4, eval_batches=2)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/ablations.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and budget (CI smoke test)")
    p.add_argument("--data", default=None, help="UTF-8 text file (default: Shakespeare)")
    p.add_argument("--out", default=None, help="run directory (default runs/ablations, or runs/ablations_quick)")
    p.add_argument("--docs", default=None, help="where the table, plot and JSON go (default docs/; --out with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations to run (default: all)")
    p.add_argument("--aux-loss-weight", type=float, default=0.1, help="aux loss weight (predictor / router)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per run (default 2)")
    p.add_argument("--report", action="store_true", help="only rebuild the outputs from the runs in --out")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=type(FULL[key]), default=None,
                       help=f"(default {FULL[key]}, --quick {QUICK[key]})")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out or ("runs/ablations_quick" if args.quick else "runs/ablations"))
    args.docs = Path(args.docs or (args.out if args.quick else Path(__file__).resolve().parents[1] / "docs"))
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        p.error("--seeds must be distinct")
    return args


def budget(args) -> float:
    """Training FLOPs of the dense baseline at --dense-steps (3 x forward FLOPs per token)."""
    cfg = train.model_config(argparse.Namespace(
        seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
        capacity_factor=0.125, dense=True, mod_every=2, router_activation="sigmoid", causal_router="predictor",
        aux_loss_weight=0.0, random_routing=False, router_aux_grad_scale=0.3), vocab_size=256)
    with torch.device("meta"):
        fpt = MoDTransformer(cfg).flops_per_token(args.seq_len)
    # a hair above the exact budget so that floor() gives the dense model its --dense-steps
    return 3 * fpt * args.batch_size * args.seq_len * args.dense_steps * (1 + 1e-9)


def train_argv(args, name: str, seed: int) -> List[str]:
    argv = ["--flops", repr(budget(args)), "--seed", str(seed), "--out", str(args.out / f"{name}_s{seed}"),
            "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
            "--aux-loss-weight", str(args.aux_loss_weight), "--threads", str(args.threads), "--no-plot"]
    if args.data:
        argv += ["--data", args.data]
    return argv + CONFIGS[name][1]


@torch.no_grad()
def hidden_state_scale(run_dir: Path, args) -> Dict[str, float]:
    """RMS and max |x| of the residual stream after the last layer, and the largest
    |router logit|, on one held-out batch of the trained model (the identity router
    weight's failure mode is a residual stream that grows)."""
    model = train.load_model(run_dir / "model.pt")
    from mod_ext.data import get_batch, load_corpus

    val = load_corpus(args.data).val
    x = get_batch(val, args.batch_size, args.seq_len, torch.Generator().manual_seed(0))[:, :-1]
    seen = {}
    model.norm_f.register_forward_hook(lambda m, inp, out: seen.setdefault("h", inp[0]))
    outs = model(x, return_routing=True).mod_layer_outputs
    h = seen["h"].float()
    z = max((float(o.routing.router_logits.abs().max()) for o in outs), default=0.0)
    return dict(final_hidden_rms=float(h.pow(2).mean().sqrt()), final_hidden_max=float(h.abs().max()),
                router_logit_absmax=z)


def run_one(args, name: str, seed: int) -> Dict:
    argv = train_argv(args, name, seed)
    run_dir = args.out / f"{name}_s{seed}"
    if (run_dir / "metrics.json").is_file() and (run_dir / "model.pt").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metrics.get("final_step") == metrics["config"]["steps"]:
            print(f"ablations: {name} seed {seed}: already done ({run_dir})", flush=True)
            return summarise(args, name, seed, metrics, run_dir)
        raise SystemExit(f"ablations: {run_dir} holds an unfinished run: remove it to redo it")
    print(f"ablations: {name} seed {seed}: python -m mod_ext.train {' '.join(argv)}", flush=True)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        metrics = train.main(argv)
    return summarise(args, name, seed, metrics, run_dir)


def summarise(args, name: str, seed: int, metrics: Dict, run_dir: Path) -> Dict:
    cfg = metrics["config"]
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    row = dict(
        config=name, seed=seed, steps=cfg["steps"], flops_per_token=cfg["flops_per_token"],
        train_flops=3 * cfg["flops_per_token"] * tokens_per_step * cfg["steps"],
        val_loss=metrics["evals"][-1]["val_loss"], tokens_per_s=metrics["tokens_per_s"],
        curve=[(3 * cfg["flops_per_token"] * tokens_per_step * e["step"], e["val_loss"]) for e in metrics["evals"]],
    )
    if not cfg["dense"]:
        row.update(causal_val_loss=metrics.get("causal_val_loss"), causal_recall=metrics.get("causal_recall"),
                   causal_accuracy=metrics.get("causal_accuracy"),
                   causal_routed_fraction=metrics.get("causal_routed_fraction"))
    row.update(hidden_state_scale(run_dir, args))
    return row


def mean_std(values: List[Optional[float]]) -> Optional[tuple]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(ms: Optional[tuple], digits: int = 4) -> str:
    return "-" if ms is None else f"{ms[0]:.{digits}f} \u00b1 {ms[1]:.{digits}f}"


def aggregate(rows: List[Dict]) -> Dict[str, Dict]:
    by = {}
    for name in CONFIGS:
        rs = [r for r in rows if r["config"] == name]
        if not rs:
            continue
        by[name] = {k: mean_std([r.get(k) for r in rs]) for k in (
            "val_loss", "causal_val_loss", "causal_recall", "causal_accuracy", "tokens_per_s", "final_hidden_rms",
            "router_logit_absmax")}
        by[name].update(n=len(rs), steps=rs[0]["steps"], flops_per_token=rs[0]["flops_per_token"],
                        train_flops=statistics.fmean(r["train_flops"] for r in rs))
    return by


def findings(by: Dict[str, Dict]) -> List[str]:
    """The paper's claims, each checked against these numbers (stated as measured)."""
    out = []

    def val(name):
        return by[name]["val_loss"] if name in by else None

    def apart(a, b):
        """Difference of two means in units of their pooled standard deviation."""
        (ma, sa), (mb, sb) = val(a), val(b)
        pooled = math.sqrt((sa * sa + sb * sb) / 2)
        return (mb - ma) / pooled if pooled > 0 else math.inf

    mods = [n for n in ("mod_c0.125_every2", "mod_c0.125_every1", "mod_c0.25_every2", "mod_c0.5_every2") if n in by]
    if "mod_c0.125_every2" in by and len(mods) > 1:
        best = min(mods, key=lambda n: val(n)[0])
        ok = best == "mod_c0.125_every2"
        out.append(
            f"**12.5% capacity on every other layer is the best MoD variant** (paper Section 4.1): "
            f"{'reproduced' if ok else 'not reproduced'}. Best: {CONFIGS[best][0]} at {fmt(val(best))}; "
            + ", ".join(f"{CONFIGS[n][0]} {fmt(val(n))}" for n in mods if n != best) + ".")
    if "random_c0.125_every2" in by and "mod_c0.125_every2" in by:
        d = val("random_c0.125_every2")[0] - val("mod_c0.125_every2")[0]
        k = apart("mod_c0.125_every2", "random_c0.125_every2")
        ok = d > 0 and k > 2
        out.append(
            f"**Learned routing is far better than random routing** (paper Section 4.1): "
            f"{'reproduced' if ok else 'not reproduced' if d <= 0 else 'only weakly'}: random routing ends "
            f"{d:+.4f} nats above learned routing ({k:.1f} pooled standard deviations over seeds).")
    if "dense" in by and "mod_c0.125_every2" in by:
        dm, mm = val("dense"), val("mod_c0.125_every2")
        ratio = by["mod_c0.125_every2"]["flops_per_token"] / by["dense"]["flops_per_token"]
        k = apart("mod_c0.125_every2", "dense")
        verdict = ("reproduced (better)" if mm[0] < dm[0] and k > 2 else
                   "reproduced (matched within the seed spread)" if abs(k) <= 2 else "not reproduced (worse)")
        out.append(
            f"**MoD matches or beats the isoFLOP baseline while needing fewer FLOPs per forward pass** "
            f"(paper Section 4.1, Figure 3): {verdict}: MoD {fmt(mm)} vs dense {fmt(dm)} at the same "
            f"training FLOPs, with {ratio:.2f}x the dense model's forward FLOPs per token.")
    for name, what in (("mod_c0.125_every2", "predictor"), ("router_aux_c0.125_every2", "router aux loss")):
        if name in by and by[name]["causal_val_loss"] is not None:
            c, t = by[name]["causal_val_loss"], by[name]["val_loss"]
            out.append(
                f"**Causal routing ({what}) costs little** (paper Section 3.5, Figure 6): causal "
                f"{fmt(c)} vs top-k {fmt(t)} ({100 * (c[0] / t[0] - 1):+.2f}%); recall of the top-k tokens "
                f"{fmt(by[name]['causal_recall'], 3)}, accuracy {fmt(by[name]['causal_accuracy'], 3)}.")
    if "identity_c0.125_every2" in by and "mod_c0.125_every2" in by:
        i, s = by["identity_c0.125_every2"], by["mod_c0.125_every2"]
        out.append(
            f"**Identity router weight (r = w.x)**: final residual-stream RMS {fmt(i['final_hidden_rms'], 2)} "
            f"vs {fmt(s['final_hidden_rms'], 2)} with the sigmoid; largest |router logit| "
            f"{fmt(i['router_logit_absmax'], 2)} vs {fmt(s['router_logit_absmax'], 2)}; validation loss "
            f"{fmt(i['val_loss'])} vs {fmt(s['val_loss'])}.")
    return out


def plot(rows: List[Dict], by: Dict[str, Dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in by:
        curves = [r["curve"] for r in rows if r["config"] == name]
        n = min(len(c) for c in curves)
        xs = [statistics.fmean(c[i][0] for c in curves) for i in range(n)]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        mean = [statistics.fmean(y) for y in ys]
        line, = ax.plot(xs[1:], mean[1:], marker="o", markersize=3, label=CONFIGS[name][0],
                        ls="--" if name == "dense" else "-")
        ax.fill_between(xs[1:], [min(y) for y in ys[1:]], [max(y) for y in ys[1:]], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/byte, top-k routing)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finals = [m for b in by.values() for m in [b["val_loss"][0]]]
    lo, hi = min(finals), max(finals)
    ax.set_ylim(lo - 0.1 * (hi - lo + 0.05), hi + 0.8 * (hi - lo + 0.05))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def write_outputs(args, rows: List[Dict], wall_s: Optional[float]) -> str:
    by = aggregate(rows)
    args.docs.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python benchmarks/ablations.py"] + [a for a in args.argv if a != "--report"])
    setting = (f"d_model {args.d_model}, {args.n_layer} layers, {args.n_head} heads, {args.batch_size} x "
               f"{args.seq_len} tokens per step, lr {args.lr}, every run at the dense model's training FLOPs for "
               f"{args.dense_steps} steps ({budget(args):.3g} FLOPs), seeds {', '.join(map(str, args.seeds))}, "
               f"{args.eval_batches} held-out batches per evaluation, {args.threads} CPU threads")
    lines = [
        "# Mixture-of-Depths ablations at small scale", "",
        f"`{cmd}` (benchmarks/ablations.py), {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"{cpu_name()}, {os.cpu_count()} cores"
        + (f", {wall_s / 60:.0f} min." if wall_s else "."), "",
        f"Setting: {setting}. Data: {args.data or 'Shakespeare (mod_ext.data; held-out plays)'}.", "",
        "Mean \u00b1 standard deviation over seeds. *val loss*: held-out cross-entropy (nats/byte) with top-k "
        "routing (training's); *causal*: with causal routing (sampling's; predictor or router logits above the "
        "threshold calibrated on training batches); *recall*: fraction of the top-k tokens causal routing also "
        "routes. Throughput from the median step time.", "",
        "| configuration | steps | FLOPs / forward token | val loss | causal val loss | causal recall | "
        "training tokens / s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in by.items():
        lines.append(f"| {CONFIGS[name][0]} | {b['steps']} | {b['flops_per_token'] / 1e6:.2f} M | {fmt(b['val_loss'])} "
                     f"| {fmt(b['causal_val_loss']) if not name.startswith('random') else '-'} "
                     f"| {fmt(b['causal_recall'], 3) if not name.startswith('random') else '-'} "
                     f"| {fmt(b['tokens_per_s'], 0)} |")
    lines += ["", "Random routing has no causal column: its top-k is random, so there is nothing to predict.", "",
              "## The paper's findings, checked", ""]
    lines += [f"- {f}" for f in findings(by)]
    lines += ["", "![validation loss against training FLOPs](ablations.png)", ""]
    text = "\n".join(lines)
    (args.docs / "ablations.md").write_text(text)
    (args.docs / "ablations.json").write_text(json.dumps(dict(setting=vars(args) | dict(out=str(args.out),
                                                                                        docs=str(args.docs)),
                                                              runs=rows), indent=1, default=str))
    plot(rows, by, args.docs / "ablations.png", f"MoD ablations ({setting.split(', every run')[0]}), "
                                                f"{len(args.seeds)} seeds")
    return text


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:  # seeds outermost: a partial sweep already covers every configuration
        for name in args.configs:
            if args.report:
                run_dir = args.out / f"{name}_s{seed}"
                if not (run_dir / "metrics.json").is_file():
                    continue
                rows.append(summarise(args, name, seed, json.loads((run_dir / "metrics.json").read_text()), run_dir))
            else:
                rows.append(run_one(args, name, seed))
    if not rows:
        raise SystemExit(f"ablations: no finished runs in {args.out}")
    text = write_outputs(args, rows, None if args.report else time.perf_counter() - t0)
    print(text)
    print(f"\nwrote {args.docs / 'ablations.md'}, {args.docs / 'ablations.png'}, {args.docs / 'ablations.json'}")
    return rows


if __name__ == "__main__":
    main()
