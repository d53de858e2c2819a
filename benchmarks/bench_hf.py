"""Benchmark the Hugging Face integration: a transformers Llama, dense against the same model
converted with ``mod_ext.hf.convert(model, capacity_factor=0.125, every=2)``: training step
time (forward + backward) and ``generate`` tokens/s with the KV cache.

    python benchmarks/bench_hf.py --quick                      # CPU smoke run, < 1 minute
    python benchmarks/bench_hf.py --json out/hf_cpu.json       # CPU: hidden 512, 8 layers, fp32
    python benchmarks/bench_hf.py --gpu --json out/hf_gpu.json # GPU: hidden 2048, 16 layers, bf16

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` (random weights, nothing downloaded):
hidden D, D / 64 heads (full multi-head attention), SwiGLU width 64 * round(8 D / 3 / 64),
byte vocabulary (256, as bench_decode; ``--vocab 32000`` for a Llama tokenizer's LM head),
sdpa attention, max_position_embeddings = max(seq, prompt + new tokens). The converted
copy has the same weights; MoD layers 1, 3, 5, ... (every=2) route c = 0.125.

What is timed:

* **train step**: ``model(input_ids, labels=input_ids).loss.backward()`` (top-k routing; the
  MoD loss includes its aux loss) plus ``zero_grad``, at (B, T) = (--batch, --seq); dense
  and MoD timed in turn, the median of --repeats calls after warm-up calls.
* **generate**: ``model.generate(prompt, max_new_tokens=N, do_sample=False)`` with the KV
  cache (transformers' DynamicCache; the MoD layers' own cache layers, causal routing,
  the CPU's dynamic decode path), B random prompts of --prompt-len tokens, at each
  --gen-batch; tokens/s = B * N / time of the call (prefill included); one warm-up call,
  then the median of --gen-repeats calls, dense and MoD in turn. Before timing, each MoD
  layer's predictor bias is set so that about a fraction c of the tokens of that very
  call want the layer (a trained predictor routes about c; a random one about half, or,
  its logits being dominated by the token, none or all of a short sequence), layer by
  layer, two passes, from the converted model's biases at each batch size, as
  bench_decode calibrates its predictors. The table gives the fraction of
  tokens that wanted a MoD layer (``wanted``) and the tokens each MoD layer dropped
  (wanted it, got no decode slot: ``decode_capacity`` of B per step, the default).

Targets (CPU, full run; benchmarks, not tests): MoD train step <= 0.75x the dense step;
MoD generate tokens/s >= 1.2x dense at B = 8. A missed target is profiled (torch.profiler
op table and cProfile of the Python calls, one call of each model; --profile).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, Results, add_common_args, env_info, judge, md_table,  # noqa: E402
                    print_env, setup)

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise SystemExit(f"bench_hf.py needs the [hf] extra ({e.name} is not installed): "
                     "pip install --no-build-isolation -e \".[hf]\"") from e

import mod_ext.hf as mod_hf  # noqa: E402

TRAIN_TARGET = 0.75  # MoD step time / dense step time, at most
GEN_TARGET = {"batch": 8, "speedup": 1.2}  # MoD tokens/s / dense tokens/s at B = 8, at least (CPU)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--gpu", action="store_true",
                   help="the GPU preset: --device cuda, hidden 2048, 16 layers, bf16, B 8 x T 2048")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default CPU 512, GPU 2048, quick 128)")
    p.add_argument("--n-layer", type=int, default=None, help="decoder layers (default CPU 8, GPU 16, quick 4)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads (default hidden / 64)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256, byte-level)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 8; quick 4)")
    p.add_argument("--seq", type=int, default=None,
                   help="training sequence length (default CPU 256, GPU 2048, quick 128)")
    p.add_argument("--gen-batch", default=None, help="comma-separated generate batch sizes (default 1,8,64; quick 1,8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens (default 32; quick 8)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed generate calls per case (default 3; quick 1)")
    p.add_argument("--capacity", type=float, default=0.125, help="MoD capacity factor (default 0.125)")
    p.add_argument("--mod-every", type=int, default=2, help="every n-th layer is MoD (default 2)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation (default sdpa)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train, generate")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="profile a case whose target is missed (auto, default), every case, or none")
    args = p.parse_args(argv)
    if args.compile:
        p.error("--compile: bench_hf times eager transformers models (generate does not compile here)")
    args.compile = False
    if args.gpu:
        args.device = "cuda"
    setup(args)
    gpu = args.gpu_shapes
    q = args.quick
    args.hidden = args.hidden or (128 if q else 2048 if gpu else 512)
    args.n_layer = args.n_layer or (4 if q else 16 if gpu else 8)
    args.n_head = args.n_head or max(1, args.hidden // 64)
    args.batch = args.batch or (4 if q else 8)
    args.seq = args.seq or (128 if q else 2048 if gpu else 256)
    args.gen_batch = [int(b) for b in (args.gen_batch or ("1,8" if q else "1,8,64")).split(",")]
    args.prompt_len = args.prompt_len or (16 if q else 32)
    args.new_tokens = args.new_tokens or (8 if q else 32)
    args.gen_repeats = args.gen_repeats or (1 if q else 3)
    args.skip = sorted({s for s in args.skip.split(",") if s})
    if set(args.skip) - {"train", "generate"}:
        p.error(f"--skip: unknown parts {sorted(set(args.skip) - {'train', 'generate'})}")
    if args.hidden % args.n_head:
        p.error(f"--hidden {args.hidden} is not a multiple of --n-head {args.n_head}")
    return args


def build_models(args, device, dtype):
    """The dense Llama and its converted copy (same weights)."""
    D = args.hidden
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=D, intermediate_size=64 * max(1, round(8 * D / 3 / 64)),
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
        max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens), tie_word_embeddings=False,
        attn_implementation=args.attn, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    with device:
        dense = LlamaForCausalLM(cfg).to(dtype)
    mod = mod_hf.convert(copy.deepcopy(dense), capacity_factor=args.capacity, every=args.mod_every)
    return dense, mod


@torch.no_grad()
def calibrate_routing(model, prompts, new_tokens, capacity_factor, biases, passes=2):
    """Set each MoD layer's predictor bias so that about a fraction c of the tokens of the
    greedy generate call on ``prompts`` (prefill and decode) have a predictor logit > 0,
    as a trained predictor routes (a random one routes about half, or, its logits being
    dominated by the token, none or all of a short sequence). Starts from the biases of
    the converted model (``biases``, so each batch size is calibrated alike), then layer
    by layer in order, each under the shifts before it, ``passes`` times (a later shift
    changes the generated tokens a little, so the final fraction is about c, reported as
    ``wanted_fraction``); the router is untouched (zero at conversion)."""
    preds = [model.model.layers[i].mod.predictor for i in mod_hf.mod_layer_indices(model)]
    preds = [p for p in preds if p is not None]
    for pred, b in zip(preds, biases):
        pred.net[2].bias.copy_(b)
    for _ in range(passes):
        for pred in preds:
            seen = []
            h = pred.register_forward_hook(lambda m, a, out: seen.append(out.detach().float().flatten()))
            generate_fn(model, prompts, new_tokens, {})()
            h.remove()
            q = torch.quantile(torch.cat(seen), 1 - capacity_factor)
            pred.net[2].bias -= q.to(pred.net[2].bias.dtype)


def predictor_biases(model):
    return [m.mod.predictor.net[2].bias.detach().clone() for m in
            (model.model.layers[i] for i in mod_hf.mod_layer_indices(model)) if m.mod.predictor is not None]


def train_fn(model, x):
    def fn():
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    return fn


def generate_fn(model, prompts, new_tokens, record):
    kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True, max_new_tokens=new_tokens,
              pad_token_id=0, return_dict_in_generate=True)

    def fn():
        out = model.generate(prompts, **kw)
        record["sequences"] = out.sequences
        record["cache"] = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return fn


def timed_pair(fns, repeats, warmup):
    """Median seconds per call of each fn, one call of each in turn per round (after warm-up)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples], samples


def profile_case(name, fns, device, top=15):
    """torch.profiler op table (self time) and cProfile of the Python calls, one call of each fn."""
    text = [f"### profile: {name}"]
    for label, fn in fns:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            fn()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        text.append(f"\n#### {label}: torch.profiler, top {top} ops by self time\n")
        text.append(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48))
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).strip_dirs().sort_stats("tottime").print_stats(top)
        text.append(f"\n#### {label}: cProfile, top {top} functions by own time\n")
        text.append(s.getvalue())
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(r"mod_ext|modeling_", 2 * top)
        text.append(f"\n#### {label}: cProfile, mod_ext and transformers model functions by cumulative time\n")
        text.append(s.getvalue())
    out = "\n".join(text)
    print(out, flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    env = env_info(args)
    env["transformers"] = transformers.__version__
    env["uptime"] = _uptime()
    env["model"] = {"hidden": args.hidden, "n_layer": args.n_layer, "n_head": args.n_head, "vocab": args.vocab,
                    "capacity_factor": args.capacity, "mod_every": args.mod_every, "attn": args.attn}
    print_env(env)
    print(f"# transformers {transformers.__version__}; uptime: {env['uptime']}")
    rows = Results(args.json, env)
    dense, mod = build_models(args, dev, dt)
    env["model"]["params_dense"] = sum(p.numel() for p in dense.parameters())
    env["model"]["params_mod"] = sum(p.numel() for p in mod.parameters())
    env["model"]["mod_layers"] = mod_hf.mod_layer_indices(mod)
    profiles = []
    judged = not args.quick
    cpu = dev.type == "cpu"

    if "train" not in args.skip:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)
        dense.train()
        mod.train()
        fns = [train_fn(dense, x), train_fn(mod, x)]
        (td, tm), _ = timed_pair(fns, args.repeats, warmup=2)
        for name, t in (("dense", td), ("mod", tm)):
            row = {"kind": "train_step", "model": name, "batch": args.batch, "seq": args.seq, "step_ms": t * 1e3,
                   "tokens_per_s": args.batch * args.seq / t}
            if name == "mod":
                row["vs_dense"] = tm / td
                if judged:
                    row["target"] = f"<= {TRAIN_TARGET}x dense"
                    row["status"] = judge(row["vs_dense"], TRAIN_TARGET, False)
            rows.add(row)
            print(f"  train {name:5s} B={args.batch} T={args.seq}: {t * 1e3:9.1f} ms/step", flush=True)
        if args.profile == "always" or (args.profile == "auto" and rows[-1].get("status") == "missed"):
            profiles.append(profile_case(f"train step B={args.batch} T={args.seq}",
                                         [("dense", fns[0]), ("mod", fns[1])], dev))
        dense.zero_grad(set_to_none=True)
        mod.zero_grad(set_to_none=True)

    if "generate" not in args.skip:
        dense.eval()
        mod.eval()
        biases = predictor_biases(mod)
        for B in args.gen_batch:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, args.vocab, (B, args.prompt_len), generator=g).to(dev)
            calibrate_routing(mod, prompts, args.new_tokens, args.capacity, biases)
            recs = [{}, {}]
            fns = [generate_fn(dense, prompts, args.new_tokens, recs[0]),
                   generate_fn(mod, prompts, args.new_tokens, recs[1])]
            (td, tm), _ = timed_pair(fns, args.gen_repeats, warmup=1)
            for rec in recs:
                n = rec["sequences"].shape[1] - args.prompt_len
                if n != args.new_tokens:
                    raise SystemExit(f"generate returned {n} new tokens, expected {args.new_tokens}")
            drops = {str(i): int(d.sum()) for i, d in sorted(mod_hf.cache_drops(recs[1]["cache"]).items())}
            routed = {str(i): int(lc.kv.fill.sum()) for i, lc in enumerate(recs[1]["cache"].layers)
                      if isinstance(lc, mod_hf.MoDCacheLayer) and lc.kv is not None}
            for name, t in (("dense", td), ("mod", tm)):
                row = {"kind": "generate", "model": name, "batch": B, "prompt_len": args.prompt_len,
                       "new_tokens": args.new_tokens, "ms": t * 1e3, "tokens_per_s": B * args.new_tokens / t}
                if name == "mod":
                    row["speedup_vs_dense"] = td / tm
                    row["routed_per_layer"] = routed
                    row["drops_per_layer"] = drops
                    fed = B * (args.prompt_len + args.new_tokens - 1)  # tokens the model ran (not the last)
                    row["wanted_fraction"] = (sum(routed.values()) + sum(drops.values())) / (len(routed) * fed)
                    if judged and cpu and B == GEN_TARGET["batch"]:
                        row["target"] = f">= {GEN_TARGET['speedup']}x dense"
                        row["status"] = judge(row["speedup_vs_dense"], GEN_TARGET["speedup"], True)
                rows.add(row)
                print(f"  generate {name:5s} B={B:<3d}: {t * 1e3:9.1f} ms/call {B * args.new_tokens / t:9.1f} tokens/s"
                      + (f"  ({td / tm:.2f}x dense; routed {routed}, dropped {drops}, wanted "
                         f"{row['wanted_fraction']:.1%} of the tokens)" if name == "mod" else ""),
                      flush=True)
            if args.profile == "always" or (args.profile == "auto" and rows[-1].get("status") == "missed"):
                profiles.append(profile_case(f"generate B={B}", [("dense", fns[0]), ("mod", fns[1])], dev))

    env["uptime_end"] = _uptime()
    if profiles:
        env["profiles"] = profiles
    print(f"\nhidden={args.hidden} n_layer={args.n_layer} n_head={args.n_head} vocab={args.vocab} c={args.capacity} "
          f"every={args.mod_every} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()}; "
          f"uptime at the end: {env['uptime_end']}\n")
    print(md_table(rows, [("kind", "kind", ""), ("model", "model", ""), ("B", "batch", ""), ("T", "seq", ""),
                          ("prompt", "prompt_len", ""), ("new", "new_tokens", ""), ("ms / step", "step_ms", ".1f"),
                          ("ms / call", "ms", ".1f"), ("tokens / s", "tokens_per_s", ",.1f"),
                          ("MoD / dense time", "vs_dense", ".3f"), ("MoD speedup", "speedup_vs_dense", ".2f"),
                          ("wanted", "wanted_fraction", ".3f"), ("dropped", "drops_per_layer", ""),
                          ("target", "target", ""), ("status", "status", "")]))
    rows.save()
    return rows


def _uptime():
    try:
        with open("/proc/loadavg") as f:
            return "load average: " + ", ".join(f.read().split()[:3])
    except OSError:
        return f"load average: {os.getloadavg()}" if hasattr(os, "getloadavg") else "unknown"


if __name__ == "__main__":
    main()
