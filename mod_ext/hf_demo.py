"""Convert a Hugging Face Llama to Mixture-of-Depths with mod_ext.hf and compare it with the dense model.

    python -m mod_ext.hf_demo                 # ~6 minutes on 2 quiet CPU cores (the corpus is fetched once)
    python -m mod_ext.hf_demo --quick         # tiny smoke-test configuration (seconds)
    python -m mod_ext.hf_demo --data my.txt   # any UTF-8 text file (90/10 split)

Steps (no pretrained weights, no hub downloads: the model comes from a ``LlamaConfig``):

1. Build a small byte-level ``LlamaForCausalLM`` and pretrain it dense on the Shakespeare
   corpus of :mod:`mod_ext.demo` (:mod:`mod_ext.data`, whole works held out) with
   ``transformers.Trainer``.
2. Copy it and convert the copy with ``mod_ext.hf.convert(model, capacity_factor=0.125,
   every=2)`` (layers 1, 3, 5, ... route 12.5% of the tokens).
3. Fine-tune the dense model and the converted model with ``transformers.Trainer`` for the
   SAME training FLOPs: the MoD forward is cheaper, so it gets more steps (same data
   order, same optimizer and schedule shape; the aux loss that trains the predictor comes
   in through ``out.loss``, so Trainer needs no change).
4. Report validation loss (top-k routing), causal-routing validation loss
   (``mod_ext.hf.set_routing(model, "causal")``), the predictor's accuracy and recall
   against top-k membership (:func:`mod_ext.routing_metrics` on each MoD layer), and
   greedy ``generate`` tokens/s of both models at batch 1 and 8 (KV cache, fixed
   ``max_new_tokens``, timed after a warm-up).

FLOPs (:func:`flops_per_token`; a multiply-add is 2 FLOPs, norms, rotary, softmax, routing
gather/scatter and the embedding lookup ignored, as in ``MoDTransformer.flops_per_token``)::

    linear  = 2 * (params of q, k, v, o, gate, up, down projections)   # per token, forward
    attn(n) = 2 * 2 * n_heads * head_dim * (n + 1) / 2                  # QK^T and AV, causal mean context
    dense layer = linear + attn(T)
    MoD layer   = (C / T) * (linear + attn(C))      # only the C = capacity_for(T, c) routed tokens
                  + 2 D + 2 (D P + P)               # router logit; predictor MLP of width P (all tokens)
    forward / token = sum over layers + 2 D V       # + the LM head
    training FLOPs / step = 3 * forward / token * B * T       # forward + backward = "6 N T"

Writes to ``--out`` (default runs/hf_demo): report.json, summary.md, loss_curves.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

_EXTRA_HINT = (
    "from the checkout pip install --no-build-isolation -e \".[hf,demo]\" (the [hf] extra: transformers and "
    "accelerate, which transformers.Trainer needs; [demo]: numpy, tqdm, matplotlib)"
)
try:  # the [hf] and [demo] extras: the core package needs only torch
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
    import matplotlib
    import numpy  # noqa: F401  (the corpus loader, mod_ext.data)
    import tqdm  # noqa: F401
    import transformers
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"python -m mod_ext.hf_demo needs the [hf] and [demo] extras ({e.name} is not installed): {_EXTRA_HINT}",
        name=e.name,
    ) from e

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

from . import __version__  # noqa: E402
from . import hf as mod_hf  # noqa: E402
from .data import Corpus, decode, encode, get_batch, load_corpus  # noqa: E402
from .layer import capacity_for, routing_metrics  # noqa: E402

# Defaults of the full run and of --quick; explicit command-line values override both.
FULL = dict(pretrain_steps=240, steps=100, batch_size=16, seq_len=256, hidden=128, n_layer=6, n_head=4,
            pretrain_lr=2e-3, lr=1e-3, eval_batches=6, n_evals=5, new_tokens=64, prompt_len=32, gen_repeats=3)
QUICK = dict(pretrain_steps=4, steps=3, batch_size=4, seq_len=64, hidden=32, n_layer=2, n_head=2,
             pretrain_lr=3e-3, lr=3e-3, eval_batches=2, n_evals=2, new_tokens=8, prompt_len=8, gen_repeats=1)
GEN_BATCHES = (1, 8)
PROMPT = "To be, or not to be"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line options (None means: take the FULL or QUICK preset)."""
    p = argparse.ArgumentParser(prog="python -m mod_ext.hf_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="UTF-8 text file to train on instead of Shakespeare")
    p.add_argument("--out", default="runs/hf_demo", help="output directory (default: runs/hf_demo)")
    p.add_argument("--pretrain-steps", type=int, help=f"dense pretraining steps (default {FULL['pretrain_steps']})")
    p.add_argument("--steps", type=int, help=f"dense fine-tuning steps; the MoD model gets the same FLOPs "
                   f"(default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {FULL['batch_size']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence, also max_position_embeddings "
                   f"(default {FULL['seq_len']})")
    p.add_argument("--hidden", type=int, help=f"hidden size (default {FULL['hidden']})")
    p.add_argument("--n-layer", type=int, help=f"decoder layers (default {FULL['n_layer']})")
    p.add_argument("--n-head", type=int, help=f"attention heads (default {FULL['n_head']})")
    p.add_argument("--pretrain-lr", type=float, help=f"peak pretraining learning rate (default {FULL['pretrain_lr']})")
    p.add_argument("--lr", type=float, help=f"peak fine-tuning learning rate (default {FULL['lr']})")
    p.add_argument("--capacity-factor", type=float, default=0.125, help="MoD capacity (default 0.125)")
    p.add_argument("--mod-every", type=int, default=2, help="every n-th layer is MoD (default 2)")
    p.add_argument("--causal-router", choices=["predictor", "router"], default="predictor",
                   help="what routes causally when generating (default predictor)")
    p.add_argument("--aux-loss-weight", type=float, default=0.1, help="weight of the MoD aux loss (default 0.1)")
    p.add_argument("--eval-batches", type=int, help="held-out batches per evaluation")
    p.add_argument("--n-evals", type=int, help="evaluations per training run (plus one at its start)")
    p.add_argument("--new-tokens", type=int, help=f"max_new_tokens of the timed generate calls "
                   f"(default {FULL['new_tokens']})")
    p.add_argument("--prompt-len", type=int, help=f"prompt tokens of the timed generate calls "
                   f"(default {FULL['prompt_len']})")
    p.add_argument("--gen-repeats", type=int, help="timed generate calls per batch size (median reported)")
    p.add_argument("--seed", type=int, default=1337, help="seed for init, data order and evaluation batches")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--cache-dir", default=None, help="corpus cache (default $MOD_EXT_CACHE or "
                   "~/.cache/mod_ext/shakespeare)")
    p.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("pretrain_steps", "steps", "batch_size", "seq_len", "hidden", "n_layer", "n_head",
                 "eval_batches", "n_evals", "new_tokens", "prompt_len", "gen_repeats", "threads", "mod_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt_len + args.new_tokens > args.seq_len:
        p.error(f"--prompt-len + --new-tokens ({args.prompt_len} + {args.new_tokens}) must fit in --seq-len "
                f"{args.seq_len} (the model's max_position_embeddings)")
    if args.hidden % args.n_head or (args.hidden // args.n_head) % 2:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --n-head ({args.n_head}) with an even head "
                "size (rotary embeddings)")
    if args.mod_every > args.n_layer:
        p.error(f"--mod-every {args.mod_every} > --n-layer {args.n_layer}: no layer would become MoD")
    if not 0 < args.capacity_factor <= 1:
        p.error(f"--capacity-factor must be in (0, 1], got {args.capacity_factor}")
    if args.data is not None and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    return args


# ------------------------------------------------------------------------------------ model


def llama_config(args, vocab_size: int) -> LlamaConfig:
    """A small Llama (SwiGLU width 8/3 D rounded to 64, full multi-head attention, sdpa)."""
    D = args.hidden
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=D, intermediate_size=max(64, 64 * round(8 * D / 3 / 64)),
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, attn_implementation="sdpa",
        use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(model, seq_len: int) -> float:
    """Forward FLOPs per token at length ``seq_len`` (top-k routing), read off the model's
    modules (formula in the module docstring). Training FLOPs per token are 3x this."""
    cfg = model.config
    D, T = cfg.hidden_size, seq_len
    mod_ids = set(mod_hf.mod_layer_indices(model)) if mod_hf.is_converted(model) else set()
    total = 2.0 * _linear_params(model.lm_head)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        linear = 2.0 * (_linear_params(attn) + _linear_params(layer.mlp))
        width = cfg.num_attention_heads * attn.head_dim

        def attn_flops(n):
            return 2 * 2 * width * (n + 1) / 2

        if i in mod_ids:
            mod = layer.mod
            C = capacity_for(T, mod.capacity_factor)
            total += (C / T) * (linear + attn_flops(C)) + 2 * D
            if mod.predictor is not None:
                total += 2.0 * _linear_params(mod.predictor)
        else:
            total += linear + attn_flops(T)
    return float(total)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ data


class WindowStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of random training windows ``{"input_ids", "labels"}`` of
    ``seq_len`` tokens (the model shifts the labels). Every pass restarts from the seed, so
    two Trainer runs with the same seed see the same windows in the same order."""

    def __init__(self, data: torch.Tensor, seq_len: int, seed: int, chunk: int = 64):
        super().__init__()
        self.data, self.seq_len, self.seed, self.chunk = data, seq_len, seed, chunk

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            w = get_batch(self.data, self.chunk, self.seq_len - 1, gen)  # (chunk, seq_len)
            for row in w:
                yield {"input_ids": row, "labels": row}


def val_batches(corpus: Corpus, args) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    return [get_batch(corpus.val, args.batch_size, args.seq_len - 1, gen) for _ in range(args.eval_batches)]


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model, batches, routing: Optional[str] = None) -> float:
    """Mean next-token cross-entropy (nats/byte, the LM loss only, no aux loss) over fixed
    held-out batches; ``routing`` ("topk"/"causal") sets a converted model's routing for
    the call and restores top-k after."""
    was_training = model.training
    model.eval()
    if routing is not None:
        mod_hf.set_routing(model, routing)
    try:
        losses = []
        for x in batches:
            logits = model(input_ids=x, use_cache=False).logits
            losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).item())
    finally:
        if routing is not None:
            mod_hf.set_routing(model, "topk")
        model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def predictor_metrics(model, batches) -> Dict:
    """Causal routing (the predictor's, or the router's, logit > 0, first come first served,
    at most the causal capacity) against top-k membership on held-out batches, by
    :func:`mod_ext.routing_metrics` on each MoD layer's ``MoDBlock`` output (read with a
    forward hook during a top-k forward). Means over batches; per layer and overall."""
    was_training = model.training
    model.eval()
    seen: Dict[int, List] = {}
    hooks = []
    for i in mod_hf.mod_layer_indices(model):
        block = model.model.layers[i].mod

        def hook(module, args, kwargs, out, i=i):
            T = out.output.shape[1]
            m = routing_metrics(out.causal_scores, out.routing.indices, module.causal_capacity(T),
                                kwargs.get("valid"))
            seen.setdefault(i, []).append((m.accuracy.item(), m.recall.item(), m.routed_fraction.item()))

        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        for x in batches:
            model(input_ids=x, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    per_layer = {str(i): dict(accuracy=mean([a for a, _, _ in v]), recall=mean([r for _, r, _ in v]),
                              causal_routed_fraction=mean([f for _, _, f in v])) for i, v in sorted(seen.items())}
    return dict(
        predictor_accuracy=mean([v["accuracy"] for v in per_layer.values()]),
        predictor_recall=mean([v["recall"] for v in per_layer.values()]),
        causal_routed_fraction=mean([v["causal_routed_fraction"] for v in per_layer.values()]),
        per_layer=per_layer,
    )


def generation_speed(model, prompts: torch.Tensor, new_tokens: int, repeats: int) -> Dict:
    """Greedy ``generate`` of ``new_tokens`` tokens after ``prompts`` (B, P) with the KV cache:
    one warm-up call, then the median of ``repeats`` timed calls; tokens/s = B * new_tokens
    / time (prefill included). For a converted model also the tokens the MoD layers
    dropped (``mod_ext.hf.cache_drops``: wanted the layer but got no decode slot)."""
    model.eval()
    B = prompts.shape[0]
    kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
              max_new_tokens=new_tokens, pad_token_id=0, return_dict_in_generate=True)
    model.generate(prompts, **dict(kw, max_new_tokens=min(4, new_tokens)))  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompts, **kw)
        times.append(time.perf_counter() - t0)
    seqs = out.sequences
    if seqs.shape[1] != prompts.shape[1] + new_tokens:
        raise RuntimeError(f"mod_ext.hf_demo: generate returned {seqs.shape[1] - prompts.shape[1]} new tokens, "
                           f"expected {new_tokens}")
    res = dict(batch=B, prompt_len=int(prompts.shape[1]), new_tokens=new_tokens, time_s=statistics.median(times),
               times_s=times, tokens_per_s=B * new_tokens / statistics.median(times),
               text=decode(seqs[0].tolist()))
    converted = mod_hf.is_converted(model)
    if converted:
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        drops = mod_hf.cache_drops(cache)
        res["drops_per_layer"] = {str(i): int(d.sum()) for i, d in sorted(drops.items())}
    # The cached generation against a full recompute (causal routing for a MoD model): the
    # greedy token at each step vs the argmax of one forward over the generated sequences.
    P = prompts.shape[1]
    logits = _forward_logits(model, seqs, "causal" if converted else None)
    res["recompute_agreement"] = (logits[:, P - 1:-1].argmax(-1) == seqs[:, P:]).float().mean().item()
    return res


@torch.no_grad()
def _forward_logits(model, ids: torch.Tensor, routing: Optional[str]) -> torch.Tensor:
    if routing is not None:
        mod_hf.set_routing(model, routing)
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        if routing is not None:
            mod_hf.set_routing(model, "topk")


# ------------------------------------------------------------------------------------ training


class _Monitor(TrainerCallback):
    """Progress bar (tqdm), step times, train-loss log and held-out evaluations at fixed steps."""

    def __init__(self, name: str, model, steps: int, n_evals: int, flops_per_step: float, flops_offset: float,
                 batches):
        self.name, self.model, self.steps = name, model, steps
        self.eval_steps = sorted({round(i * steps / n_evals) for i in range(1, n_evals + 1)})
        self.fps, self.offset, self.batches = flops_per_step, flops_offset, batches
        self.curve, self.train_loss, self.step_times = [], [], []
        self.wall, self._t0, self.bar = 0.0, None, None

    def _record(self, step: int) -> None:
        self.curve.append(dict(step=step, train_flops=self.offset + self.fps * step, wall_s=self.wall,
                               val_loss=evaluate(self.model, self.batches)))

    def on_train_begin(self, args, state, control, **kw):
        self._record(0)
        self.bar = tqdm(total=self.steps, desc=f"{self.name:>8}", unit="step", dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        dt = time.perf_counter() - self._t0
        self.step_times.append(dt)
        self.wall += dt
        self.bar.update(1)
        if state.global_step in self.eval_steps:
            self._record(state.global_step)
            self.bar.set_postfix(val=f"{self.curve[-1]['val_loss']:.3f}")

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.train_loss.append(dict(step=state.global_step, loss=float(logs["loss"])))

    def on_train_end(self, args, state, control, **kw):
        self.bar.close()


def train(name: str, model, corpus: Corpus, args, steps: int, lr: float, seed: int, batches,
          flops_offset: float = 0.0) -> Dict:
    """Train ``model`` in place with ``transformers.Trainer`` for ``steps`` steps on the
    training stream (AdamW, betas (0.9, 0.95), weight decay 0.1 (Trainer's rule: not on
    biases and norms), 10% warmup then cosine, grad clip 1.0); returns its curve and timing."""
    fpt = flops_per_token(model, args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    flops_per_step = 3 * fpt * tokens_per_step
    monitor = _Monitor(name, model, steps, args.n_evals, flops_per_step, flops_offset, batches)
    with tempfile.TemporaryDirectory(prefix="mod_ext_hf_demo_") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", logging_steps=max(1, steps // 20),
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            seed=seed, data_seed=seed, dataloader_num_workers=0, dataloader_pin_memory=False,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=WindowStream(corpus.train, args.seq_len, seed),
                          callbacks=[monitor])
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    model.eval()
    return dict(
        steps=steps,
        params=num_params(model),
        flops_per_token=fpt,
        train_flops=flops_per_step * steps,
        step_time_s=statistics.median(monitor.step_times),
        tokens_per_s=tokens_per_step * steps / monitor.wall,
        train_wall_s=monitor.wall,
        trainer_wall_s=total,
        val_loss=monitor.curve[-1]["val_loss"],
        curve=monitor.curve,
        train_loss=monitor.train_loss,
    )


# ------------------------------------------------------------------------------------ report


def plot_curves(report: Dict, path: Path) -> None:
    """Validation loss vs cumulative training FLOPs (pretraining, then both fine-tunes) and,
    for the fine-tunes, vs training wall-clock."""
    pre, dense, mod = report["pretrain"], report["dense"], report["mod"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot([p["train_flops"] for p in pre["curve"]], [p["val_loss"] for p in pre["curve"]], color="0.5",
            marker=".", label="dense pretraining")
    for key, label, style in (("dense", "dense fine-tune", dict(color="tab:blue", marker="o")),
                              ("mod", "MoD fine-tune (top-k)", dict(color="tab:orange", marker="s"))):
        c = report[key]["curve"]
        ax.plot([p["train_flops"] for p in c], [p["val_loss"] for p in c], markersize=4, label=label, **style)
        axes[1].plot([p["wall_s"] for p in c], [p["val_loss"] for p in c], markersize=4, label=label, **style)
    for a in axes:
        a.scatter([mod["curve"][-1]["train_flops"] if a is ax else mod["curve"][-1]["wall_s"]],
                  [mod["causal_val_loss"]], color="tab:red", marker="x", zorder=5, label="MoD, causal routing")
    ax.set_xlabel("cumulative training FLOPs (pretraining + fine-tuning)")
    axes[1].set_xlabel("fine-tuning wall-clock (s, evaluation excluded)")
    lo = min(p["val_loss"] for r in (dense, mod) for p in r["curve"])
    hi = max(pre["curve"][min(2, len(pre["curve"]) - 1)]["val_loss"],
             max(p["val_loss"] for r in (dense, mod) for p in r["curve"]), mod["causal_val_loss"])
    for a in axes:
        a.set_ylabel("validation loss (nats/byte)")
        a.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    c = report["config"]
    corpus = "Shakespeare" if c["data"] is None else c["corpus"]
    fig.suptitle(f"transformers Llama ({c['n_layer']} layers, hidden {c['hidden']}) on {corpus}, pretrained dense, "
                 f"then dense vs mod_ext.hf.convert(c={c['capacity_factor']}, every={c['mod_every']})\n"
                 f"fine-tuned with transformers.Trainer for the same FLOPs "
                 f"({c['dense_steps']} vs {c['mod_steps']} steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(report: Dict) -> str:
    """Markdown table of the headline numbers."""
    d, m, c = report["dense"], report["mod"], report["config"]
    conv = report["converted_before_finetune"]
    rows = [
        ("parameters", f"{d['params']:,}", f"{m['params']:,}"),
        ("forward FLOPs / token", f"{d['flops_per_token'] / 1e6:.2f} M", f"{m['flops_per_token'] / 1e6:.2f} M"),
        ("fine-tuning steps", f"{d['steps']}", f"{m['steps']}"),
        ("fine-tuning FLOPs", f"{d['train_flops']:.3g}", f"{m['train_flops']:.3g}"),
        ("median step time (Trainer)", f"{d['step_time_s'] * 1e3:.0f} ms", f"{m['step_time_s'] * 1e3:.0f} ms"),
        ("training tokens / s", f"{d['tokens_per_s']:,.0f}", f"{m['tokens_per_s']:,.0f}"),
        ("val loss after pretraining / right after convert (top-k)", f"{report['pretrain']['val_loss']:.4f}",
         f"{conv['val_loss']:.4f}"),
        ("val loss after fine-tuning (top-k routing)", f"{d['val_loss']:.4f}", f"{m['val_loss']:.4f}"),
        ("val loss after fine-tuning (causal routing)", "-", f"{m['causal_val_loss']:.4f}"),
        (f"{c['causal_router']} accuracy / recall vs top-k (held-out)", "-",
         f"{m['predictor_accuracy']:.3f} / {m['predictor_recall']:.3f}"),
    ]
    for B in GEN_BATCHES:
        gd, gm = report["generation"]["dense"][str(B)], report["generation"]["mod"][str(B)]
        ratio = gm["tokens_per_s"] / gd["tokens_per_s"]
        rows.append((f"generate tokens / s, B = {B} (greedy, {gd['new_tokens']} new tokens)",
                     f"{gd['tokens_per_s']:,.1f}", f"{gm['tokens_per_s']:,.1f} ({ratio:.2f}x)"))
        rows.append((f"generate B = {B}: tokens dropped per MoD layer", "-",
                     ", ".join(f"{k}: {v}" for k, v in gm["drops_per_layer"].items())))
        rows.append((f"generate B = {B}: greedy tokens = argmax of a full recompute",
                     f"{gd['recompute_agreement']:.1%}", f"{gm['recompute_agreement']:.1%}"))
    head = (f"transformers LlamaForCausalLM ({c['n_layer']} layers, hidden {c['hidden']}, {c['n_head']} heads), "
            f"pretrained dense for {c['pretrain_steps']} steps, then dense vs mod_ext.hf.convert(capacity_factor="
            f"{c['capacity_factor']}, every={c['mod_every']}) fine-tuned with transformers.Trainer for the same FLOPs; "
            f"{c['corpus']}; {c['tokens_per_step']} tokens/step; {c['threads']} CPU threads.")
    lines = [head, "", "| | dense | MoD |", "|---|---:|---:|"] + [f"| {a} | {b} | {x} |" for a, b, x in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the demo; returns the report (also written to <out>/report.json)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(args.data, args.cache_dir)
    timings = {"corpus_s": time.perf_counter() - t_start}
    if min(corpus.val.numel(), corpus.train.numel()) <= args.seq_len + 1:
        raise SystemExit(f"mod_ext.hf_demo: corpus too small for --seq-len {args.seq_len}")
    batches = val_batches(corpus, args)
    cfg = llama_config(args, corpus.vocab_size)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    print(f"corpus: {corpus.name}: {corpus.train.numel():,} train / {corpus.val.numel():,} val tokens")
    print(f"model: LlamaForCausalLM, {num_params(model):,} parameters; {args.batch_size} x {args.seq_len} "
          f"tokens per step, {args.threads} threads")

    # 1. dense pretraining
    t0 = time.perf_counter()
    pre = train("pretrain", model, corpus, args, args.pretrain_steps, args.pretrain_lr, args.seed, batches)
    timings["pretrain_s"] = time.perf_counter() - t0

    # 2. convert a copy; both fine-tunes start from the pretrained weights
    dense = copy.deepcopy(model)
    mod = mod_hf.convert(copy.deepcopy(model), capacity_factor=args.capacity_factor, every=args.mod_every,
                         causal_router=args.causal_router, aux_loss_weight=args.aux_loss_weight)
    del model
    converted = dict(val_loss=evaluate(mod, batches), causal_val_loss=evaluate(mod, batches, "causal"),
                     mod_layers=mod_hf.mod_layer_indices(mod))
    fpt_dense, fpt_mod = flops_per_token(dense, args.seq_len), flops_per_token(mod, args.seq_len)
    mod_steps = max(1, round(args.steps * fpt_dense / fpt_mod))
    print(f"converted layers {converted['mod_layers']} (capacity {args.capacity_factor}): val loss "
          f"{pre['val_loss']:.4f} -> {converted['val_loss']:.4f} (top-k), {converted['causal_val_loss']:.4f} (causal)")
    print(f"fine-tuning: dense {args.steps} steps, MoD {mod_steps} steps (same training FLOPs: "
          f"{fpt_dense / 1e6:.2f} M vs {fpt_mod / 1e6:.2f} M forward FLOPs/token)")

    # 3. fine-tune both for the same FLOPs (same data stream and seed)
    ft_seed = args.seed + 2
    t0 = time.perf_counter()
    res_dense = train("dense", dense, corpus, args, args.steps, args.lr, ft_seed, batches, pre["train_flops"])
    timings["dense_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res_mod = train("mod", mod, corpus, args, mod_steps, args.lr, ft_seed, batches, pre["train_flops"])
    timings["mod_s"] = time.perf_counter() - t0

    # 4. causal routing, predictor, generation
    t0 = time.perf_counter()
    res_mod["causal_val_loss"] = evaluate(mod, batches, "causal")
    res_mod.update(predictor_metrics(mod, batches))
    timings["metrics_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen_gen = torch.Generator().manual_seed(args.seed + 3)
    generation = {"dense": {}, "mod": {}}
    for B in GEN_BATCHES:
        prompts = get_batch(corpus.val, B, args.prompt_len - 1, gen_gen)  # (B, prompt_len)
        if B == 1 and len(PROMPT.encode()) <= args.prompt_len:
            prompts = encode(PROMPT[: args.prompt_len]).long()[None]
        for key, m in (("dense", dense), ("mod", mod)):
            generation[key][str(B)] = generation_speed(m, prompts, args.new_tokens, args.gen_repeats)
    timings["generate_s"] = time.perf_counter() - t0

    report = dict(
        config=dict(
            **vars(args),
            corpus=corpus.name, split=corpus.split, held_out_works=corpus.val_works,
            train_tokens=int(corpus.train.numel()), val_tokens=int(corpus.val.numel()),
            tokens_per_step=args.batch_size * args.seq_len, pretrain_flops=pre["train_flops"],
            dense_steps=args.steps, mod_steps=mod_steps, budget="same fine-tuning FLOPs",
            llama_config=cfg.to_dict(), mod_ext_settings=dict(mod.config.mod_ext),
            flops="forward/token = 2 D V + sum_layers {dense: linear + attn(T); MoD: (C/T)(linear + attn(C)) + 2 D + "
                  "2 (D P + P)}, linear = 2 * projection params, attn(n) = 2*2*heads*head_dim*(n+1)/2, "
                  "C = capacity_for(T, c); training FLOPs/step = 3 * forward/token * B * T",
            optimizer="transformers.Trainer: AdamW (betas 0.9, 0.95; weight decay 0.1 except biases/norms), "
                      "10% warmup + cosine, grad clip 1.0",
            eval="mean LM cross-entropy on fixed held-out batches (no aux loss); wall_s excludes evaluation",
            generation="greedy generate with the KV cache (MoD: causal routing, MoD cache), one warm-up call, "
                       "median of gen_repeats timed calls, tokens/s = B * new_tokens / time (prefill included); "
                       "recompute_agreement: greedy tokens equal to the argmax of one full forward over the "
                       "generated sequences (MoD: causal routing)",
            torch=torch.__version__, transformers=transformers.__version__, mod_ext=__version__,
        ),
        pretrain=pre,
        converted_before_finetune=converted,
        dense=res_dense,
        mod=res_mod,
        generation=generation,
    )
    plot_curves(report, out / "loss_curves.png")
    report["timings"] = timings
    report["total_wall_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = summary_table(report)
    (out / "summary.md").write_text(table + "\n")
    print()
    print(table)
    g1 = generation["mod"]["1"]["text"]
    print(f"\ngreedy sample (MoD, causal routing, B = 1):\n{g1}\n")
    print(f"wrote {out / 'report.json'}, {out / 'summary.md'}, {out / 'loss_curves.png'} "
          f"({report['total_wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
