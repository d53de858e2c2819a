"""Helpers for tests/test_hf.py (mod_ext.hf on tiny Hugging Face models): tiny random
configs of every supported family, left-padded batches, the decoder layers' call
arguments, and a plain-PyTorch oracle of a routed (MoD) decoder layer and of a whole
converted model.

The oracle (docs/MOD_SPEC.md section 1; mod_ext/hf.py module docstring) is written from
the spec, not from mod_ext's code: router logits ``x @ w + b`` in float32 (float64 for
float64 x), top-k per row with valid tokens first and ties to the lower position (or the
causal rule: score > 0, first come first served, at most ``K = ceil(c *
max_position_embeddings)`` per row), the routed tokens of each row taken in position
order (one row at a time, no padding slots at all), ``f = attn(norm1(x~)) +
mlp(norm2(x~ + attn(norm1(x~))))`` from the layer's own sublayers with an explicit
additive mask (causal, sliding window in true positions) and rotary (cos, sin) from the
model's rotary embedding at the routed tokens' true positions, and ``x' = x + r * f`` on
the routed rows only. Needs transformers (import it only after ``importorskip``).
"""

from __future__ import annotations

import inspect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")
ATTN = ("sdpa", "eager")
V = 100  # vocabulary
D = 64  # hidden size
N_LAYERS = 4
MAX_POS = 128
WINDOW = 4  # sliding window of mistral / qwen2 / qwen3 (binds at the lengths used here)
PAD_ID = 0

# (norm1, attention, norm2, mlp) submodule names of a decoder layer
_LLAMA_SUB = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
SUBLAYERS = {mt: _LLAMA_SUB for mt in FAMILIES}
SUBLAYERS["gpt2"] = ("ln_1", "attn", "ln_2", "mlp")


def tiny_config(model_type: str, **overrides):
    """A tiny random config: hidden 64, 4 layers, vocab 100, 128 positions, no dropout,
    initializer_range 0.1.

    mistral: sliding_window 4 (every layer); qwen2 / qwen3: use_sliding_window with
    max_window_layers 2, so layers 2 and 3 are sliding (MoD layer 3 slides, MoD layer 1
    does not)."""
    # initializer_range 0.1 (not 0.02): attention logits of order 1, so the attention
    # pattern (masks, positions) visibly changes the outputs
    kw = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID, initializer_range=0.1)
    if model_type == "gpt2":
        kw.update(n_embd=D, n_layer=N_LAYERS, n_head=4, n_positions=MAX_POS, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)
    else:
        kw.update(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=MAX_POS, attention_dropout=0.0)
    if model_type in ("gemma", "qwen3"):
        kw.update(head_dim=16)
    if model_type == "mistral":
        kw.update(sliding_window=WINDOW)
    if model_type in ("qwen2", "qwen3"):
        kw.update(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """A tiny random causal LM of the family, in eval mode, with greedy-generation settings
    that never stop early (no EOS) and pad with PAD_ID."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation=attn)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.do_sample = False
    return model


def base_of(model):
    """The decoder stack (LlamaModel, GPT2Model, ...)."""
    return model.transformer if model.config.model_type == "gpt2" else model.model


def decoder_layers(model) -> nn.ModuleList:
    base = base_of(model)
    return base.h if model.config.model_type == "gpt2" else base.layers


def rotary_of(model):
    """The model's rotary embedding module (None for GPT-2's absolute positions)."""
    return None if model.config.model_type == "gpt2" else base_of(model).rotary_emb


def window_of(model, index: int) -> Optional[int]:
    """The sliding window of decoder layer ``index``, from the config alone."""
    cfg = model.config
    if cfg.model_type == "mistral":
        return cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        return cfg.sliding_window if cfg.layer_types[index] == "sliding_attention" else None
    return None


def mod_layers(model) -> List[Tuple[int, nn.Module]]:
    """(index, layer) of the decoder layers that have a MoD block."""
    return [(i, l) for i, l in enumerate(decoder_layers(model)) if hasattr(l, "mod")]


def randomize_mod(model, seed: int = 0, weight_std: float = 1.0, bias: float = 0.0,
                  predictor_bias: Optional[float] = None) -> None:
    """Give every router a random weight (std ``weight_std``, so routing depends on the
    data and the router weights differ from token to token) and bias ``bias``; re-seed
    the predictors, and set their last bias to ``predictor_bias`` when given (large:
    every token wants the layer in causal mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mod_layers(model):
            mod = layer.mod
            mod.router_weight.copy_(torch.randn(mod.router_weight.shape, generator=g) * weight_std)
            mod.router_bias.fill_(bias)
            if mod.predictor is not None:
                for p in mod.predictor.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                if predictor_bias is not None:
                    mod.predictor.net[2].bias.fill_(predictor_bias)


def left_padded(lengths: Sequence[int], seed: int = 0, total: Optional[int] = None):
    """(ids (B, T) int64, mask (B, T) int64, [prompt_b]) for prompts of the given lengths,
    left padded with PAD_ID to T = total or max(lengths). Token ids avoid 0..2."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (n,), generator=g) for n in lengths]
    T = total or max(lengths)
    ids = torch.full((len(lengths), T), PAD_ID, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, T - len(p):] = p
            mask[b, T - len(p):] = 1
    return ids, mask, prompts


def true_positions(mask: Tensor) -> Tensor:
    """(B, T) positions of left-padded rows as generate computes them (cumsum - 1, 0 on padding)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def layer_call(model, index: int, ids: Tensor, mask: Optional[Tensor] = None,
               position_ids: Optional[Tensor] = None) -> Dict[str, object]:
    """The arguments the model passes to decoder layer ``index`` in a no-cache forward of
    ``ids``: {"hidden_states", "attention_mask", "position_embeddings" (None for GPT-2),
    "position_ids"} (bound to the layer's signature, so GPT-2's positional mask is found)."""
    layer = decoder_layers(model)[index]
    seen = {}

    # the transformers class's own forward (not the converted subclass's, whatever it reports)
    cls = next(c for c in type(layer).__mro__ if "forward" in vars(c) and c.__module__.startswith("transformers.")
               and not c.__qualname__.startswith("mod_ext"))
    sig = inspect.signature(cls.forward)

    def hook(mod, args, kwargs):
        bound = sig.bind(mod, *args, **kwargs)
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}) or {})
        seen.update(a)

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    finally:
        h.remove()
    return {
        "hidden_states": seen["hidden_states"].detach().clone(),
        "attention_mask": seen.get("attention_mask"),
        "position_embeddings": seen.get("position_embeddings"),
        "position_ids": seen.get("position_ids"),
    }


def call_layer(layer, x: Tensor, call: Dict[str, object]) -> Tensor:
    """The converted decoder layer on ``x`` with the model's other arguments (keywords)."""
    kw = {k: v for k, v in call.items() if k != "hidden_states" and v is not None}
    return layer(x, **kw)


# --------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------


def additive_mask(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, Q, L) bool visibility -> (N, 1, Q, L) additive float mask (0 / finfo.min)."""
    m = torch.zeros(visible.shape, dtype=dtype)
    return m.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def sublayer_update(model, layer, x: Tensor, pos: Tensor, visible: Tensor) -> Tensor:
    """f(x) = a + mlp(norm2(x + a)), a = attn(norm1(x)) with the explicit mask ``visible``
    (N, Q, Q) and rotary at positions ``pos`` (N, Q) (GPT-2: no rotary)."""
    n1, at, n2, ml = SUBLAYERS[model.config.model_type]
    attn = getattr(layer, at)
    mask = additive_mask(visible, x.dtype)
    h = getattr(layer, n1)(x)
    rot = rotary_of(model)
    if rot is None:
        a = attn(h, attention_mask=mask)[0]
    else:
        cos, sin = rot(x, pos)
        a = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=mask)[0]
    return a + getattr(layer, ml)(getattr(layer, n2)(x + a))


def causal_visible(pos: Tensor, window: Optional[int]) -> Tensor:
    """(N, Q, Q) bool: key j visible to query i iff j <= i (index order = position order)
    and, with a window, pos_i - pos_j < window."""
    Q = pos.shape[1]
    ar = torch.arange(Q)
    vis = (ar[:, None] >= ar[None, :]).expand(pos.shape[0], Q, Q)
    if window is not None:
        vis = vis & ((pos[:, :, None] - pos[:, None, :]) < window)
    return vis


def oracle_logits(mod, x: Tensor) -> Tensor:
    """Router logits x @ w + b, float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc) @ mod.router_weight.to(acc) + mod.router_bias.to(acc)


def oracle_predictor(mod, x: Tensor) -> Tensor:
    """The predictor MLP on x.detach(): Linear, SiLU, Linear -> (B, T) float32."""
    l1, l2 = mod.predictor.net[0], mod.predictor.net[2]
    h = torch.nn.functional.silu(x.detach() @ l1.weight.T + l1.bias)
    return (h @ l2.weight.T + l2.bias).squeeze(-1).float()


def oracle_routed(z: Tensor, valid: Tensor, capacity: int, routing: str = "topk",
                  scores: Optional[Tensor] = None) -> List[List[int]]:
    """Per row, the positions that run the layer, ascending.

    topk: the ``min(capacity, #valid)`` valid tokens with the largest float32 logits,
    ties to the lower position. causal: valid tokens with score > 0, first come first
    served, at most ``capacity``."""
    zf = z.detach().float()
    out = []
    for b in range(z.shape[0]):
        ok = [t for t in range(z.shape[1]) if bool(valid[b, t])]
        if routing == "topk":
            ranked = sorted(ok, key=lambda t: (-float(zf[b, t]), t))
            out.append(sorted(ranked[:capacity]))
        else:
            s = scores.detach().float()
            out.append([t for t in ok if float(s[b, t]) > 0][:capacity])
    return out


def capacity(T: int, c: float) -> int:
    return min(T, max(1, math.ceil(round(c * T, 9))))


def routed_layer_oracle(model, index: int, x: Tensor, valid: Tensor, pos: Tensor, routing: str = "topk") -> Tensor:
    """Oracle of converted decoder layer ``index`` on x (B, T, D) with validity (B, T) and
    true positions (B, T): x' = x + r * f on the routed rows, the rest unchanged."""
    layer = decoder_layers(model)[index]
    mod = layer.mod
    st = model.config.mod_ext
    c = st["capacity_factor"]
    B, T, _ = x.shape
    z = oracle_logits(mod, x)
    if routing == "topk":
        routed = oracle_routed(z, valid, capacity(T, c))
    else:
        K = capacity(MAX_POS, c)
        if st["causal_router"] == "predictor":
            scores = oracle_predictor(mod, x)
        else:  # the Platt-scaled router logits (identity at init)
            from mod_ext.layer import PLATT_LR_MULT as m
            scores = (z - m * mod.aux_offset.to(z.dtype)) * (m * mod.aux_log_scale.to(z.dtype)).exp()
        routed = oracle_routed(z, valid, min(T, K), "causal", scores)
    window = window_of(model, index)
    rows, cols, vals = [], [], []
    for b, R in enumerate(routed):
        if not R:
            continue
        t = torch.tensor(R)
        xs = x[b, t][None]  # (1, C_b, D), position order
        ps = pos[b, t][None]
        f = sublayer_update(model, layer, xs, ps, causal_visible(ps, window))[0]
        zs = z[b, t]
        r = 2 * torch.sigmoid(zs) if st["router_activation"] == "scaled_sigmoid" else zs
        rows += [b] * len(R)
        cols += R
        vals.append(r[:, None] * f.to(x.dtype))
    if not vals:
        return x + 0
    delta = torch.zeros_like(x).index_put((torch.tensor(rows), torch.tensor(cols)), torch.cat(vals).to(x.dtype))
    return x + delta


def model_oracle(model, ids: Tensor, mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                 routing: str = "topk") -> Tensor:
    """Oracle logits (B, T, V) of a whole converted model: embeddings, dense layers as
    x + f(x) over all tokens (causal in index order, padding keys hidden, sliding window),
    MoD layers by :func:`routed_layer_oracle`, final norm, LM head."""
    B, T = ids.shape
    valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    pos = torch.arange(T).expand(B, T) if position_ids is None else position_ids.expand(B, T)
    base = base_of(model)
    if model.config.model_type == "gpt2":
        h = base.wte(ids) + base.wpe(pos)
    else:
        h = base.embed_tokens(ids)
    ar = torch.arange(T)
    for i, layer in enumerate(decoder_layers(model)):
        if hasattr(layer, "mod"):
            h = routed_layer_oracle(model, i, h, valid, pos, routing)
        else:
            vis = (ar[:, None] >= ar[None, :]) & (valid[:, None, :] | torch.eye(T, dtype=torch.bool))
            w = window_of(model, i)
            if w is not None:
                vis = vis & ((ar[:, None] - ar[None, :]) < w)
            h = h + sublayer_update(model, layer, h, pos, vis)
    h = base.ln_f(h) if model.config.model_type == "gpt2" else base.norm(h)
    return model.lm_head(h)


def returned_cache(out):
    """The cache of a generate / forward output (``cache`` in transformers >= 5.24, else
    ``past_key_values``)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _split_point(scores: Tensor) -> float:
    """A threshold near the median of ``scores``, in the middle of the widest gap between
    neighbouring scores of the middle half: no score lies near it, so rounding noise
    (1e-7) cannot flip a routing decision."""
    s = scores.double().sort().values
    n = len(s)
    lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    j = int(gaps.argmax()) + lo
    return float((s[j] + s[j + 1]) / 2)


def calibrate_causal(model, ids: Tensor, mask: Optional[Tensor] = None) -> None:
    """Shift each MoD layer's causal score (the predictor's output bias, or the router bias
    with causal_router="router") by a split point near its median over the valid tokens
    of (ids, mask) (:func:`_split_point`), layer by layer in order, so that about half the
    tokens want each layer in causal routing (neither "all route" nor "none routes",
    whatever the random weights) and no decision sits on the threshold."""
    valid = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    before = [layer.mod.routing for _, layer in mod_layers(model)]
    for _, layer in mod_layers(model):
        layer.mod.routing = "causal"
    try:
        for _, layer in mod_layers(model):
            seen = {}
            h = layer.mod.register_forward_hook(lambda m, a, k, o: seen.update(x=a[0]), with_kwargs=True)
            try:
                with torch.no_grad():
                    model(ids, attention_mask=mask, use_cache=False)
            finally:
                h.remove()
            mod = layer.mod
            with torch.no_grad():
                if mod.predictor is not None:
                    s = oracle_predictor(mod, seen["x"])[valid]
                    mod.predictor.net[2].bias.sub_(_split_point(s))
                else:
                    s = oracle_logits(mod, seen["x"])[valid]
                    mod.router_bias.sub_(_split_point(s))
    finally:
        for (_, layer), r in zip(mod_layers(model), before):
            layer.mod.routing = r
