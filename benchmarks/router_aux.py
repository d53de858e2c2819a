"""Router aux loss variants: Platt scaling and the hidden states' share of its gradient
(the measurement behind benchmarks/RESULTS.md, "Router aux loss: Platt scaling and the
hidden states' share").

    python benchmarks/router_aux.py --variant lib --aux 0.1 --lam 0.3   # mod_ext's own (default) aux loss
    python benchmarks/router_aux.py --variant full --aux 0.1            # the paper's BCE on the router logits
    python benchmarks/router_aux.py --variant affine_mix --aux 0.1 --lam 0.3

Trains the demo's MoD model with causal_router="router" (d_model 128, 6 layers, 16 x 256
tokens per step, c = 0.125 every other layer, the dense model's FLOPs for 160 steps), one
seed, with the aux loss computed here by forward hooks (variants full, detach, offset,
affine, *_detach, affine_mix: BCE of alpha * (z - beta) on the router logits z, alpha and
beta learned by their own Adam at lr 1e-2, the hidden states' gradient scaled by --lam) or,
with --variant lib*, by the model itself (ModelConfig.router_aux_grad_scale = --lam). Then
calibrates the causal thresholds on 8 training batches and reports the top-k and causal
validation loss and routing_metrics on 16 held-out batches; writes
/tmp/mod_ext_router_aux/<variant>_<aux>_<seed>_<lam>.json.
"""
import argparse, sys, time, json
import torch, torch.nn as nn, torch.nn.functional as F
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mod_ext.data import BatchSampler, get_batch, load_corpus
from mod_ext.models import ModelConfig, MoDTransformer, dense_config
from mod_ext.layer import topk_targets, _router_logits
from mod_ext.train import lr_at, make_optimizer
from mod_ext.demo import causal_routing_metrics, evaluate
ap = argparse.ArgumentParser()
ap.add_argument("--variant", default="full")
ap.add_argument("--aux", type=float, default=0.1)
ap.add_argument("--seed", type=int, default=1337)
ap.add_argument("--lam", type=float, default=1.0)
ap.add_argument("--platt-mult", type=float, default=None, help="override mod_ext.layer.PLATT_LR_MULT")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
import mod_ext.layer  # noqa: E402
if a.platt_mult is not None:
    mod_ext.layer.PLATT_LR_MULT = a.platt_mult
corpus = load_corpus(None, None)
B, T, c = 16, 256, 0.125
cfg = ModelConfig(vocab_size=corpus.vocab_size, block_size=T, n_layer=6, n_head=4, d_model=128,
                  capacity_factor=c, mod_every=2, causal_router="router", aux_loss_weight=a.aux if a.variant.startswith("lib") else 0.0, router_aux_grad_scale=a.lam)
fd = MoDTransformer(dense_config(cfg)).flops_per_token(T)
torch.manual_seed(a.seed)
model = MoDTransformer(cfg)
steps = round(160 * fd / model.flops_per_token(T))
mods = model.mod_layers
beta = nn.Parameter(torch.zeros(len(mods))); loga = nn.Parameter(torch.zeros(len(mods)))
cap = {}
def hook(i):
    def h(mod, args, kwargs, out): cap[i] = (args[0], out.routing.router_logits, out.routing.indices)
    return h
for i, m in enumerate(mods): m.register_forward_hook(hook(i), with_kwargs=True)
opt = make_optimizer(model, 2e-3)
extra = torch.optim.Adam([beta, loga], lr=1e-2)
sampler = BatchSampler(corpus.train, B, T, seed=a.seed)
v = a.variant
def aux_loss():
    tot = 0
    for i, m in enumerate(mods):
        x, z, idx = cap[i]
        if "detach" in v: z = _router_logits(x.detach(), m.router_weight, m.router_bias)
        if "mix" in v: z = _router_logits(a.lam * x + (1 - a.lam) * x.detach(), m.router_weight, m.router_bias)
        if "offset" in v or "affine" in v: z = z - beta[i]
        if "affine" in v: z = z * loga[i].exp()
        tot = tot + F.binary_cross_entropy_with_logits(z, topk_targets(z, idx))
    return tot
t0 = time.time()
for step in range(steps):
    x, y = next(sampler)
    for g in opt.param_groups: g["lr"] = lr_at(step, steps, 2e-3)
    out = model(x, y)
    aux = aux_loss()
    loss = out.loss if v.startswith("lib") else out.lm_loss + a.aux * aux
    opt.zero_grad(set_to_none=True); extra.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); extra.step()
    if step % 70 == 0: print(step, round(out.lm_loss.item(), 4), round(aux.item(), 4), f"{time.time()-t0:.0f}s", flush=True)
g = torch.Generator().manual_seed(99)
trb = [get_batch(corpus.train, B, T, g)[:, :-1] for _ in range(8)]
g = torch.Generator().manual_seed(a.seed + 1)
val = []
for _ in range(16):
    w = get_batch(corpus.val, B, T, g); val.append((w[:, :-1], w[:, 1:]))
# platt: the effective (alpha, beta) of each MoD layer
res = dict(platt_mult=a.platt_mult, platt=[((mod_ext.layer.PLATT_LR_MULT * m.aux_log_scale).exp().item(), mod_ext.layer.PLATT_LR_MULT * m.aux_offset.item()) for m in mods], lam=a.lam, variant=v, aux=a.aux, seed=a.seed, steps=steps, beta=beta.tolist(), alpha=loga.exp().tolist())
res["topk"] = evaluate(model, val, "topk")
if "offset" in v or "affine" in v:
    for i, m in enumerate(mods): m.causal_threshold.fill_(float(beta[i]))
    res["causal_learned_thr"] = evaluate(model, val, "causal")
    res["m_learned"] = causal_routing_metrics(model, val)["causal_routing"]
thr = model.calibrate_causal_routing(trb)
res["thr_cal"] = thr
res["causal_cal"] = evaluate(model, val, "causal")
res["m_cal"] = causal_routing_metrics(model, val)
res["time"] = time.time() - t0
print(json.dumps(res, indent=1, default=str)[:3000])
Path("/tmp/mod_ext_router_aux").mkdir(exist_ok=True)
json.dump(res, open(f"/tmp/mod_ext_router_aux/{v}_{a.aux}_{a.seed}_{a.lam}_{a.platt_mult}.json", "w"), default=str)
