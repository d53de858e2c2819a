"""Hugging Face transformers integration: turn a causal LM into a Mixture-of-Depths model in one call.

::

    from transformers import AutoModelForCausalLM
    import mod_ext.hf

    model = AutoModelForCausalLM.from_pretrained(path)          # or .from_config(cfg)
    mod_ext.hf.convert(model, capacity_factor=0.125, every=2)    # in place; returns model
    out = model(input_ids, attention_mask=mask, labels=labels)   # top-k routing
    out.loss                 # LM loss + aux_loss_weight * the MoD layers' aux losses
    mod_ext.hf.aux_loss(model)                                   # that aux part, last forward
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64)  # causal routing, MoD cache
    model.save_pretrained(d); m2 = mod_ext.hf.from_pretrained(d)

What :func:`convert` does (docs/MOD_SPEC.md; Raposo et al. 2024, arXiv 2404.02258, Sections
3.1-3.5 and 5):

* **Which layers.** Decoder layer i becomes a MoD layer when ``i % every == every - 1``
  (layers 1, 3, 5, ... for every=2, the paper's "every other layer"), or exactly the
  indices in ``layers``.
* **Each MoD layer** keeps its own modules and parameters (its state-dict keys do not
  change) and gains ``mod``, a :class:`mod_ext.MoDBlock` that owns the router
  (``mod.router_weight`` (D,), ``mod.router_bias`` (1,)) and the predictor. Its forward is
  ``x' = x + r * f(x~)`` on the routed tokens, with ``f`` the layer's update computed
  from its own sublayers (attention output + MLP output, never ``layer(x~) - x~``), the
  routing done by mod_ext's ops. The layer instance keeps its class (a subclass is
  swapped in), so Hugging Face's output recording, gradient checkpointing and
  ``_no_split_modules`` see the same layer.
* **Positions and masks.** Rotary ``(cos, sin)`` and ``position_ids`` are gathered at
  the routed tokens' true positions (left padding included); GPT-2's absolute positions
  are already in the hidden state. Attention among the routed tokens is causal in
  position order, never sees padding, and for sliding-window layers (Mistral; Qwen2/3
  with sliding layers) keeps the window in true positions. Padding tokens (read off the
  attention mask the model passes to the layer) are never routed while valid tokens
  remain.
* **Router weight and initialisation.** ``router_activation="scaled_sigmoid"`` (default)
  weights the update by ``r = 2 * sigmoid(z)`` with the router initialised to zero, so
  ``r = 1`` at conversion: ``convert(model, capacity_factor=1.0)`` leaves the model's
  logits unchanged, and at c < 1 a converted layer applies the pretrained update
  unscaled to the tokens it routes. The router still gets a gradient (``dr/dz = 0.5`` at
  0). ``"identity"`` (the paper's raw ``r = z``) starts from ``router_bias = 1`` for the
  same reason. (A plain sigmoid would halve every update at initialisation, so it is
  not offered here.) While the router is zero all logits tie and top-k takes the first
  tokens of each row; training separates them.
* **Causal routing.** Top-k over a sequence sees the future, so sampling routes causally:
  a token runs the layer when its predictor logit (``causal_router="predictor"``) or
  its router logit (``"router"``) is > 0, first come first served, at most the causal
  capacity ``K = capacity_for(config.max_position_embeddings, c)`` tokens per sequence
  (fixed by the model's maximum length, so a prefix routes exactly as inside a longer
  input). ``forward`` routes top-k unless :func:`set_routing` says "causal";
  ``generate`` always routes causally.
* **Aux loss.** In top-k mode each MoD layer's aux loss trains causal routing: the BCE of
  the predictor logits (or the router logits) against the layer's top-k membership.
  The forward adds ``aux_loss_weight * sum`` to ``out.loss`` when labels are given, so
  ``transformers.Trainer`` trains the predictor with no code change (with
  ``num_items_in_batch``, which Trainer passes under gradient accumulation, the aux is
  weighed by this micro-batch's share of the step's label tokens, as the LM loss is). It reads the
  layer's input with a stop-gradient, so it is exact under both activation-checkpointing
  modes (with ``causal_router="router"`` it trains the router parameters only).
* **Generation cache.** ``generate`` (and ``model(..., use_cache=True)``) build
  transformers' own ``DynamicCache``; a MoD layer puts a :class:`MoDCacheLayer` at its
  index the first time it sees the cache, which holds only the tokens the layer routed,
  per sequence (a :class:`mod_ext.kv_cache.MoDLayerCache`, driven by
  :meth:`mod_ext.MoDBlock.prefill` / :meth:`mod_ext.MoDBlock.decode`: the same cache
  logic as the reference model). Dense layers keep transformers' layers. In a decode
  step the new tokens that want a MoD layer compete by top-k over the batch for
  ``decode_capacity`` block slots (default :func:`mod_ext.default_decode_capacity`); the
  others are dropped and counted (:func:`cache_drops`). Pass ``cache=MoDCache(model,
  decode_capacity=B)`` to ``generate`` (``past_key_values=`` before transformers 5.24)
  to never drop.

Supported: Llama, Mistral, Qwen2, Qwen3, Gemma and GPT-2 (``SUPPORTED_MODEL_TYPES``),
transformers >= 5.0 (the cache keyword ``past_key_values`` became ``cache`` in 5.24: both
are accepted), attention implementations "eager" and "sdpa". Not supported (clear
errors): ``output_attentions=True``, static caches, cache cropping (assisted decoding),
cross-attention, flash/flex attention.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mod_ext.hf needs Hugging Face transformers >= 5.0: pip install 'mod_ext[hf]' "
        "(or pip install 'transformers>=5.0')"
    ) from e

from .kv_cache import MoDLayerCache
from .layer import ROUTING_MODES, MoDBlock, router_aux_loss

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ROUTER_ACTIVATIONS",
    "convert",
    "is_converted",
    "mod_layer_indices",
    "set_routing",
    "aux_loss",
    "router_parameters",
    "from_pretrained",
    "MoDCacheLayer",
    "MoDCache",
    "cache_drops",
]

_TF_MAJOR = int(transformers.__version__.split(".")[0])
if _TF_MAJOR < 5:  # pragma: no cover
    raise ImportError(f"mod_ext.hf needs transformers >= 5.0, found {transformers.__version__}")

#: router weights convert offers (see the module docstring: both are 1 at initialisation)
ROUTER_ACTIVATIONS = ("scaled_sigmoid", "identity")
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_CONFIG_KEY = "mod_ext"  # model.config.mod_ext: the MoD settings, saved with the model
_AUX_KWARG = "mod_ext_aux"  # the per-forward collector the MoD layers report to


@dataclass(frozen=True)
class _Family:
    layers: str  # the decoder-layer ModuleList on the base model
    norm1: str
    attn: str
    norm2: str
    mlp: str
    rotary: bool
    window: str  # "none", "config" (config.sliding_window for every layer), "attn" (attn.sliding_window)


_LLAMA_LIKE = dict(layers="layers", norm1="input_layernorm", attn="self_attn", norm2="post_attention_layernorm",
                   mlp="mlp", rotary=True)
_FAMILIES: Dict[str, _Family] = {
    "llama": _Family(**_LLAMA_LIKE, window="none"),
    "mistral": _Family(**_LLAMA_LIKE, window="config"),
    "qwen2": _Family(**_LLAMA_LIKE, window="attn"),
    "qwen3": _Family(**_LLAMA_LIKE, window="attn"),
    "gemma": _Family(**_LLAMA_LIKE, window="none"),
    "gpt2": _Family(layers="h", norm1="ln_1", attn="attn", norm2="ln_2", mlp="mlp", rotary=False, window="none"),
}
#: model_type values convert accepts
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# The aux loss of each converted model's last forward (weakly keyed: nothing is stored on the model).
_LAST_AUX: "weakref.WeakKeyDictionary[nn.Module, Optional[Tensor]]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------ helpers


def _family(model) -> _Family:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in _FAMILIES:
        raise ValueError(
            f"mod_ext.hf.convert: model_type {mt!r} ({type(model).__name__}) is not supported; supported "
            f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _FAMILIES[mt]


def _decoder_layers(model, fam: _Family) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, fam.layers, None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"mod_ext.hf.convert: {type(model).__name__} has no decoder layers at base_model.{fam.layers}; "
            "pass a causal LM (AutoModelForCausalLM) of a supported family"
        )
    return layers


def _find_converted(model) -> nn.Module:
    """The converted causal LM inside ``model`` (itself, or e.g. the model a PEFT wrapper holds)."""
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, _MoDCausalLMMixin):
                return m
    raise ValueError(
        f"mod_ext.hf: {type(model).__name__} is not a model converted with mod_ext.hf.convert (nor holds one)"
    )


def _mod_layers(model) -> List[nn.Module]:
    return [m for m in _find_converted(model).modules() if isinstance(m, _MoDDecoderLayerMixin)]


# Per-class look-ups, filled at convert time (plain dicts: torch.compile traces a dict read).
_CACHE_KWARG: Dict[type, str] = {}
_POSITIONAL: Dict[type, tuple] = {}


def _cache_kwarg(attn_cls: type) -> str:
    """The attention module's cache keyword: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    if attn_cls not in _CACHE_KWARG:
        params = inspect.signature(attn_cls.forward).parameters
        _CACHE_KWARG[attn_cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[attn_cls]


def _positional(cls: type) -> tuple:
    """Names of a decoder layer's forward parameters after hidden_states that a caller may
    pass positionally (GPT-2's model passes the cache and mask positionally)."""
    if cls not in _POSITIONAL:
        params = list(inspect.signature(cls.forward).parameters.values())[2:]  # self, hidden_states
        _POSITIONAL[cls] = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return _POSITIONAL[cls]


def _window(layer: nn.Module, fam: _Family) -> Optional[int]:
    if fam.window == "config":
        return getattr(layer._mod_ext_config, "sliding_window", None)
    if fam.window == "attn":
        return getattr(getattr(layer, fam.attn), "sliding_window", None)
    return None


def _valid_from_mask(mask, B: int, T: int) -> Optional[Tensor]:
    """(B, T) bool validity of the call's tokens read off the mask the model passed to the
    layer: a token is valid iff it may attend to itself (the diagonal of the current
    tokens, which are the last T key columns). None: no mask, every token is valid."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"mod_ext.hf: MoD layers need a tensor attention mask (eager or sdpa attention), got "
            f"{type(mask).__name__}; use attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:  # (B, KV) padding mask
        v = mask[:, -T:].bool()
    elif mask.dim() == 4:  # (B or 1, 1, T, KV)
        KV = mask.shape[-1]
        t = torch.arange(T, device=mask.device)
        diag = mask[:, 0, t, KV - T + t]
        v = diag if diag.dtype == torch.bool else diag == 0
    else:
        raise ValueError(f"mod_ext.hf: unexpected attention mask of shape {tuple(mask.shape)}")
    return v.expand(B, T)


def _format_mask(visible: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """A bool (N, 1, Q, L) visibility mask in the format the attention implementation takes."""
    if impl == "eager":  # additive float mask, as transformers' eager masks
        return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)
    return visible


# ------------------------------------------------------------------------------------ cache


class MoDCacheLayer(DynamicLayer):
    """transformers cache layer of one MoD layer: only the tokens it routed, per sequence.

    Registered with transformers as layer type ``"mod_attention"`` (``_layer_type``). A
    converted model puts one at each MoD layer's index of the ``DynamicCache`` it is
    given (``generate`` builds one); :class:`MoDCache` builds one with them in place.
    The keys and values live in a :class:`mod_ext.kv_cache.MoDLayerCache` (``kv``),
    written by :meth:`mod_ext.MoDBlock.prefill` / :meth:`mod_ext.MoDBlock.decode`; it
    grows (doubling, up to the causal capacity K) as sequences fill it.

    For transformers' mask and position bookkeeping the layer reports the sequence
    length (columns seen), as the dense layer it replaces would: ``get_seq_length``
    and ``get_mask_sizes`` (a sliding window layer keeps its window arithmetic).

    Args:
        sliding_window: the window of the layer it replaces (None: full attention).
        decode_capacity: block slots per decode step (int in [1, B]); None:
            ``default_decode_capacity(B, capacity_factor)``.
        static: the prefill/decode path of :class:`mod_ext.MoDBlock`: True static-shaped
            and free of host syncs (the block runs on every slot, padding included),
            False the eager dynamic path (the block runs on the routed rows only). None
            (default): static on CUDA or under torch.compile, dynamic otherwise. Both
            give the same tokens.

    Attributes:
        kv: the :class:`~mod_ext.kv_cache.MoDLayerCache` (None before the prompt).
        columns: tokens per sequence seen so far (prompt + generated, padding included).
        routing: "causal" once a prompt was routed causally; "topk" when the cache was
            filled under top-k routing (then it holds no keys and cannot be decoded).
    """

    _layer_type = "mod_attention"
    is_croppable = False
    supports_early_init = False

    def __init__(self, sliding_window: Optional[int] = None, decode_capacity: Optional[int] = None,
                 static: Optional[bool] = None, **kwargs):
        super().__init__()
        self.static = static
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.decode_capacity = decode_capacity
        self.columns = 0
        self.kv: Optional[MoDLayerCache] = None
        self.routing: Optional[str] = None

    def __repr__(self):
        slots = None if self.kv is None else self.kv.slots
        return f"MoDCacheLayer(columns={self.columns}, slots={slots}, routing={self.routing})"

    # --- transformers' CacheLayerMixin interface
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing: the layer allocates on its first prompt."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "mod_ext.hf.MoDCacheLayer: a MoD layer's cache is written by its MoD decoder layer (through "
            "mod_ext.MoDBlock.prefill/decode), not by Cache.update; is this cache used by another model?"
        )

    def get_seq_length(self) -> int:
        return self.columns

    @property
    def cumulative_length(self) -> int:
        """Columns seen (the name transformers' sliding-window layer counts them by)."""
        return self.columns

    def get_mask_sizes(self, query_length: int):
        # transformers' own arithmetic, on the columns seen: that of the dense layer replaced
        if self.sliding_window is None:
            return DynamicLayer.get_mask_sizes(self, query_length)
        return DynamicSlidingWindowLayer.get_mask_sizes(self, query_length)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = None
        self.columns = 0
        self.routing = None
        self.keys = self.values = None
        self.is_initialized = False

    def _select(self, index: Tensor) -> None:
        if self.kv is not None:
            self._set_kv(self.kv.select_batch(index))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._select(torch.arange(self.kv.batch, device=self.kv.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.kv is not None:
            idx = torch.as_tensor(indices, device=self.kv.device)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            self._select(idx.long())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "mod_ext.hf.MoDCacheLayer: a MoD layer's cache cannot be cropped (routed tokens are not "
            "columns), so assisted / speculative decoding is not supported on converted models"
        )

    def offload(self):  # the routed tokens stay where they are
        pass

    def prefetch(self):
        pass

    # --- mod_ext side
    def _set_kv(self, kv: MoDLayerCache) -> None:
        self.kv = kv
        self.keys = kv.k.transpose(1, 2)  # (B, n_kv_heads, slots + 1, head_dim) views, for inspection
        self.values = kv.v.transpose(1, 2)
        self.device = kv.device
        self.is_initialized = True

    def _static(self, x: Tensor) -> bool:
        if torch.compiler.is_compiling():
            return True  # the dynamic path reads routing decisions on the host
        return x.is_cuda if self.static is None else bool(self.static)

    def _ensure_slots(self, needed: int) -> None:
        """Grow (doubling, capped at K) so every sequence can hold ``needed`` routed tokens."""
        kv = self.kv
        want = min(needed, kv.causal_capacity)
        if kv.slots < want:
            self._set_kv(kv.resized(min(kv.causal_capacity, max(want, 2 * kv.slots))))

    @property
    def drops(self) -> Optional[Tensor]:
        """(B,) int64 tokens that wanted the layer but did not run it (None before the prompt)."""
        return None if self.kv is None else self.kv.drops

    @property
    def overflow(self) -> Optional[Tensor]:
        """(B,) int64 the drops a full recompute would not make (None before the prompt)."""
        return None if self.kv is None else self.kv.overflow


class MoDCache(DynamicCache):
    """A transformers ``DynamicCache`` for a converted model, with a :class:`MoDCacheLayer`
    at every MoD layer's index (dense layers: transformers' own layers).

    ``generate`` does not need it (a converted model turns the cache it builds into
    this layout); pass one as ``cache=`` (``past_key_values=`` before transformers
    5.24) to set the decode capacity, e.g.
    ``MoDCache(model, decode_capacity=B)`` never drops a token for lack of block slots.

    Args:
        model: a converted model (or a model holding one, e.g. a PEFT model).
        decode_capacity: block slots per MoD layer and decode step; None: the default.
        static: see :class:`MoDCacheLayer` (None: static on CUDA, dynamic on the CPU).
    """

    def __init__(self, model, decode_capacity: Optional[int] = None, static: Optional[bool] = None):
        conv = _find_converted(model)
        if decode_capacity is not None and (
            isinstance(decode_capacity, bool) or not isinstance(decode_capacity, numbers.Integral)
            or decode_capacity < 1
        ):
            raise ValueError(f"mod_ext.hf.MoDCache: decode_capacity must be an int >= 1, got {decode_capacity!r}")
        super().__init__(config=conv.config.get_text_config(decoder=True))
        for layer in _mod_layers(conv):
            i = layer._mod_ext_index
            old = self.layers[i]
            self.layers[i] = MoDCacheLayer(sliding_window=getattr(old, "sliding_window", None),
                                           decode_capacity=None if decode_capacity is None else int(decode_capacity),
                                           static=static)


def _mod_cache_layer(cache, index: int) -> MoDCacheLayer:
    """The MoDCacheLayer at ``index`` of a transformers Cache, put there on first use."""
    if not isinstance(cache, Cache):
        raise ValueError(f"mod_ext.hf: the cache must be a transformers Cache (DynamicCache), got {type(cache).__name__}")
    layers = cache.layers
    while len(layers) <= index:  # a lazily grown DynamicCache()
        layers.append(cache.layer_class_to_replicate() if cache.layer_class_to_replicate else DynamicLayer())
    lc = layers[index]
    if isinstance(lc, MoDCacheLayer):
        return lc
    if isinstance(lc, StaticLayer) or not isinstance(lc, DynamicLayer):
        raise NotImplementedError(
            f"mod_ext.hf: cache layer {index} is a {type(lc).__name__}; MoD layers work with transformers' "
            "DynamicCache (generate's default, or mod_ext.hf.MoDCache), not static or quantized caches"
        )
    if lc.get_seq_length() > 0:
        raise ValueError(
            f"mod_ext.hf: cache layer {index} already holds {lc.get_seq_length()} tokens of a dense layer; "
            "a MoD layer cannot continue from it (start from an empty cache)"
        )
    new = MoDCacheLayer(sliding_window=getattr(lc, "sliding_window", None))
    layers[index] = new
    return new


def cache_drops(cache) -> Dict[int, Tensor]:
    """{layer index: (B,) int64 drops} of the MoD layers in a cache that generate returned
    (``out.cache`` with ``return_dict_in_generate=True``; ``out.past_key_values`` before
    transformers 5.24): tokens that wanted the layer but did not run it."""
    return {i: lc.drops for i, lc in enumerate(getattr(cache, "layers", [])) if isinstance(lc, MoDCacheLayer)
            and lc.drops is not None}


# ------------------------------------------------------------------------------------ the block


class _PrefillKV:
    """The cache argument of the attention module in a prefill block call: it stores the
    routed tokens' keys/values through the MoDLayerCache's write and returns them as they are."""

    def __init__(self, write, positions: Tensor):
        self.write, self.positions = write, positions

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.write(key_states.transpose(1, 2), value_states.transpose(1, 2), self.positions)
        return key_states, value_states


class _DecodeKV:
    """The cache argument of the attention module in a decode block call: write the new
    token's key/value, read its sequence's routed tokens, and fill the attention mask
    (allocated before the call, filled here because the key mask is known only after
    the read) in the implementation's format."""

    def __init__(self, write, read, qpos: Tensor, mask: Tensor, impl: str, window, kv: MoDLayerCache, rows: Tensor):
        self.write, self.read, self.qpos, self.mask = write, read, qpos, mask
        self.impl, self.window, self.kv, self.rows = impl, window, kv, rows

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.write(key_states.transpose(1, 2), value_states.transpose(1, 2), self.qpos[:, None])
        keys, values, key_mask = self.read()  # (n, L, H, hd) x2, (n, L)
        if self.window is not None:
            kpos = self.kv.positions.index_select(0, self.rows)
            key_mask = key_mask & ((self.qpos[:, None] - kpos) < self.window)
        self.mask.copy_(_format_mask(key_mask[:, None, None, :], self.impl, self.mask.dtype))
        return keys.transpose(1, 2), values.transpose(1, 2)


class _LayerBlock:
    """One call's view of a decoder layer as a mod_ext block (the block protocol,
    :class:`mod_ext.kv_cache.CachedBlock`): ``f(x~) = attn(norm1(x~)) + mlp(norm2(x~ +
    attn(norm1(x~))))`` from the layer's own sublayers.

    The ``positions`` MoDBlock passes it are indices into this call's token grid (a
    token's column in forward/prefill, its row in a decode step), from which the block
    gathers the rotary (cos, sin) and the true positions (``position_ids``).
    """

    def __init__(self, layer, fam: _Family, pe, position_ids: Tensor, extra: dict, impl: str, window,
                 lc: Optional[MoDCacheLayer] = None, column: int = 0):
        self.layer, self.fam, self.pe, self.position_ids = layer, fam, pe, position_ids
        self.extra, self.impl, self.window, self.lc, self.column = extra, impl, window, lc, column

    def _update(self, x: Tensor, pe, pos: Tensor, mask: Tensor, kv) -> Tensor:
        fam, layer = self.fam, self.layer
        attn = getattr(layer, fam.attn)
        kw = dict(self.extra)
        kw[_cache_kwarg(type(attn))] = kv
        if fam.rotary:
            a = attn(hidden_states=getattr(layer, fam.norm1)(x), position_embeddings=pe, attention_mask=mask,
                     position_ids=pos, **kw)[0]
        else:
            a = attn(getattr(layer, fam.norm1)(x), attention_mask=mask, **kw)[0]
        m = getattr(layer, fam.mlp)(getattr(layer, fam.norm2)(x + a))
        return a + m  # the update f: the residual is added once, by mod_ext's scatter

    def _gather_pe(self, cols: Tensor):
        """(cos, sin) at token indices ``cols`` (B, C) of this call (B, T, head_dim)."""
        if not self.fam.rotary:
            return None
        B, C = cols.shape
        out = []
        for t in self.pe:
            t = t.expand(B, *t.shape[1:])
            out.append(t.gather(1, cols[:, :, None].expand(B, C, t.shape[-1])))
        return tuple(out)

    def __call__(self, x_sel: Tensor, cols: Tensor, slot_mask: Optional[Tensor], write=None) -> Tensor:
        B, C, _ = x_sel.shape
        pos = self.position_ids.expand(B, -1).gather(1, cols)  # (B, C) true positions
        ar = torch.arange(C, device=x_sel.device)
        visible = ar[:, None] >= ar[None, :]  # causal in slot order = position order
        if slot_mask is not None:
            visible = visible & (slot_mask[:, None, :] | torch.eye(C, dtype=torch.bool, device=x_sel.device))
        if self.window is not None:
            visible = visible & ((pos[:, :, None] - pos[:, None, :]) < self.window)
        mask = _format_mask(visible.expand(B, C, C)[:, None], self.impl, x_sel.dtype)
        kv = None if write is None else _PrefillKV(write, pos)
        return self._update(x_sel, self._gather_pe(cols), pos, mask, kv)

    def forward_cached(self, x: Tensor, rows_as_positions: Tensor, write, read) -> Tensor:
        n = x.shape[0]
        rows = rows_as_positions[:, 0]  # (n,) the sequences of the block slots
        B, t = self.lc.kv.batch, self.column
        qpos = self.position_ids.expand(B, -1)[:, t].index_select(0, rows)  # (n,) true positions
        pe = None
        if self.fam.rotary:
            pe = tuple(p.expand(B, *p.shape[1:])[:, t:t + 1].index_select(0, rows) for p in self.pe)
        dtype = x.dtype if self.impl == "eager" else torch.bool
        mask = torch.empty(n, 1, 1, self.lc.kv.slots + 1, dtype=dtype, device=x.device)
        kv = _DecodeKV(write, read, qpos, mask, self.impl, self.window, self.lc.kv, rows)
        return self._update(x, pe, qpos[:, None], mask, kv)


# ------------------------------------------------------------------------------------ layers


class _MoDDecoderLayerMixin:
    """The forward of a converted decoder layer (placed before the layer's class)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        collector = kwargs.pop(_AUX_KWARG, None)
        names = _positional(self._mod_ext_base)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward got {len(args) + 1} positional arguments, takes at most "
                            f"{len(names) + 1}")
        a = dict(kwargs)
        for name, value in zip(names, args):
            a[name] = value
        mask = a.pop("attention_mask", None)
        position_ids = a.pop("position_ids", None)
        pe = a.pop("position_embeddings", None)
        cache = None
        for k in ("cache", "past_key_values", "layer_past"):  # the keyword was renamed in transformers 5.24
            v = a.pop(k, None)
            cache = v if cache is None else cache
        a.pop("use_cache", None)
        a.pop("cache_position", None)
        if a.pop("encoder_hidden_states", None) is not None:
            raise NotImplementedError("mod_ext.hf: MoD layers do not support cross-attention (encoder_hidden_states)")
        a.pop("encoder_attention_mask", None)
        if a.pop("output_attentions", None):
            raise NotImplementedError("mod_ext.hf: output_attentions is not supported on MoD layers")
        extra = a  # what newer transformers pass on (e.g. attention kwargs): handed to the attention module
        x = hidden_states
        B, T, _ = x.shape
        fam = self._mod_ext_family
        impl = self._mod_ext_config._attn_implementation
        if impl not in _ATTN_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"mod_ext.hf: MoD layers support attn_implementation {_ATTN_IMPLEMENTATIONS}, the model uses "
                f"{impl!r} (model.set_attn_implementation('sdpa'))"
            )
        if fam.rotary and pe is None:
            raise ValueError("mod_ext.hf: the decoder layer got no position_embeddings")
        if position_ids is None:
            past = cache.get_seq_length(self._mod_ext_index) if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        valid = _valid_from_mask(mask, B, T)
        window = _window(self, fam)
        mod: MoDBlock = self.mod
        lc = None if cache is None else _mod_cache_layer(cache, self._mod_ext_index)
        if lc is None or mod.routing == "topk":  # full sequences: no cache, or top-k (never cached)
            if lc is not None and lc.routing == "causal":
                raise ValueError(
                    f"mod_ext.hf: MoD layer {self._mod_ext_index}: this cache holds causally routed tokens, but the "
                    "model routes top-k; call mod_ext.hf.set_routing(model, 'causal') to decode from it"
                )
            out = mod(x, valid=valid, block=_LayerBlock(self, fam, pe, position_ids, extra, impl, window))
            if mod.routing == "topk" and collector is not None:
                collector[self._mod_ext_index] = (mod, x.detach(), out.routing.indices, valid)
            if lc is not None:
                lc.routing = "topk"  # top-k needs the whole sequence: nothing decodable is cached
                lc.columns += T
            return out.output

        if lc.routing == "topk":
            raise ValueError(
                f"mod_ext.hf: MoD layer {self._mod_ext_index}: this cache was filled under top-k routing and holds "
                "no routed keys; route the prompt causally (mod_ext.hf.set_routing(model, 'causal'), or generate)"
            )
        if lc.kv is None:  # the prompt: causal routing over it, caching the routed tokens
            kv_heads, head_dim = self._mod_ext_kv_shape
            K = mod.causal_capacity(mod.max_seq_len)
            lc._set_kv(MoDLayerCache(B, min(K, T + 64), K, kv_heads, head_dim, dtype=x.dtype, device=x.device))
            blk = _LayerBlock(self, fam, pe, position_ids, extra, impl, window, lc)
            static = lc._static(x)
            out = mod.prefill(x, lc.kv, valid=valid, block=blk, static=static)
            lc.routing = "causal"
            lc.columns += T
            return out.output
        if lc.kv.batch != B:
            raise ValueError(f"mod_ext.hf: MoD layer {self._mod_ext_index}: the cache holds {lc.kv.batch} "
                             f"sequences, the input has {B}")
        # Decode: each new token routed causally against its sequence's routed tokens.
        static = lc._static(x)
        dc = None if lc.decode_capacity is None else min(lc.decode_capacity, B)  # None: MoDBlock's default
        rows = torch.arange(B, device=x.device)[:, None]  # the block's "positions": each slot's sequence
        outs = []
        for t in range(T):
            lc._ensure_slots(lc.columns + 1)
            blk = _LayerBlock(self, fam, pe, position_ids, extra, impl, window, lc, column=t)
            active = None if valid is None else valid[:, t]
            outs.append(mod.decode(x[:, t:t + 1], lc.kv, rows, active, decode_capacity=dc, static=static,
                                   block=blk))
            lc.columns += 1
        return outs[0] if T == 1 else torch.cat(outs, 1)


class _MoDCausalLMMixin:
    """forward (aux loss into out.loss) and generate (causal routing) of a converted model."""

    def forward(self, *args, **kwargs):
        cfg = self.config
        if kwargs.get("output_attentions") or getattr(cfg, "output_attentions", False):
            raise NotImplementedError("mod_ext.hf: output_attentions is not supported on converted (MoD) models")
        collector: dict = {}
        kwargs[_AUX_KWARG] = collector
        out = self._mod_ext_base.forward(self, *args, **kwargs)
        aux = None
        if collector:
            w = float(cfg.mod_ext["aux_loss_weight"])
            parts = [router_aux_loss(mod.causal_logits(xd), idx, valid) for mod, xd, idx, valid in
                     (collector[k] for k in sorted(collector))]
            aux = w * torch.stack([p.float() for p in parts]).sum()
            n_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
            if n_items is not None and labels is not None:
                # transformers' loss is then sum / num_items_in_batch (the tokens of all the
                # micro-batches a step accumulates, Trainer): weigh the aux (a mean over this
                # micro-batch) by the same share, so accumulation sums it to the step's mean.
                aux = aux * (labels[..., 1:].ne(-100).sum() / n_items)
        _LAST_AUX[self] = aux
        if aux is not None:
            if isinstance(out, tuple):
                if kwargs.get("labels") is not None and len(out) and torch.is_tensor(out[0]) and out[0].dim() == 0:
                    out = (out[0] + aux.to(out[0].dtype),) + tuple(out[1:])
            elif getattr(out, "loss", None) is not None:
                out.loss = out.loss + aux.to(out.loss.dtype)
        return out

    def generate(self, *args, **kwargs):
        layers = [m for m in self.modules() if isinstance(m, _MoDDecoderLayerMixin)]
        before = [m.mod.routing for m in layers]
        for m in layers:
            m.mod.routing = "causal"  # top-k over the sequence sees the future
        try:
            return self._mod_ext_base.generate(self, *args, **kwargs)
        finally:
            for m, r in zip(layers, before):
                m.mod.routing = r


_CLASSES: Dict[tuple, type] = {}


def _class_key(mixin: type, base: type) -> str:
    """The converted class's qualified name in this module: no dots (pickle splits on them), and
    enough to rebuild the class in another process (module ``__getattr__`` below)."""
    kind = "layer" if mixin is _MoDDecoderLayerMixin else "lm"
    return f"converted[{kind}|{base.__module__.replace('.', '/')}|{base.__qualname__.replace('.', '/')}]"


def __getattr__(name: str):
    """Rebuild a converted class by its name, so that a pickled converted model unpickles in a
    process that has not converted one yet (``torch.save(model)`` / ``torch.load``)."""
    if name.startswith("converted[") and name.endswith("]"):
        import importlib

        kind, module, qualname = name[len("converted["):-1].split("|")
        base = importlib.import_module(module.replace("/", "."))
        for part in qualname.split("/"):
            base = getattr(base, part)
        return _subclass(_MoDDecoderLayerMixin if kind == "layer" else _MoDCausalLMMixin, base)
    raise AttributeError(f"module 'mod_ext.hf' has no attribute {name!r}")


def _subclass(mixin: type, base: type) -> type:
    """``mixin`` + ``base`` under base's name (transformers matches layers and architectures by
    name), picklable as ``mod_ext.hf.<_class_key>``."""
    key = (mixin, base)
    if key not in _CLASSES:
        attrs = {"_mod_ext_base": base, "__module__": __name__}
        if "forward" in mixin.__dict__:
            impl = mixin.__dict__["forward"]

            def forward(self, *args, **kwargs):
                return impl(self, *args, **kwargs)

            # A new function per class, carrying base.forward's signature (transformers reads
            # it: generate's model-kwarg check, Trainer's column filter).
            attrs["forward"] = functools.wraps(base.forward)(forward)
        cls = type(base.__name__, (mixin, base), attrs)
        cls.__qualname__ = _class_key(mixin, base)
        _CLASSES[key] = cls
    return _CLASSES[key]


# ------------------------------------------------------------------------------------ API


def _check_settings(capacity_factor, every, layers, causal_router, router_activation, aux_loss_weight, n_layers):
    where = "mod_ext.hf.convert"
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real) or not (
        0 < float(capacity_factor) <= 1
    ):
        raise ValueError(f"{where}: capacity_factor must be a number in (0, 1], got {capacity_factor!r}")
    if layers is None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"{where}: every must be an int >= 1, got {every!r}")
        idx = [i for i in range(n_layers) if i % int(every) == int(every) - 1]
    else:
        if hasattr(layers, "tolist") and not isinstance(layers, torch.Tensor):
            layers = layers.tolist()  # a numpy array
        if isinstance(layers, torch.Tensor):
            layers = layers.tolist() if layers.dim() == 1 and not layers.is_floating_point() else [layers]
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers
        ):
            raise ValueError(f"{where}: layers must be a sequence of int layer indices, got {layers!r}")
        idx = [int(i) for i in layers]
        if not idx:
            raise ValueError(f"{where}: layers is empty; give at least one decoder-layer index")
        if len(set(idx)) != len(idx) or any(not 0 <= i < n_layers for i in idx):
            raise ValueError(f"{where}: layers must be distinct indices in [0, {n_layers}), got {idx!r}")
        idx = sorted(idx)
    if not idx:
        raise ValueError(f"{where}: no layer would become MoD (every={every!r}, {n_layers} layers)")
    if causal_router not in ("predictor", "router"):
        raise ValueError(f"{where}: causal_router must be 'predictor' or 'router', got {causal_router!r}")
    if router_activation not in ROUTER_ACTIVATIONS:
        raise ValueError(
            f"{where}: router_activation must be one of {ROUTER_ACTIVATIONS} (both weigh the update by 1 at "
            f"initialisation), got {router_activation!r}"
        )
    if isinstance(aux_loss_weight, bool) or not isinstance(aux_loss_weight, numbers.Real) or not (
        0 <= float(aux_loss_weight) < math.inf
    ):
        raise ValueError(f"{where}: aux_loss_weight must be a finite number >= 0, got {aux_loss_weight!r}")
    return idx


def convert(
    model,
    *,
    capacity_factor: float = 0.125,
    every: int = 2,
    layers: Optional[Sequence[int]] = None,
    causal_router: str = "predictor",
    router_activation: str = "scaled_sigmoid",
    aux_loss_weight: float = 0.1,
    predictor_hidden: Optional[int] = None,
):
    """Convert a transformers causal LM to Mixture-of-Depths, in place (see the module docstring).

    Args:
        model: a causal LM of a supported family (``SUPPORTED_MODEL_TYPES``), e.g. from
            ``AutoModelForCausalLM.from_pretrained`` or ``.from_config``; or a PEFT model
            holding one (its base model is converted, the PEFT model returned).
        capacity_factor: c in (0, 1], the fraction of each sequence a MoD layer routes
            (paper: 0.125); the capacity of a length-S input is ``capacity_for(S, c)``.
        every: layer i becomes MoD when ``i % every == every - 1`` (ignored with layers).
        layers: the exact decoder-layer indices to convert, instead of ``every``.
        causal_router: what routes causally (sampling): "predictor" (a small MLP on the
            detached hidden state, trained by the aux loss) or "router" (the router
            logits, trained by the aux loss to predict top-k membership).
        router_activation: "scaled_sigmoid" (``r = 2 sigmoid(z)``, router zero at
            init) or "identity" (``r = z``, router bias 1 at init).
        aux_loss_weight: weight of the summed aux losses in ``out.loss`` (>= 0).
        predictor_hidden: predictor MLP width (default max(16, D // 4)).

    Returns:
        ``model``, converted; ``model.config.mod_ext`` holds the settings (saved by
        ``save_pretrained``; :func:`from_pretrained` reads them back).

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones), a
            model already converted, an argument out of range, an attention
            implementation other than eager / sdpa.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if inner is not model:
        convert(inner, capacity_factor=capacity_factor, every=every, layers=layers,
                causal_router=causal_router, router_activation=router_activation,
                aux_loss_weight=aux_loss_weight, predictor_hidden=predictor_hidden)
        return model  # a PEFT model: its base model is converted in place
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"mod_ext.hf.convert: expected a transformers causal LM, got {type(model).__name__}")
    if any(isinstance(m, (_MoDCausalLMMixin, _MoDDecoderLayerMixin)) for m in model.modules()):
        raise ValueError("mod_ext.hf.convert: this model is already converted (calling convert twice would wrap twice)")
    fam = _family(model)
    if not callable(getattr(model, "generate", None)) or not hasattr(model, "lm_head"):
        raise ValueError(
            f"mod_ext.hf.convert: {type(model).__name__} is not a causal LM with an LM head; use "
            "AutoModelForCausalLM"
        )
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"mod_ext.hf.convert: attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, the model uses "
            f"{impl!r}"
        )
    decoder = _decoder_layers(model, fam)
    idx = _check_settings(capacity_factor, every, layers, causal_router, router_activation, aux_loss_weight,
                          len(decoder))
    max_len = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError("mod_ext.hf.convert: the config has no max_position_embeddings; causal routing needs it")
    D = cfg.hidden_size
    for i in idx:
        layer = decoder[i]
        attn = getattr(layer, fam.attn)
        head_dim = attn.head_dim
        if fam.attn == "self_attn":
            kv_heads = attn.k_proj.out_features // head_dim
        else:
            kv_heads = attn.num_heads
        p = next(layer.parameters())
        mod = MoDBlock(None, D, capacity_factor=float(capacity_factor), router_activation=router_activation,
                       causal_router=causal_router, max_seq_len=max_len, predictor_hidden=predictor_hidden)
        with torch.no_grad():
            mod.router_weight.zero_()
            mod.router_bias.fill_(1.0 if router_activation == "identity" else 0.0)
        mod.to(device=p.device, dtype=p.dtype)
        _positional(type(layer)), _cache_kwarg(type(attn))  # resolved here, outside any compiled region
        layer.__class__ = _subclass(_MoDDecoderLayerMixin, type(layer))
        layer.mod = mod
        layer._mod_ext_index = i
        layer._mod_ext_family = fam
        layer._mod_ext_kv_shape = (kv_heads, head_dim)
        object.__setattr__(layer, "_mod_ext_config", cfg)  # not a submodule: the model's config object
    model.__class__ = _subclass(_MoDCausalLMMixin, type(model))
    cfg.mod_ext = {
        "capacity_factor": float(capacity_factor),
        "layers": idx,
        "causal_router": causal_router,
        "router_activation": router_activation,
        "aux_loss_weight": float(aux_loss_weight),
        "predictor_hidden": predictor_hidden,
    }
    return model


def is_converted(model) -> bool:
    """Whether ``model`` is (or holds) a model converted by :func:`convert`."""
    return isinstance(model, nn.Module) and any(isinstance(m, _MoDCausalLMMixin) for m in model.modules())


def mod_layer_indices(model) -> List[int]:
    """The decoder-layer indices that are MoD layers."""
    return [m._mod_ext_index for m in _mod_layers(model)]


def set_routing(model, routing: str) -> None:
    """Route every MoD layer by ``"topk"`` (training, the default) or ``"causal"`` (sampling).

    ``generate`` routes causally whatever this says. Raises ValueError for another mode
    or a model that is not converted.
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"mod_ext.hf.set_routing: routing must be 'topk' or 'causal', got {routing!r}")
    for m in _mod_layers(model):
        m.mod.routing = routing


def aux_loss(model) -> Optional[Tensor]:
    """``aux_loss_weight * sum`` of the MoD layers' aux losses of the model's last forward
    (a scalar float32 tensor with its graph; what the forward added to ``out.loss``), or
    None when that forward computed none (causal routing). Add it to your own loss when
    you train without ``labels``."""
    return _LAST_AUX.get(_find_converted(model))


def router_parameters(model) -> List[nn.Parameter]:
    """The routers' and predictors' parameters (for router-only tuning: freeze the rest, train
    these; or re-enable them after PEFT froze everything but its adapters)."""
    return [p for m in _mod_layers(model) for p in m.mod.parameters()]


def from_pretrained(path, **kwargs):
    """Load a model saved from a converted model (``save_pretrained``): the base model by
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, converted with the saved
    settings, with the saved router and predictor weights.

    Raises:
        ValueError: the checkpoint was not saved from a converted model, or lacks MoD weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, _CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"mod_ext.hf.from_pretrained: {path} was not saved from a mod_ext.hf-converted model "
                         "(its config has no 'mod_ext' entry)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the MoD weights are "unexpected" to the base class; they are loaded below
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    convert(model, **{k: settings[k] for k in ("capacity_factor", "layers", "causal_router", "router_activation",
                                                "aux_loss_weight", "predictor_hidden") if k in settings})
    wanted = {k for k in model.state_dict() if ".mod." in k}
    state = _read_weights(path, wanted)
    # causal_threshold (calibration) came later: checkpoints saved before it lack it (then 0)
    missing = sorted(k for k in wanted - set(state) if not k.endswith(".causal_threshold"))
    if missing:
        raise ValueError(f"mod_ext.hf.from_pretrained: {path} lacks MoD weights {missing[:4]}...")
    model.load_state_dict(state, strict=False)
    return model


def _read_weights(path, names) -> Dict[str, Tensor]:
    import json
    import os

    from safetensors.torch import load_file

    files = []
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for k, v in json.load(f)["weight_map"].items() if k in names})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = [os.path.join(path, "model.safetensors")]
    state = {}
    for fn in files:
        state.update({k: v for k, v in load_file(fn).items() if k in names})
    return state
