"""A small decoder-only transformer with Mixture-of-Depths layers (reference model).

nanoGPT-style: RMSNorm, rotary position embeddings on the TRUE token positions,
SwiGLU MLP, causal attention via ``F.scaled_dot_product_attention``. Every
``mod_every``-th layer (layers 1, 3, ... for mod_every=2) is wrapped in
:class:`mod_ext.MoDBlock`, so it processes only ``capacity_factor`` of the tokens
(paper: 12.5% on every other layer). ``mod_every=0`` gives the dense baseline with
the same parameters minus the routers/predictors.

The model is a model: ``forward`` returns a :class:`MoDTransformerOutput` (logits and
the losses a training loop backprops) and keeps no state between calls. Sampling (KV
cache, prefill, decode step, CUDA graphs) is :mod:`mod_ext.generation`;
``allocate_cache``, ``prefill``, ``decode_step`` and ``generate`` here delegate to it.

Semantics: docs/MOD_SPEC.md sections 1, 3, 6; Raposo et al. 2024 (arXiv 2404.02258).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import KVRead, KVWrite
from ._args import as_int, as_real, is_real
from .layer import ROUTER_ACTIVATIONS, MoDBlock, MoDBlockOutput, calibrated_threshold, capacity_for

if TYPE_CHECKING:  # pragma: no cover
    from .generation import MoDKVCache

__all__ = [
    "ModelConfig",
    "MoDTransformer",
    "MoDTransformerOutput",
    "Block",
    "dense_config",
    "apply_rotary",
    "check_token_ids",
]


@dataclass
class ModelConfig:
    """Configuration of :class:`MoDTransformer`.

    Raises:
        ValueError: a field out of range (the message names it), checked at construction.
    """

    vocab_size: int = 256  # byte-level tokens
    block_size: int = 256  # max sequence length (rotary table length; fixes the causal capacity)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_hidden: Optional[int] = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to 32
    capacity_factor: float = 0.125  # fraction of tokens a MoD layer processes, in (0, 1] (paper: 0.125)
    mod_every: Optional[int] = 2  # layer i is MoD when i % mod_every == mod_every - 1; 0/None = dense
    router_activation: str = "sigmoid"  # one of mod_ext.layer.ROUTER_ACTIVATIONS
    causal_router: str = "predictor"  # what routes in causal mode: "predictor" or "router" (aux loss)
    aux_loss_weight: float = 0.1  # weight of the MoD layers' aux loss (predictor BCE or router BCE), >= 0
    predictor_hidden: Optional[int] = None  # predictor MLP width; None = max(16, d_model // 4)
    rope_base: float = 10000.0  # rotary frequency base, > 1
    random_routing: bool = False  # top-k over random scores, not the router's (the paper's baseline)
    router_aux_grad_scale: float = 0.3  # causal_router="router": share of the aux BCE's gradient reaching the hidden states, in [0, 1]

    def __post_init__(self):
        # NumPy and other integer scalars are stored as Python ints (so configs compare,
        # print and serialise as users expect).
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            setattr(self, name, as_int(getattr(self, name), name, 1, where="ModelConfig"))
        for name in ("mlp_hidden", "predictor_hidden"):
            setattr(self, name, as_int(getattr(self, name), name, 1, where="ModelConfig", allow_none=True))
        self.mod_every = as_int(self.mod_every, "mod_every (0 or None: dense)", 0, where="ModelConfig",
                                allow_none=True)
        c = self.capacity_factor
        if not is_real(c) or not math.isfinite(c) or not 0 < c <= 1:
            raise ValueError(f"ModelConfig: capacity_factor must be a number in (0, 1], got {c!r}")
        w = self.aux_loss_weight
        if not is_real(w) or not math.isfinite(w) or w < 0:
            raise ValueError(f"ModelConfig: aux_loss_weight must be a finite number >= 0, got {w!r}")
        self.router_aux_grad_scale = as_real(self.router_aux_grad_scale, "router_aux_grad_scale", "ModelConfig",
                                             low=0.0, high=1.0, what="a number in [0, 1]")
        if not is_real(self.rope_base) or not math.isfinite(self.rope_base) or self.rope_base <= 1:
            raise ValueError(f"ModelConfig: rope_base must be a finite number > 1, got {self.rope_base!r}")
        if self.router_activation not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"ModelConfig: router_activation must be one of {ROUTER_ACTIVATIONS}, got {self.router_activation!r}"
            )
        if not isinstance(self.random_routing, bool):
            raise ValueError(f"ModelConfig: random_routing must be True or False, got {self.random_routing!r}")
        if self.causal_router not in ("predictor", "router"):
            raise ValueError(f"ModelConfig: causal_router must be 'predictor' or 'router', got {self.causal_router!r}")
        if self.d_model % self.n_head != 0 or (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(
                f"ModelConfig: d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}) "
                "with an even head size (rotary)"
            )
        if self.mlp_hidden is None:
            self.mlp_hidden = 32 * math.ceil(8 * self.d_model / 3 / 32)

    def is_mod_layer(self, i: int) -> bool:
        """True when layer i (0-based) is a Mixture-of-Depths layer."""
        return bool(self.mod_every) and i % self.mod_every == self.mod_every - 1


def check_token_ids(tokens: Tensor, vocab_size: int, where: str, name: str) -> None:
    """ValueError for ids outside [0, vocab_size) (reads the ids on the host: call it at
    prompt time, or on the CPU only)."""
    if tokens.numel() and bool((tokens.min() < 0) | (tokens.max() >= vocab_size)):
        raise ValueError(f"{where}: {name} holds token ids outside [0, vocab_size = {vocab_size}): "
                         f"min {int(tokens.min())}, max {int(tokens.max())}")


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The same model with routing off (mod_every=0): the dense baseline."""
    return dataclasses.replace(cfg, mod_every=0)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., j], x[..., j + hs/2]) by the angles in cos/sin.

    Args:
        x: (..., hs) queries or keys, e.g. (B, T, nh, hs).
        cos, sin: the angles of each token's true position, broadcastable to
            (..., hs/2), e.g. (B, T, 1, hs/2).
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding table, looked up by true token positions."""

    def __init__(self, head_size: int, max_len: int, base: float = 10000.0):
        super().__init__()
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor):
        """positions (B, T) int64 -> (cos, sin), each (B, T, 1, hs/2) float32."""
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings and an optional slot mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_head, cfg.block_size, cfg.rope_base)

    def project(self, x: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values (each (B, T, nh, hs)) of x (B, T, D); rotary applied
        to q and k at the tokens' true positions (B, T)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).unbind(2)
        cos, sin = self.rotary(positions)  # (B, T, 1, hs/2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self, x: Tensor, positions: Tensor, slot_mask: Optional[Tensor] = None, write: Optional[KVWrite] = None
    ) -> Tensor:
        """Attention among the T tokens of x (B, T, D), causal in slot order.

        ``write(k, v)``, when given, receives the rotated keys and values (B, T, nh, hs)
        (used by prefill to fill a KV cache).
        """
        B, T, D = x.shape
        q, k, v = self.project(x, positions)
        if write is not None:
            write(k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if slot_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Causal in slot order (slots are ascending positions); keys in padding slots are
            # ignored; the diagonal keeps every query row non-empty (no NaN for padding rows).
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal & (slot_mask[:, None, None, :] | eye)  # (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)

    def forward_cached(self, x: Tensor, positions: Tensor, write: KVWrite, read: KVRead) -> Tensor:
        """One new token per row against a KV cache (decoding; the block protocol,
        :class:`mod_ext.kv_cache.CachedBlock`).

        Args:
            x: (N, 1, D) the new tokens; positions: (N, 1) int64 true positions.
            write: stores the new token's rotated key and value (N, 1, nh, hs).
            read: called after write; returns keys and values (N, L, nh, hs) and the
                (N, L) bool mask of the cache entries this token attends to (its own
                included; every row needs at least one True).
        """
        N, _, D = x.shape
        q, k, v = self.project(x, positions)
        write(k, v)
        keys, values, key_mask = read()
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
        )  # (N, nh, 1, hs)
        return self.proj(y.transpose(1, 2).reshape(N, 1, D))


class SwiGLU(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block that returns only its residual update f(x).

    Implements the block protocol (:class:`mod_ext.kv_cache.CachedBlock`), so it can be
    cached as a dense layer or inside a :class:`mod_ext.MoDBlock`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: Tensor, positions: Tensor, slot_mask: Optional[Tensor] = None, write: Optional[KVWrite] = None
    ) -> Tensor:
        """The update ``u1 + u2`` (B, T, D), without the residual.

        Args:
            x: (B, T, D) tokens (all tokens, or the C routed tokens of a MoD layer).
            positions: (B, T) int64 true positions (ascending in each row).
            slot_mask: (B, T) bool, False for padding slots whose keys are ignored;
                None = all real tokens (uses the fast ``is_causal`` path).
            write: optional ``write(k, v)`` that receives the attention's rotated keys
                and values (B, T, nh, hs), to fill a KV cache.
        """
        u1 = self.attn(self.norm1(x), positions, slot_mask, write)
        u2 = self.mlp(self.norm2(x + u1))
        return u1 + u2

    def forward_cached(self, x: Tensor, positions: Tensor, write: KVWrite, read: KVRead) -> Tensor:
        """The update for one new token per row (N, 1, D) against a KV cache
        (see :meth:`CausalSelfAttention.forward_cached`)."""
        u1 = self.attn.forward_cached(self.norm1(x), positions, write, read)
        u2 = self.mlp(self.norm2(x + u1))
        return u1 + u2


class MoDTransformerOutput(NamedTuple):
    """What :meth:`MoDTransformer.forward` returns.

    ``loss`` is what a training loop backprops: ``lm_loss + aux_loss_weight * aux_loss``
    (``lm_loss`` alone for the dense model, in causal mode, or with aux_loss_weight 0).
    """

    logits: Tensor  #: (B, T, V) float, dtype of the model
    loss: Optional[Tensor]  #: scalar training loss; None without targets
    lm_loss: Optional[Tensor]  #: scalar next-token cross-entropy (nats); None without targets
    #: scalar sum of the MoD layers' aux losses (predictor or router BCE) in topk mode;
    #: None in causal mode and for the dense model
    aux_loss: Optional[Tensor]
    #: with ``return_routing=True``: one :class:`mod_ext.MoDBlockOutput` per MoD layer, in
    #: depth order (``model.mod_layer_ids``); else None
    mod_layer_outputs: Optional[Tuple[MoDBlockOutput, ...]] = None


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class MoDTransformer(nn.Module):
    """Decoder-only transformer; layers with ``cfg.is_mod_layer(i)`` are MoD layers.

    ``forward(idx, targets)`` returns a :class:`MoDTransformerOutput`; a training step
    is ``model(x, y).loss.backward()``. The model keeps no state between calls, so it
    survives ``copy.deepcopy`` (also after a training forward), ``state_dict`` round
    trips and activation checkpointing.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"MoDTransformer: cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        layers = []
        for i in range(cfg.n_layer):
            block = Block(cfg)
            if cfg.is_mod_layer(i):
                block = MoDBlock(
                    block, cfg.d_model, capacity_factor=cfg.capacity_factor,
                    router_activation=cfg.router_activation, causal_router=cfg.causal_router,
                    max_seq_len=cfg.block_size, predictor_hidden=cfg.predictor_hidden,
                    random_routing=cfg.random_routing, router_aux_grad_scale=cfg.router_aux_grad_scale,
                )
            layers.append(block)
        self.layers = nn.ModuleList(layers)
        self.norm_f = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def mod_layers(self) -> List[MoDBlock]:
        """The MoDBlocks, in depth order (empty for the dense baseline)."""
        return [m for m in self.layers if isinstance(m, MoDBlock)]

    @property
    def mod_layer_ids(self) -> List[int]:
        """Depth index of each MoD layer."""
        return [i for i, m in enumerate(self.layers) if isinstance(m, MoDBlock)]

    def num_params(self) -> int:
        """Number of parameters (tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx, where: str) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"{where}: idx must be a (B, T) int64 tensor of token ids, got {got}")
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"{where}: sequence length {idx.shape[1]} > block_size {self.cfg.block_size}")
        # Reading the ids is free on the CPU; on CUDA, or inside torch.compile, it would be
        # a host sync, so there an out-of-vocabulary id is not checked here.
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            check_token_ids(idx, self.cfg.vocab_size, where, "idx")

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, routing: str = "topk",
                valid: Optional[Tensor] = None, *, return_routing: bool = False) -> MoDTransformerOutput:
        """Logits and (with targets) the training loss.

        Args:
            idx: (B, T) int64 token ids in [0, vocab_size), T <= block_size.
            targets: optional (B, T) int64 next-token ids (-100 = ignored, e.g. padding).
            routing: "topk" (expert-choice, training; uses future tokens within the
                sequence) or "causal" (predictor/router logit above the layer's
                ``causal_threshold``, first come first served; for sampling).
            valid: optional (B, T) bool, False for padding tokens: they are never
                attended to or routed, and each row's true positions count only its
                valid tokens (so left-padded prompts get positions 0, 1, ...).
            return_routing: also return each MoD layer's :class:`~mod_ext.MoDBlockOutput`
                (indices, slot mask, router logits, causal scores) in
                ``mod_layer_outputs``; each then keeps its own output tensor (no
                in-place update of the residual stream under no_grad).

        Returns:
            :class:`MoDTransformerOutput` ``(logits (B, T, V), loss, lm_loss, aux_loss,
            mod_layer_outputs)``: loss = lm_loss + aux_loss_weight * aux_loss (the sum of
            the MoD layers' aux losses, topk mode), None without targets.

        Under no_grad / inference_mode the MoD layers update the model's own residual
        stream in place (no copy of the hidden state); the caller's tensors are never
        modified.

        Raises:
            ValueError: idx not (B, T) integer, T > block_size, token ids outside the
                vocabulary (checked on the CPU in eager mode only: on CUDA or while
                compiling it would be a host sync), targets or valid of the wrong
                shape or dtype, an unknown routing.
        """
        if routing not in ("topk", "causal"):
            raise ValueError(f"MoDTransformer: routing must be 'topk' or 'causal', got {routing!r}")
        self._check_idx(idx, "MoDTransformer")
        B, T = idx.shape
        if targets is not None and (
            not isinstance(targets, torch.Tensor) or targets.shape != idx.shape or targets.dtype != torch.int64
        ):
            got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"MoDTransformer: targets must be an int64 tensor of shape (B, T) = {tuple(idx.shape)}, "
                             f"got {got}")
        if targets is not None and targets.device.type == "cpu" and not torch.compiler.is_compiling():
            # As for idx: free on the CPU, a host sync elsewhere (there cross_entropy's own
            # device-side check reports it).
            bad = (targets != -100) & ((targets < 0) | (targets >= self.cfg.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"MoDTransformer: targets must be token ids in [0, vocab_size = "
                                 f"{self.cfg.vocab_size}) or -100 (ignored), got {int(targets[bad][0])}")
        if valid is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
            mod_positions = None
        else:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != idx.shape:
                got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
                raise ValueError(
                    f"MoDTransformer: valid must be a bool tensor of shape (B, T) = {tuple(idx.shape)}, got {got}"
                )
            positions = mod_positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        # The residual stream x is the model's own (a fresh embedding lookup), so MoD
        # layers may update it in place when no gradient is recorded.
        inplace = not torch.is_grad_enabled() and not return_routing
        x = self.wte(idx)  # (B, T, D)
        aux, outs = [], []
        for layer in self.layers:
            if isinstance(layer, MoDBlock):
                out = layer(x, valid=valid, routing=routing, positions=mod_positions, inplace=inplace)
                x = out.output
                if out.aux_loss is not None:
                    aux.append(out.aux_loss)
                if return_routing:
                    outs.append(out)
            else:
                x = x + layer(x, positions, valid)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = lm_loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            loss = lm_loss
            if aux_loss is not None and self.cfg.aux_loss_weight:
                loss = lm_loss + self.cfg.aux_loss_weight * aux_loss
        return MoDTransformerOutput(logits, loss, lm_loss, aux_loss, tuple(outs) if return_routing else None)

    @torch.no_grad()
    def routing_report(self, idx: Tensor) -> List[dict]:
        """Top-k routing of each MoD layer on idx (B, T), with the causal scores.

        Runs one forward in topk mode and returns, per MoD layer, a dict with
        ``layer`` (depth index), ``indices`` (B, C) int64, ``slot_mask`` (B, C) bool,
        ``router_logits`` (B, S) float32, ``causal_scores`` (B, S) float32 (predictor
        or router logits minus the layer's causal threshold: > 0 routes in causal mode)
        and ``causal_capacity`` (int).
        """
        outs = self(idx, routing="topk", return_routing=True).mod_layer_outputs
        return [
            dict(layer=depth, indices=o.routing.indices, slot_mask=o.routing.slot_mask,
                 router_logits=o.routing.router_logits.float(), causal_scores=o.causal_scores.float(),
                 causal_capacity=m.causal_capacity(idx.shape[1]))
            for depth, m, o in zip(self.mod_layer_ids, self.mod_layers, outs)
        ]

    @torch.no_grad()
    def calibrate_causal_routing(self, batches, rate: Optional[float] = None, *,
                                 return_router_thresholds: bool = False):
        """Calibrate every MoD layer's causal threshold on training text.

        Runs each batch in top-k mode and sets each layer's ``causal_threshold`` so that
        a fraction ``rate`` (default its capacity factor) of the valid tokens' causal
        logits exceed it (:func:`mod_ext.calibrated_threshold`). The language model is
        unchanged: only which tokens causal routing picks moves. Causal routing then
        routes about that fraction before its capacity cap, and a little less after it
        (a row whose tokens want more than the causal capacity drops the rest).

        Args:
            batches: an iterable of (B, T) int64 token ids, or of ``(idx, valid)`` pairs
                with a (B, T) bool valid mask (or None); B and T may differ per batch.
            rate: the fraction of tokens to route causally, in (0, 1] (default: each
                layer's capacity factor).
            return_router_thresholds: also return, from the same forward passes, the
                thresholds at which each layer's *router* logits route that fraction (the
                router rule, to compare a predictor with); nothing is set from them.

        Returns:
            The thresholds, one per MoD layer in depth order (``[]`` for a dense model,
            whose batches are not run); with ``return_router_thresholds`` a pair
            ``(thresholds, router_thresholds)``.

        Raises:
            ValueError: rate outside (0, 1]; no batches; a batch that is neither idx nor
                an (idx, valid) pair; bad idx/valid (as :meth:`forward`); no valid token;
                non-finite logits. The thresholds are then left as they were.
        """
        mods = self.mod_layers
        where = "MoDTransformer.calibrate_causal_routing"
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1):
            raise ValueError(f"{where}: rate must be a number in (0, 1], got {rate!r}")
        if not mods:
            return ([], []) if return_router_thresholds else []
        logits: List[List[Tensor]] = [[] for _ in mods]  # per layer: 1-D valid logits of each batch
        router: List[List[Tensor]] = [[] for _ in mods]  # the same for the router logits
        was_training, old = self.training, [m.causal_threshold.clone() for m in mods]
        self.eval()
        try:
            for m in mods:  # causal_scores are then the raw causal logits, bit for bit
                m.causal_threshold.zero_()
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    if len(batch) != 2:
                        raise ValueError(f"{where}: a batch must be idx (B, T) or a pair (idx, valid), "
                                         f"got a {type(batch).__name__} of {len(batch)} items")
                    idx, valid = batch
                else:
                    idx, valid = batch, None
                outs = self(idx, routing="topk", valid=valid, return_routing=True).mod_layer_outputs
                for i, o in enumerate(outs):
                    for store, z in ((logits, o.causal_scores), (router, o.routing.router_logits)):
                        if store is router and not return_router_thresholds:
                            continue
                        z = z.float()
                        store[i].append((z.flatten() if valid is None else z[valid]).cpu())
            if not logits[0]:
                raise ValueError(f"{where}: batches is empty")
            rates = [min(1.0, float(m.capacity_factor)) if rate is None else rate for m in mods]
            thresholds = [calibrated_threshold(torch.cat(z)[None], r, where=where) for r, z in zip(rates, logits)]
            router_thresholds = ([calibrated_threshold(torch.cat(z)[None], r, where=where)
                                  for r, z in zip(rates, router)] if return_router_thresholds else None)
        except BaseException:
            for m, t in zip(mods, old):
                m.causal_threshold.copy_(t)
            raise
        finally:
            self.train(was_training)
        for m, t in zip(mods, thresholds):
            m.causal_threshold.fill_(t)
        stored = [float(m.causal_threshold) for m in mods]
        return (stored, router_thresholds) if return_router_thresholds else stored

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Forward FLOPs per token at sequence length seq_len (default block_size), topk mode.

        Counted explicitly (a multiply-add = 2 FLOPs; norms, softmax, rotary, routing
        gather/scatter and the embedding lookup are ignored)::

            linear = 2 * (3 D^2 + D^2 + 3 D H)     # qkv, attn out, SwiGLU w1/w3/w2
            attn(n) = 2 * 2 * D * (n + 1) / 2      # QK^T and AV, causal average context
            dense layer = linear + attn(T)
            MoD layer   = (C / T) * (linear + attn(C))         # only C routed tokens, context C
                          + 2 D                                 # router logit
                          + 2 (D P + P) [predictor only]        # predictor MLP, width P
            total = sum over layers + 2 D V                     # lm head

        with D = d_model, H = mlp_hidden, V = vocab_size, C = capacity_for(T, c).
        Training FLOPs per token are taken as 3x this (forward + backward).
        """
        cfg = self.cfg
        T = seq_len or cfg.block_size
        D, H, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
        linear = 2 * (3 * D * D + D * D + 3 * D * H)

        def attn(n):
            return 2 * 2 * D * (n + 1) / 2

        total = 2 * D * V
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MoDBlock):
                C = capacity_for(T, layer.capacity_factor)
                total += (C / T) * (linear + attn(C)) + 2 * D
                if layer.predictor is not None:
                    lin1, lin2 = layer.predictor.net[0], layer.predictor.net[2]
                    total += 2 * (lin1.in_features * lin1.out_features + lin2.in_features * lin2.out_features)
            else:
                total += linear + attn(T)
        return float(total)

    # ----------------------------------------------------------------------------------
    # Sampling: thin conveniences over mod_ext.generation
    # ----------------------------------------------------------------------------------

    def allocate_cache(self, batch: int, max_len: Optional[int] = None, **kwargs) -> "MoDKVCache":
        """``mod_ext.generation.allocate_cache(self, batch, max_len, **kwargs)``: a
        fixed-size KV cache for ``batch`` sequences (see there)."""
        from . import generation

        return generation.allocate_cache(self, batch, max_len, **kwargs)

    def prefill(self, idx: Tensor, cache: "MoDKVCache", valid: Optional[Tensor] = None) -> Tensor:
        """``mod_ext.generation.prefill(self, idx, cache, valid)``: run the prompt (B, T)
        with causal routing, fill the cache; returns the last column's logits (B, V)."""
        from . import generation

        return generation.prefill(self, idx, cache, valid)

    def decode_step(self, tokens: Tensor, cache: "MoDKVCache") -> Tensor:
        """``mod_ext.generation.decode_step(self, tokens, cache)``: one token per
        sequence, tokens (B,) int64 -> logits (B, V)."""
        from . import generation

        return generation.decode_step(self, tokens, cache)

    def generate(self, idx: Tensor, max_new_tokens: int, *args, **kwargs):
        """``mod_ext.generation.generate(self, idx, max_new_tokens, ...)``: sample
        max_new_tokens tokens after idx (B, T); returns (B, T + max_new_tokens) int64
        (and the KV cache with ``return_cache=True``; see there)."""
        from . import generation

        return generation.generate(self, idx, max_new_tokens, *args, **kwargs)
