"""mod_ext: fast, static-shaped Mixture-of-Depths routing for PyTorch.

Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute in
transformer-based language models" (arXiv 2404.02258). See README.md.

Modules, in the direction data flows: :mod:`mod_ext.ops` (the compiled routing ops),
:mod:`mod_ext.layer` (the MoD layer) with :mod:`mod_ext.kv_cache` (its KV cache),
:mod:`mod_ext.models` (the reference MoD language model), :mod:`mod_ext.generation`
(sampling through the KV cache), :mod:`mod_ext.train` (training on one process or
many: DDP, FSDP2, distributed checkpoints), :mod:`mod_ext.demo` (these two need the
``[demo]`` extra: numpy, tqdm, matplotlib). Importing mod_ext needs only torch.
"""

from ._version import __version__
from .ops import (
    build_info,
    cuda_built,
    gather_tokens,
    router_logits,
    scatter_add_weighted,
    scatter_add_weighted_,
    threshold_route,
    topk_route,
)
from .health import RouterHealth, RouterHealthError
from .kv_cache import CachedBlock, DenseLayerCache, MoDLayerCache
from .layer import (
    MoDBlock,
    MoDBlockOutput,
    MoDOutput,
    MoDPredictor,
    RoutingMetrics,
    calibrated_threshold,
    capacity_for,
    default_decode_capacity,
    mod_block,
    router_aux_loss,
    routing_metrics,
    topk_targets,
)

__all__ = [
    "__version__",
    "cuda_built",
    "build_info",
    "topk_route",
    "threshold_route",
    "gather_tokens",
    "scatter_add_weighted",
    "scatter_add_weighted_",
    "router_logits",
    "capacity_for",
    "mod_block",
    "MoDOutput",
    "router_aux_loss",
    "topk_targets",
    "routing_metrics",
    "RoutingMetrics",
    "calibrated_threshold",
    "MoDPredictor",
    "MoDBlock",
    "MoDBlockOutput",
    "default_decode_capacity",
    "CachedBlock",
    "MoDLayerCache",
    "DenseLayerCache",
    "RouterHealth",
    "RouterHealthError",
]
