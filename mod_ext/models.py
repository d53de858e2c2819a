"""A small decoder-only transformer with Mixture-of-Depths layers (reference model).

nanoGPT-style: RMSNorm, rotary position embeddings on the TRUE token positions,
SwiGLU MLP, causal attention via ``F.scaled_dot_product_attention``. Every
``mod_every``-th layer (layers 1, 3, ... for mod_every=2) is wrapped in
:class:`mod_ext.MoDBlock`, so it processes only ``capacity_factor`` of the tokens
(paper: 12.5% on every other layer). ``mod_every=0`` gives the dense baseline with
the same parameters minus the routers/predictors.

Semantics: docs/MOD_SPEC.md sections 1, 3, 6; Raposo et al. 2024 (arXiv 2404.02258).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode as _decode
from .decode import MoDKVCache
from .layer import MoDBlock, capacity_for

__all__ = ["ModelConfig", "MoDTransformer", "Block", "dense_config", "apply_rotary"]


@dataclass
class ModelConfig:
    vocab_size: int = 256  # byte-level tokens
    block_size: int = 256  # max sequence length (rotary table length; fixes the causal capacity)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_hidden: Optional[int] = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to 32
    capacity_factor: float = 0.125  # fraction of tokens a MoD layer processes (paper: 0.125)
    mod_every: Optional[int] = 2  # layer i is MoD when i % mod_every == mod_every - 1; 0/None = dense
    router_activation: str = "sigmoid"  # "sigmoid" (bounded) or "identity" (paper's raw scalar)
    causal_router: str = "predictor"  # what routes in causal mode: "predictor" or "router" (aux loss)
    aux_loss_weight: float = 0.1  # weight of the MoD layers' aux loss (predictor BCE or router BCE)
    predictor_hidden: Optional[int] = None  # predictor MLP width; None = max(16, d_model // 4)
    rope_base: float = 10000.0  # rotary frequency base

    def __post_init__(self):
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


# write(k, v) stores new keys/values (N, T, nh, hs); read() -> (keys (N, L, nh, hs),
# values (N, L, nh, hs), key_mask (N, L) bool): see CausalSelfAttention.forward_cached.
KVWrite = Callable[[Tensor, Tensor], None]
KVRead = Callable[[], Tuple[Tensor, Tensor, Tensor]]


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
        """One new token per row against a KV cache (decoding).

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
    """Pre-norm transformer block that returns only its residual update f(x)."""

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


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class MoDTransformer(nn.Module):
    """Decoder-only transformer; layers with ``cfg.is_mod_layer(i)`` are MoD layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
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
        self.last_aux_loss: Optional[Tensor] = None
        self._decode_graphs: dict = {}  # (B, max_len, ...) -> decode.DecodeGraph (generate(cuda_graph=True))
        self.last_decode_cache: Optional[MoDKVCache] = None  # the cache of the last generate(use_cache=True)

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

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, routing: str = "topk",
                valid: Optional[Tensor] = None):
        """Logits and (optionally) the training loss.

        Args:
            idx: (B, T) int64 token ids, T <= block_size.
            targets: optional (B, T) int64 next-token ids (-100 = ignored, e.g. padding).
            routing: "topk" (expert-choice, training; uses future tokens within the
                sequence) or "causal" (predictor/router logit > 0, first come first
                served; for sampling).
            valid: optional (B, T) bool, False for padding tokens: they are never
                attended to or routed, and each row's true positions count only its
                valid tokens (so left-padded prompts get positions 0, 1, ...).

        Returns:
            ``(logits (B, T, V) float, loss)``: loss = cross-entropy + aux_loss_weight *
            sum of the MoD layers' aux losses (topk mode), or None without targets.
            After the call each MoDBlock holds ``last_output`` (indices, slot_mask, ...)
            and ``aux_loss``; ``self.last_aux_loss`` holds the summed aux loss.
        """
        if routing not in ("topk", "causal"):
            raise ValueError(f"MoDTransformer: routing must be 'topk' or 'causal', got {routing!r}")
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"MoDTransformer: sequence length {T} > block_size {self.cfg.block_size}")
        if valid is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
            mod_positions = None
        else:
            if valid.dtype != torch.bool or valid.shape != idx.shape:
                raise ValueError(
                    f"MoDTransformer: valid must be a bool tensor of shape (B, T) = {tuple(idx.shape)}, got "
                    f"{valid.dtype} {tuple(valid.shape)}"
                )
            positions = mod_positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        x = self.wte(idx)  # (B, T, D)
        aux = []
        for layer in self.layers:
            if isinstance(layer, MoDBlock):
                x = layer(x, valid=valid, routing=routing, positions=mod_positions)
                if layer.aux_loss is not None:
                    aux.append(layer.aux_loss)
            else:
                x = x + layer(x, positions, valid)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        self.last_aux_loss = torch.stack(aux).sum() if aux else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            if self.last_aux_loss is not None and self.cfg.aux_loss_weight:
                loss = loss + self.cfg.aux_loss_weight * self.last_aux_loss
        return logits, loss

    @torch.no_grad()
    def routing_report(self, idx: Tensor) -> List[dict]:
        """Top-k routing of each MoD layer on idx (B, T), with the causal scores.

        Runs one forward in topk mode and returns, per MoD layer, a dict with
        ``layer`` (depth index), ``indices`` (B, C) int64, ``slot_mask`` (B, C) bool,
        ``router_logits`` (B, S) float32, ``causal_scores`` (B, S) float32 (predictor
        or router logits, > 0 routes in causal mode) and ``causal_capacity`` (int).
        """
        self(idx, routing="topk")
        report = []
        for depth, m in zip(self.mod_layer_ids, self.mod_layers):
            out = m.last_output
            report.append(dict(
                layer=depth, indices=out.indices, slot_mask=out.slot_mask,
                router_logits=out.router_logits.float(), causal_scores=m.last_scores.float(),
                causal_capacity=m.causal_capacity(idx.shape[1]),
            ))
        return report

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
    # Sampling with a KV cache (mod_ext.decode)
    # ----------------------------------------------------------------------------------

    def allocate_cache(
        self, batch: int, max_len: Optional[int] = None, *, cache_capacity_factor: Optional[float] = None,
        decode_capacity: Optional[int] = None, static: Optional[bool] = None,
    ) -> MoDKVCache:
        """A fixed-size KV cache for ``batch`` sequences of up to ``max_len`` columns
        (a column is one token position of the left-padded batch).

        Dense layers hold (batch, max_len, n_head, head_size) keys and values; each MoD
        layer holds only its routed tokens in a fixed number of cache slots per
        sequence (see cache_capacity_factor; +1 scratch slot) and a fill count. The
        cache lives on the model's device in the model's dtype (move/cast the model
        first).

        Args:
            batch: B, sequences decoded together.
            max_len: columns (prompt + generated tokens, left padding included);
                default and maximum ``block_size``.
            cache_capacity_factor: MoD cache slots as a fraction of max_len, in (0, 1]:
                ``capacity_for(max_len, cache_capacity_factor)`` slots, at most K =
                ``capacity_for(block_size, capacity_factor)``, the most tokens the causal
                routing rule ever routes (more could never be filled). Default: ``min(
                max_len, K)`` slots, so the cache never fills before the rule does and
                decoding matches a full recompute (at max_len = block_size that is about
                capacity_factor of a dense layer's memory; a shorter max_len saves less
                in proportion). A smaller factor saves memory but drops tokens the
                recompute would route (counted in ``cache.overflow``).
            decode_capacity: block slots per MoD layer in one decode step (an int in
                [1, B]); default :func:`mod_ext.decode.default_decode_capacity`
                (ceil(c*B) plus three binomial standard deviations of headroom).
            static: which decode path the cache's steps take (the storage is fixed-size
                either way). True = the static path: static-shaped, sync-free steps
                (each MoD layer runs its block on decode_capacity rows, padding
                included; needed for CUDA graphs and torch.compile). False = the dynamic
                path, eager only: the block runs on the routed rows only and is skipped
                when none is routed (same results; one host read of the routing decision
                per MoD layer). Default: True on CUDA, False on the CPU.

        Raises:
            ValueError: an argument out of range (the message names it).
        """
        return _decode.allocate_cache(self, batch, max_len, cache_capacity_factor=cache_capacity_factor,
                                      decode_capacity=decode_capacity, static=static)

    def prefill(self, idx: Tensor, cache: MoDKVCache, valid: Optional[Tensor] = None) -> Tensor:
        """Run the prompt idx (B, T) int64 through the model with causal routing and fill
        the cache (resetting it first); returns the last column's logits (B, V).

        MoD layers route causally (as ``forward(routing="causal")``) and cache only the
        routed tokens. ``valid`` (B, T) bool marks left-padded prompts (False...False
        True...True per row); true positions count valid tokens only.

        Raises:
            ValueError: shapes, batch or device that do not match the cache, T > max_len,
                or a valid mask that is not left padding.
        """
        return _decode.prefill(self, idx, cache, valid)

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, cache: MoDKVCache) -> Tensor:
        """Advance every sequence by one token: tokens (B,) int64 -> logits (B, V).

        Dense layers append the token's key/value at the next column and attend to the
        row's valid columns. At each MoD layer the B tokens are routed causally
        (score > 0, cache not full, sequence active); the ``cache.decode_capacity``
        highest-scoring of them run the block against their own cached routed tokens
        and the rest are dropped and counted in ``cache.drops``. With a static cache
        (``cache.static``, the default on CUDA) the step is static-shaped and free of
        host syncs (CUDA-graph capturable; see ``generate(cuda_graph=True)``); with a
        dynamic one (the CPU default) MoD layers run their block on the routed rows only.

        To compile a step, compile this method (``torch.compile(model.decode_step,
        fullgraph=True)``) on a static cache, or compile
        ``mod_ext.decode.decode_step(model, tokens, cache)`` and add 1 to
        ``cache.n_written`` after each call (the host-side column count this method checks).

        Raises:
            ValueError: tokens not (B,) int64 on the cache's device, token ids outside the
                vocabulary (checked on the CPU only: on CUDA it would be a host sync), an
                empty (not prefilled) cache, a full one (max_len columns written), or a
                cache allocated for another model configuration, device or dtype.
        """
        _decode.check_decode_inputs(tokens, cache)
        _decode.check_cache_matches(self, cache, "decode_step")
        # Free on the CPU; on CUDA (and inside torch.compile) it would be a host sync.
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            _decode.check_token_ids(tokens, self.cfg.vocab_size, "decode_step", "tokens")
        logits = _decode.decode_step(self, tokens, cache)
        cache.n_written += 1
        return logits

    def clear_decode_graphs(self) -> None:
        """Drop the CUDA graphs (and their caches) kept by ``generate(cuda_graph=True)``.
        Call it after moving the model or replacing (not updating in place) parameters."""
        self._decode_graphs.clear()

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        routing: str = "causal",
        generator: Optional[torch.Generator] = None,
        *,
        valid: Optional[Tensor] = None,
        stop_tokens: Optional[Sequence[int]] = None,
        pad_token: Optional[int] = None,
        use_cache: bool = True,
        cuda_graph: bool = False,
        max_len: Optional[int] = None,
        decode_capacity: Optional[int] = None,
        cache_capacity_factor: Optional[float] = None,
        static: Optional[bool] = None,
    ) -> Tensor:
        """Sample max_new_tokens tokens after idx (B, T) int64; returns (B, T + max_new_tokens).

        With ``use_cache=True`` (default) the prompt is prefilled into a
        :class:`~mod_ext.decode.MoDKVCache` and every further token costs one
        :meth:`decode_step` (MoD layers cache only their routed tokens; docs/MOD_SPEC.md
        section 4); ``self.last_decode_cache`` keeps the cache (its ``drops`` count the
        routed-but-dropped tokens per MoD layer, ``overflow`` those a full recompute
        would not drop; None after a call without the cache). With ``use_cache=False``
        the whole context (cropped to block_size) is recomputed for every token.

        Args:
            idx: (B, T) int64 prompts, left-padded when ``valid`` is given.
            max_new_tokens: tokens to sample (an int >= 0).
            temperature: 0 = greedy (argmax); else the softmax temperature (> 0; inf
                samples uniformly among the allowed tokens).
            top_k: sample among the top_k most likely tokens only.
            routing: "causal" (default; the only choice with the cache) or "topk" (full
                recompute only; not causal).
            generator: torch.Generator for reproducible sampling.
            valid: (B, T) bool, False for left padding (prompts of different lengths).
            stop_tokens: a token id or ids that end a sequence (the stop token is kept);
                later positions get pad_token (an id in the vocabulary; default: the
                first stop token). A finished sequence stops routing.
            use_cache: KV-cache decoding (True) or full recompute (False).
            cuda_graph: capture the decode step in a CUDA graph once per (B, max_len,
                decode_capacity, cache_capacity_factor, device, dtype) and replay it
                (CUDA only; the graph and its cache are kept until
                :meth:`clear_decode_graphs`).
            max_len: cache columns (default block_size); needs T + max_new_tokens - 1 <= max_len.
            decode_capacity, cache_capacity_factor, static: see :meth:`allocate_cache`
                (cuda_graph=True always uses a static cache). max_len and these apply to
                the cache only (ValueError with use_cache=False).

        Raises:
            ValueError: bad prompt / valid mask, token ids outside the vocabulary (idx,
                stop_tokens, pad_token), a prompt + new tokens that do not fit the cache,
                cuda_graph=True off CUDA, routing="topk" with the cache, cache options
                without the cache, a negative or NaN temperature.
        """
        if idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.int64:
            raise ValueError(
                f"generate: idx must be a (B, T) int64 prompt with T >= 1, got {idx.dtype} {tuple(idx.shape)}"
            )
        max_new_tokens = _decode.as_int(max_new_tokens, "max_new_tokens", 0)
        if top_k is not None:
            top_k = _decode.as_int(top_k, "top_k", 1)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"generate: temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if routing not in ("causal", "topk"):
            raise ValueError(f"generate: routing must be 'causal' or 'topk', got {routing!r}")
        _decode.check_token_ids(idx, self.cfg.vocab_size, "generate", "idx")
        if valid is not None:
            valid = _decode._check_valid_prompt(idx, valid, "generate")
        if pad_token is not None and stop_tokens is None:
            raise ValueError("generate: pad_token only fills the positions after a stop token; pass stop_tokens too")
        stop_tokens, pad_token = _decode.normalize_stop_tokens(stop_tokens, pad_token, self.cfg.vocab_size)
        self.last_decode_cache = None
        if max_new_tokens == 0:
            return idx.clone()
        if use_cache:
            if routing != "causal":
                raise ValueError("generate: routing='topk' looks at future tokens and cannot use the KV cache; "
                                 "pass use_cache=False")
            return _decode.generate_cached(
                self, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                valid=valid, stop_tokens=stop_tokens, pad_token=pad_token, cuda_graph=cuda_graph,
                max_len=max_len, decode_capacity=decode_capacity, cache_capacity_factor=cache_capacity_factor,
                static=static,
            )
        cache_opts = dict(max_len=max_len, decode_capacity=decode_capacity,
                          cache_capacity_factor=cache_capacity_factor, static=static)
        given = [k for k, v in cache_opts.items() if v is not None]
        if given:
            raise ValueError(f"generate: {', '.join(given)}: cache options, valid only with use_cache=True")
        if cuda_graph:
            raise ValueError("generate: cuda_graph=True needs use_cache=True")
        stops = None if stop_tokens is None else torch.tensor(stop_tokens, dtype=torch.int64, device=idx.device)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.cfg.block_size:]
            valid_cond = None if valid is None else valid[:, -self.cfg.block_size:]
            logits, _ = self(idx_cond, routing=routing, valid=valid_cond)
            nxt = _decode.sample_next(logits[:, -1, :], temperature, top_k, generator)  # (B,)
            nxt = _decode.apply_stop_tokens(nxt, finished, stops, pad_token)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            if valid is not None:
                valid = torch.cat((valid, torch.ones_like(valid[:, :1])), dim=1)
        return idx
