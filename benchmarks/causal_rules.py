"""Which causal rule finds the top-k tokens? (the measurement behind benchmarks/RESULTS.md,
"Causal routing: which rule finds the top-k tokens")

    python benchmarks/causal_rules.py                          # predictor model, demo budget (~2 min)
    python benchmarks/causal_rules.py --causal-router router --aux 0.1   # router aux loss instead
    python benchmarks/causal_rules.py --steps 560              # twice the budget

Trains the demo's MoD model (d_model 128, 6 layers, 16 x 256 tokens per step, c = 0.125
every other layer, the dense model's FLOPs for 160 steps) once, with extra stop-gradient
causal rules attached to every MoD layer by forward hooks (each trained by its own Adam on
the layer's detached input and top-k targets, so none of them touches the language model),
then compares each rule's causal routing decisions (capped at the causal capacity, first
come first served) with top-k on 16 held-out batches, at threshold 0 and at a threshold
calibrated on 8 training batches to route the capacity factor. The rules: the model's own
predictor (or, with --causal-router router, its router), the router logits, MLP predictors
with their own learning rate, class-balanced BCE (pos_weight (1-c)/c), a wider MLP, a
linear predictor, a causal 4-token window, the router logit as an extra input, the router
logit plus a learned correction, and the router logit with its prefix mean/std (causal,
but needs per-sequence state at decode time). Prints validation loss with top-k and with
causal routing by some of the rules. The model's own training clips all its gradients
together (as measured for RESULTS.md; mod_ext.train and the demo now clip the predictor
apart).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mod_ext.data import BatchSampler, get_batch, load_corpus  # noqa: E402
from mod_ext.models import ModelConfig, MoDTransformer, dense_config  # noqa: E402
from mod_ext.layer import topk_targets  # noqa: E402
from mod_ext.ops import threshold_route  # noqa: E402
from mod_ext.train import lr_at, make_optimizer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--causal-router", default="predictor")
ap.add_argument("--steps", type=int, default=0)
ap.add_argument("--aux", type=float, default=0.1)
ap.add_argument("--seed", type=int, default=1337)
ap.add_argument("--act", default="sigmoid")
a = ap.parse_args()
torch.set_num_threads(2)
corpus = load_corpus(None, None)
B, T, c = 16, 256, 0.125
cfg = ModelConfig(vocab_size=corpus.vocab_size, block_size=T, n_layer=6, n_head=4, d_model=128,
                  capacity_factor=c, mod_every=2, causal_router=a.causal_router, aux_loss_weight=a.aux,
                  router_activation=a.act)
fd = MoDTransformer(dense_config(cfg)).flops_per_token(T)
torch.manual_seed(a.seed)
model = MoDTransformer(cfg)
steps = a.steps or round(160 * fd / model.flops_per_token(T))
print("steps", steps)
D = 128

class Ctx(nn.Module):  # causal: x_t, x_{t-1}, ..., x_{t-w+1}
    def __init__(s, w=4, h=32):
        super().__init__(); s.w = w; s.net = nn.Sequential(nn.Linear(w * D, h), nn.SiLU(), nn.Linear(h, 1))
    def forward(s, x, z):
        xs = [x] + [F.pad(x, (0, 0, j, 0))[:, :-j] for j in range(1, s.w)]
        return s.net(torch.cat(xs, -1)).squeeze(-1)
class Mlp(nn.Module):
    def __init__(s, h=32, withz=False):
        super().__init__(); s.withz = withz; s.net = nn.Sequential(nn.Linear(D + withz, h), nn.SiLU(), nn.Linear(h, 1))
    def forward(s, x, z):
        if s.withz: x = torch.cat([x, z[..., None]], -1)
        return s.net(x).squeeze(-1)
class Lin(nn.Module):
    def __init__(s):
        super().__init__(); s.l = nn.Linear(D, 1)
    def forward(s, x, z): return s.l(x).squeeze(-1)
class ZStats(nn.Module):  # router logit and prefix statistics of the router logits
    def __init__(s):
        super().__init__(); s.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
    def forward(s, x, z):
        n = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)
        m = z.cumsum(1) / n
        v = ((z * z).cumsum(1) / n - m * m).clamp_min(0).sqrt()
        return s.net(torch.stack([z, m, v, (torch.log(n) / math.log(T)).expand_as(z)], -1)).squeeze(-1)

class ZRes(nn.Module):  # the router logit plus a learned correction (starts as the router's rule)
    def __init__(s, h=32):
        super().__init__(); s.a = nn.Parameter(torch.ones(1)); s.b = nn.Parameter(torch.zeros(1))
        s.net = nn.Sequential(nn.Linear(D, h), nn.SiLU(), nn.Linear(h, 1)); nn.init.zeros_(s.net[2].weight)
    def forward(s, x, z): return s.a * z + s.b + s.net(x).squeeze(-1)
variants = {  # name -> (factory, lr, pos_weight)
    "zres": (lambda: ZRes(), 3e-3, None),
    "zres_bal": (lambda: ZRes(), 3e-3, (1 - c) / c),
    "mlp_lr3e-3": (lambda: Mlp(), 3e-3, None),
    "mlp_lr1e-2": (lambda: Mlp(), 1e-2, None),
    "mlp_bal": (lambda: Mlp(), 3e-3, (1 - c) / c),
    "mlp_h128": (lambda: Mlp(128), 3e-3, None),
    "lin": (lambda: Lin(), 3e-3, None),
    "ctx4": (lambda: Ctx(4), 3e-3, None),
    "mlp_z": (lambda: Mlp(32, True), 3e-3, None),
    "zstats": (lambda: ZStats(), 3e-3, None),
}
mods = model.mod_layers
extra = {name: nn.ModuleList([f() for _ in mods]) for name, (f, _, _) in variants.items()}
opts = {name: torch.optim.Adam(extra[name].parameters(), lr=variants[name][1]) for name in variants}
captured = {}
def hook(i):
    def h(mod, args, kwargs, out):
        captured[i] = (args[0].detach(), out.routing.router_logits.detach(), out.routing.indices, out.causal_scores)
    return h
for i, m in enumerate(mods):
    m.register_forward_hook(hook(i), with_kwargs=True)

opt = make_optimizer(model, 2e-3)
sampler = BatchSampler(corpus.train, B, T, seed=a.seed)
t0 = time.time()
for step in range(steps):
    x, y = next(sampler)
    for g in opt.param_groups: g["lr"] = lr_at(step, steps, 2e-3)
    out = model(x, y)
    opt.zero_grad(set_to_none=True); out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    for name, (_, lr, pw) in variants.items():
        loss = 0
        for i in range(len(mods)):
            h, z, idx, _ = captured[i]
            s = extra[name][i](h, z)
            tgt = topk_targets(s, idx)
            loss = loss + F.binary_cross_entropy_with_logits(s, tgt, pos_weight=None if pw is None else torch.tensor(pw))
        opts[name].zero_grad(); loss.backward(); opts[name].step()
    if step % 40 == 0: print(step, out.lm_loss.item(), out.aux_loss.item(), f"{time.time()-t0:.0f}s", flush=True)

@torch.no_grad()
def collect(data, nb, seed):
    g = torch.Generator().manual_seed(seed)
    res = []
    model.eval()
    for _ in range(nb):
        w = get_batch(data, B, T, g); x = w[:, :-1]
        model(x)
        rows = []
        for i in range(len(mods)):
            h, z, idx, own = captured[i]
            sc = {"own": own.float(), "router": z.float()}
            for name in variants: sc[name] = extra[name][i](h, z).float()
            rows.append((idx, sc))
        res.append(rows)
    return res
train_set = collect(corpus.train, 8, 99)
val_set = collect(corpus.val, 16, a.seed + 1)
K = mods[0].causal_capacity(T)
names = ["own", "router"] + list(variants)
print(f"{'rule':>12} {'tau':>7} | acc_unc  acc_cap  recall  prec  frac  (per layer recall)")
summary = {}
for name in names:
    for cal in (False, True):
        taus = []
        for li in range(len(mods)):
            if cal:
                allv = torch.cat([r[li][1][name].flatten() for r in train_set])
                taus.append(torch.quantile(allv, 1 - c).item())
            else:
                taus.append(0.0)
        accu, accc, rec, prec, frac, lrec = [], [], [], [], [], []
        for li in range(len(mods)):
            a_u = a_c = hits = pos = routed = 0; n = 0
            for r in val_set:
                idx, sc = r[li]
                s = sc[name] - taus[li]
                tgt = topk_targets(s, idx) > 0.5
                ci, cm = threshold_route(s, K)
                caus = torch.zeros_like(tgt).scatter(1, ci, cm)
                a_u += ((s > 0) == tgt).sum().item(); a_c += (caus == tgt).sum().item()
                hits += (caus & tgt).sum().item(); pos += tgt.sum().item(); routed += caus.sum().item(); n += tgt.numel()
            accu.append(a_u / n); accc.append(a_c / n); rec.append(hits / pos); prec.append(hits / max(1, routed)); frac.append(routed / n)
        mean = lambda v: sum(v) / len(v)
        print(f"{name:>12} {('cal' if cal else '0'):>7} | {mean(accu):.4f}  {mean(accc):.4f}  {mean(rec):.4f}  {mean(prec):.3f} {mean(frac):.4f}  {[round(v,3) for v in rec]}")
        summary[f"{name}/{'cal' if cal else '0'}"] = dict(acc_cap=mean(accc), recall=mean(rec), frac=mean(frac))
print("train time", time.time() - t0)

# ---- validation loss under several causal rules
@torch.no_grad()
def val_loss(routing):
    g = torch.Generator().manual_seed(a.seed + 1); tot = 0
    for _ in range(16):
        w = get_batch(corpus.val, B, T, g)
        tot += model(w[:, :-1], w[:, 1:], routing=routing).lm_loss.item()
    return tot / 16
print("val topk", round(val_loss("topk"), 4), "causal(own)", round(val_loss("causal"), 4))
if cfg.causal_router == "predictor":
    for rule in ("router", "zstats", "zres", "zres_bal"):
        saved = []
        for li, m in enumerate(mods):
            allv = torch.cat([r[li][1][rule].flatten() for r in train_set])
            tau = torch.quantile(allv, 1 - c).item()
            def fwd(x, m=m, tau=tau, li=li, rule=rule):
                z = (x.float() @ m.router_weight.float() + m.router_bias.float())
                if rule == "router": return z - tau
                return extra[rule][li](x.detach(), z).float() - tau
            saved.append(m.predictor.forward); m.predictor.forward = fwd
        print(f"causal({rule}, cal)", round(val_loss("causal"), 4))
        for m, f in zip(mods, saved): m.predictor.forward = f
