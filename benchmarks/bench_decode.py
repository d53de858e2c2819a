"""Benchmark KV-cache decoding: one decode step of the MoD model against the same-size
dense model (mod_ext.models), with and without CUDA graphs, and the KV-cache bytes per
sequence.

    python benchmarks/bench_decode.py --quick                       # CPU smoke run, < 1 minute
    python benchmarks/bench_decode.py --json out/decode_cpu.json    # CPU, width 512, 8 layers
    python benchmarks/bench_decode.py --device cuda --json out/decode_cuda.json  # width 2048, 16 layers, bf16

What is timed: ``MoDTransformer.decode_step`` (embedding -> logits for B new tokens) on a
cache of ``context`` columns, eagerly and (CUDA) as a replayed CUDA graph; the median over
``--repeats`` rounds, dense and MoD timed in turn. Both models are built once with
block_size = the longest context; each cache gets max_len = context and
``cache_capacity_factor = c``, i.e. ``capacity_for(context, c)`` MoD cache slots, as a
model with block_size = context has by default. On the static decode path every dense
layer attends over all ``context`` columns of its cache (masked) and every MoD layer runs
its block on ``decode_capacity`` rows, whatever was routed or filled, so the caches are
filled with random keys and values (MoD fill counts at half their limit) instead of
prefilling B x context tokens. The dynamic path (``--path``; CPU default) runs a MoD block
on the routed rows only: for it each predictor is shifted to route about a fraction c of
tokens (``calibrate_routing``) and every step feeds new random tokens.
tokens/s = B / time per step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, Results, add_common_args, env_info, interleaved_medians, judge, md_table,  # noqa: E402
                    print_env, setup)

from mod_ext.generation import DecodeGraph  # noqa: E402
from mod_ext.kv_cache import MoDLayerCache  # noqa: E402
from mod_ext.models import ModelConfig, MoDTransformer, dense_config  # noqa: E402

# Targets of issue 4: CPU: MoD not slower than dense at B = 8; GPU (bf16, width 2048, 16
# layers): MoD >= 1.5x dense with CUDA graphs at B = 64, context 2048; a MoD layer's cache
# <= 0.3x a dense layer's.
CPU_TARGET = {"batch": 8, "speedup": 1.0}
GPU_TARGET = {"batch": 64, "context": 2048, "speedup": 1.5}
CACHE_RATIO_TARGET = 0.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8,64; quick 1,8)")
    p.add_argument("--context", default=None,
                   help="comma-separated cache lengths (default CPU 256,1024,2048; GPU 256,1024,2048,4096; quick 256)")
    p.add_argument("--d-model", type=int, default=None, help="width (default CPU 512, GPU 2048, quick 128)")
    p.add_argument("--n-layer", type=int, default=None, help="layers (default CPU 8, GPU 16, quick 4)")
    p.add_argument("--n-head", type=int, default=None, help="heads (default d_model / 64)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256, byte-level)")
    p.add_argument("--capacity", type=float, default=0.125, help="MoD capacity factor (default 0.125)")
    p.add_argument("--mod-every", type=int, default=2, help="every n-th layer is MoD (default 2)")
    p.add_argument("--cuda-graph", choices=["both", "on", "off"], default="both",
                   help="CUDA only: time eager steps, graph replays, or both (default both)")
    p.add_argument("--path", default=None,
                   help="MoD decode paths, comma-separated: static (sync-free, CUDA-graph capturable) and/or "
                        "dynamic (eager; the block runs on routed rows only). Default: CPU static,dynamic; CUDA static")
    args = p.parse_args(argv)
    if args.compile:
        p.error("--compile: bench_decode does not time torch.compile; its compiled form is the CUDA-graph "
                "replay (--cuda-graph, CUDA only)")
    args.compile = False
    setup(args)
    gpu = args.gpu_shapes
    args.batch = [int(b) for b in (args.batch or ("1,8" if args.quick else "1,8,64")).split(",")]
    args.context = [int(c) for c in (args.context or ("256" if args.quick else
                                                      "256,1024,2048,4096" if gpu else "256,1024,2048")).split(",")]
    args.d_model = args.d_model or (128 if args.quick else 2048 if gpu else 512)
    args.n_layer = args.n_layer or (4 if args.quick else 16 if gpu else 8)
    args.n_head = args.n_head or max(1, args.d_model // 64)
    args.path = (args.path or ("static" if args.device == "cuda" else "static,dynamic")).split(",")
    if not set(args.path) <= {"static", "dynamic"}:
        p.error(f"--path: static and/or dynamic, got {args.path}")
    return args


def calibrate_routing(model, capacity_factor, context, batch=64, steps=8):
    """Shift each MoD layer's predictor bias so that about a fraction c of tokens want the
    layer (score > 0), as with a trained predictor (the demo's route 12-16%); a random
    predictor would route about half. Only the dynamic path's time depends on it."""
    device = model.wte.weight.device
    for i, layer in enumerate(model.mod_layers):  # in depth order: later layers see the shifted earlier ones
        seen = []
        hook = layer.predictor.register_forward_hook(lambda mod, a, out: seen.append(out.detach().float().flatten()))
        cache = model.allocate_cache(batch, context, cache_capacity_factor=capacity_factor, static=True)
        synthetic_state(cache)
        tokens = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
        with torch.no_grad():
            for _ in range(steps):
                model.decode_step(tokens, cache)
                tokens = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
        hook.remove()
        q = torch.quantile(torch.cat(seen), 1 - capacity_factor)
        with torch.no_grad():
            layer.predictor.net[2].bias -= q.to(layer.predictor.net[2].bias.dtype)


def synthetic_state(cache):
    """Random keys/values everywhere, every column valid, MoD caches half full, one
    column written (the step's cost does not depend on any of it; see the module doc)."""
    for lc in cache.layers:
        lc.k.normal_()
        lc.v.normal_()
        if isinstance(lc, MoDLayerCache):
            lc.fill.fill_(lc.limit // 2)
    cache.key_valid.fill_(True)
    cache.col.fill_(1)
    cache.pos.fill_(1)
    cache.active.fill_(True)
    cache.n_written = 1


def step_fn(model, cache, graph):
    """One decode step (eager or graph replay); rewinds the write column before the cache
    would overflow (a few tiny ops once per max_len steps)."""
    # Different random tokens every step (cycled from a table), so routing decisions vary
    # as in real decoding; with one fixed token a B = 1 row would route always or never.
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, model.cfg.vocab_size, (64, cache.batch), generator=g).to(cache.device)
    step = graph.step if graph is not None else (lambda t: model.decode_step(t, cache))
    fills = [lc.fill.clone() for lc in cache.mod_layers]
    calls = [0]

    def fn():
        if cache.n_written >= cache.max_len - 1:
            cache.col.fill_(1)
            cache.pos.fill_(1)
            for lc, f in zip(cache.mod_layers, fills):
                lc.fill.copy_(f)
            cache.n_written = 1
        calls[0] += 1
        return step(table[calls[0] % 64])

    return fn


def main(argv=None):
    args = parse_args(argv)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    env = env_info(args)
    env["model"] = {"d_model": args.d_model, "n_layer": args.n_layer, "n_head": args.n_head,
                    "vocab": args.vocab, "capacity_factor": args.capacity, "mod_every": args.mod_every}
    print_env(env)
    graph_modes = [False] if dev.type != "cuda" else {"both": [False, True], "on": [True], "off": [False]}[args.cuda_graph]
    rows = Results(args.json, env)
    # One pair of models for every context (block_size = the longest; each cache has
    # max_len = its context), built directly on the device.
    mod_cfg = ModelConfig(vocab_size=args.vocab, block_size=max(args.context), n_layer=args.n_layer,
                          n_head=args.n_head, d_model=args.d_model, capacity_factor=args.capacity,
                          mod_every=args.mod_every)
    models = {}
    for name, cfg in [("dense", dense_config(mod_cfg)), ("mod", mod_cfg)]:
        torch.manual_seed(0)
        with dev:
            models[name] = MoDTransformer(cfg).to(dtype=dt).eval()
    calibrate_routing(models["mod"], args.capacity, context=min(args.context))
    for context in args.context:
        for batch in args.batch:
            for cuda_graph in graph_modes:
                # (model, path): the dense model has one path; graphs need the static one.
                variants = [("dense", "static")] + [("mod", p) for p in args.path if not (cuda_graph and p == "dynamic")]
                caches, fns = {}, []
                for name, path in variants:
                    model = models[name]
                    # capacity_for(context, c) MoD slots, as a model with block_size = context has.
                    cache = caches[(name, path)] = model.allocate_cache(
                        batch, context, cache_capacity_factor=args.capacity, static=path == "static")
                    graph = DecodeGraph(model, cache) if cuda_graph else None
                    synthetic_state(cache)
                    fns.append(step_fn(model, cache, graph))
                with torch.no_grad():
                    times = dict(zip(variants, interleaved_medians(fns, args.repeats, block_s=0.05, warmup=3)))
                for (name, path), cache in caches.items():
                    t = times[(name, path)]
                    layer_bytes = cache.layer_bytes_per_seq()
                    dense_b = [n for n, lc in zip(layer_bytes, cache.layers) if not isinstance(lc, MoDLayerCache)]
                    mod_b = [n for n, lc in zip(layer_bytes, cache.layers) if isinstance(lc, MoDLayerCache)]
                    row = {"model": name, "path": path if name == "mod" else "-", "batch": batch, "context": context,
                           "cuda_graph": cuda_graph, "step_ms": t * 1e3, "tokens_per_s": batch / t,
                           "cache_bytes_per_seq": cache.bytes_per_seq(),
                           "decode_capacity": cache.decode_capacity if mod_b else None,
                           "cache_slots": cache.slots if mod_b else None}
                    if mod_b and dense_b:
                        row["mod_layer_cache_ratio"] = max(mod_b) / min(dense_b)
                        row["cache_ratio_status"] = judge(row["mod_layer_cache_ratio"], CACHE_RATIO_TARGET, False)
                    if name == "mod":
                        row["speedup_vs_dense"] = times[("dense", "static")] / t
                        tgt = None
                        if dev.type == "cpu" and batch == CPU_TARGET["batch"]:
                            tgt = CPU_TARGET["speedup"]
                        elif (dev.type == "cuda" and cuda_graph and batch == GPU_TARGET["batch"]
                              and context == GPU_TARGET["context"]):
                            tgt = GPU_TARGET["speedup"]
                        if tgt is not None and not args.quick:  # targets are judged at the default shapes
                            row["target"] = f">= {tgt}x dense"
                            row["status"] = judge(row["speedup_vs_dense"], tgt, True)
                    rows.add(row)
                    print(f"  {name:5s} {row['path']:7s} B={batch:<3d} context={context:<5d} graph={int(cuda_graph)}: "
                          f"{t * 1e3:8.3f} ms/step {batch / t:10.1f} tokens/s  cache "
                          f"{row['cache_bytes_per_seq'] / 2**20:.2f} MiB/seq", flush=True)
                del caches, fns
                if dev.type == "cuda":
                    torch.cuda.empty_cache()

    print(f"\nd_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} vocab={args.vocab} "
          f"c={args.capacity} dtype={args.dtype} device={args.device}\n")
    print(_table(rows))
    rows.save()


def _table(rows):
    shown = [dict(r, cache_mib=r["cache_bytes_per_seq"] / 2**20) for r in rows]  # rows (the JSON) untouched
    return md_table(shown, [("model", "model", ""), ("path", "path", ""), ("B", "batch", ""), ("context", "context", ""),
                          ("CUDA graph", "cuda_graph", ""), ("ms / step", "step_ms", ".3f"),
                          ("tokens / s", "tokens_per_s", ",.1f"), ("MoD speedup", "speedup_vs_dense", ".2f"),
                          ("cache MiB / seq", "cache_mib", ".2f"),
                          ("MoD layer / dense layer cache", "mod_layer_cache_ratio", ".3f"),
                          ("decode capacity", "decode_capacity", ""), ("target", "target", ""),
                          ("status", "status", "")])


if __name__ == "__main__":
    main()
