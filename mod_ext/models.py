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
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        x: (B, nh, T, hs) queries or keys.
        cos, sin: (B, 1, T, hs/2), the angles of each token's true position.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
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
        """positions (B, T) int64 -> (cos, sin), each (B, 1, T, hs/2)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings and an optional slot mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_head, cfg.block_size, cfg.rope_base)

    def forward(self, x: Tensor, positions: Tensor, slot_mask: Optional[Tensor] = None) -> Tensor:
        B, T, D = x.shape
        hs = D // self.n_head
        q, k, v = self.qkv(x).split(D, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        cos, sin = self.rotary(positions)
        q, k = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        if slot_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Causal in slot order (slots are ascending positions); keys in padding slots are
            # ignored; the diagonal keeps every query row non-empty (no NaN for padding rows).
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal & (slot_mask[:, None, None, :] | eye)  # (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.proj(y)


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

    def forward(self, x: Tensor, positions: Tensor, slot_mask: Optional[Tensor] = None) -> Tensor:
        """The update ``u1 + u2`` (B, T, D), without the residual.

        Args:
            x: (B, T, D) tokens (all tokens, or the C routed tokens of a MoD layer).
            positions: (B, T) int64 true positions (ascending in each row).
            slot_mask: (B, T) bool, False for padding slots whose keys are ignored;
                None = all real tokens (uses the fast ``is_causal`` path).
        """
        u1 = self.attn(self.norm1(x), positions, slot_mask)
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

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, routing: str = "topk"):
        """Logits and (optionally) the training loss.

        Args:
            idx: (B, T) int64 token ids, T <= block_size.
            targets: optional (B, T) int64 next-token ids.
            routing: "topk" (expert-choice, training; uses future tokens within the
                sequence) or "causal" (predictor/router logit > 0, first come first
                served; for sampling).

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
        positions = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
        x = self.wte(idx)  # (B, T, D)
        aux = []
        for layer in self.layers:
            if isinstance(layer, MoDBlock):
                x = layer(x, routing=routing)
                if layer.aux_loss is not None:
                    aux.append(layer.aux_loss)
            else:
                x = x + layer(x, positions)
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

    @torch.no_grad()
    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        routing: str = "causal",
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Sample max_new_tokens tokens after idx (B, T) int64; returns (B, T + new).

        Recomputes the whole (cropped to block_size) context each step (no KV cache).
        MoD layers route causally (``cfg.causal_router``: predictor or router logit > 0),
        which never looks at future tokens; routing="topk" is allowed but not causal.

        Raises:
            ValueError: idx is not (B, T) int64 with T >= 1.
        """
        if idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.int64:
            raise ValueError(
                f"generate: idx must be a (B, T) int64 prompt with T >= 1, got {idx.dtype} {tuple(idx.shape)}"
            )
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.cfg.block_size:]
            logits, _ = self(idx_cond, routing=routing)
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
