"""Helpers shared by the mod_ext tests (import as ``from tests.helpers import ...``): devices, tolerances, input makers, comparisons.

Inputs are always generated on the CPU with a seeded ``torch.Generator`` and then moved
to the device under test, so a CUDA run compares against the oracle on the very same
values as the CPU run.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import pytest
import torch

import mod_ext

# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


def _cuda_skip_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "CUDA tests need a GPU: torch.cuda.is_available() is False on this machine"
    if not mod_ext.cuda_built():
        return (
            "mod_ext was built without its CUDA kernels (mod_ext.cuda_built() is False); "
            "rebuild with `pip install --no-build-isolation -e .` on a CUDA machine"
        )
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
CUDA_OK = CUDA_SKIP_REASON is None
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=CUDA_SKIP_REASON or "")

#: parametrize over this: ``@pytest.mark.parametrize("device", DEVICES)``
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

ROUTE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DATA_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (rtol, atol) per dtype, for results that are not bit-exact by construction (sums in a
# different order). Exact results are compared with assert_bitwise_equal.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if a.dtype == torch.bool or not (a.is_floating_point() or b.is_floating_point()):
        return float((a.long() - b.long()).abs().max())
    d = (a.double() - b.double()).abs()
    both_nan = torch.isnan(a.double()) & torch.isnan(b.double())
    d = torch.where(both_nan, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, ctx: str = "") -> None:
    """Same shape, dtype, device type and bits (NaN payloads and the sign of zero count)."""
    assert actual.shape == expected.shape, f"{ctx}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{ctx}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu().contiguous()
    e = expected.detach().cpu().contiguous()
    if a.dtype in _INT_VIEW:
        av, ev = a.view(_INT_VIEW[a.dtype]), e.view(_INT_VIEW[e.dtype])
    else:
        av, ev = a, e
    if torch.equal(av, ev):
        return
    bad = (av != ev).nonzero()
    first = tuple(bad[0].tolist())
    raise AssertionError(
        f"{ctx}: {bad.shape[0]} of {a.numel()} elements differ (bitwise); "
        f"max abs difference {_max_abs_diff(a, e):.6g}; first at {first}: "
        f"actual {a[first].item()!r} vs expected {e[first].item()!r}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    ctx: str = "",
    dtype: Optional[torch.dtype] = None,
    scale: float = 1.0,
) -> None:
    """allclose with the (rtol, atol) of ``dtype`` (default: expected.dtype); atol is
    multiplied by ``scale`` (use the magnitude of the summed terms)."""
    assert actual.shape == expected.shape, f"{ctx}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{ctx}: dtype {actual.dtype} != {expected.dtype}"
    rtol, atol = TOL[dtype or expected.dtype]
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    torch.testing.assert_close(
        a,
        e,
        rtol=rtol,
        atol=atol * scale,
        equal_nan=True,
        msg=lambda m: f"{ctx}: max abs difference {_max_abs_diff(a, e):.6g}\n{m}",
    )


def _assert_rows_equal(name: str, got: torch.Tensor, want: torch.Tensor, ctx: str, detail: str = "") -> None:
    """AssertionError naming the first rows where two (B, C) CPU tensors differ."""
    if torch.equal(got, want):
        return
    rows = (got != want).any(dim=1).nonzero().flatten().tolist()
    r = rows[0]
    raise AssertionError(
        f"{ctx}: {name}: rows {rows[:8]} differ{detail}; row {r}: got {got[r].tolist()}, want {want[r].tolist()}"
    )


def assert_routing_equal(actual: Tuple[torch.Tensor, torch.Tensor], expected, ctx: str = "") -> None:
    idx, mask = actual
    eidx, emask = expected
    assert idx.dtype == torch.int64, f"{ctx}: indices dtype {idx.dtype}, want int64"
    assert mask.dtype == torch.bool, f"{ctx}: slot_mask dtype {mask.dtype}, want bool"
    assert idx.shape == eidx.shape, f"{ctx}: indices shape {tuple(idx.shape)} != {tuple(eidx.shape)}"
    assert mask.shape == emask.shape, f"{ctx}: slot_mask shape {tuple(mask.shape)} != {tuple(emask.shape)}"
    idx_c, eidx_c = idx.cpu(), eidx.cpu()
    _assert_rows_equal("indices", idx_c, eidx_c, ctx, f" (max abs difference {_max_abs_diff(idx_c, eidx_c)})")
    _assert_rows_equal("slot_mask", mask.cpu(), emask.cpu(), ctx)


# --------------------------------------------------------------------------------------
# Strided views
# --------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def strided(values: torch.Tensor, layout: str, requires_grad: bool = False):
    """Return ``(leaf, view)``: ``view`` is what the op gets, ``leaf`` the tensor that
    owns the storage (and the .grad). ``view`` equals ``values`` except for
    ``layout="expanded"``, where it is row 0 of ``values`` broadcast over dim 0 (stride 0).

    * contiguous: a fresh contiguous copy.
    * transposed: all dims reversed in memory (column-major for 2-D).
    * sliced: every other element of a wider last dim, at a storage offset of 1.
    * expanded: stride 0 along dim 0.
    """
    if layout == "contiguous":
        leaf = values.clone().requires_grad_(requires_grad)
        return leaf, leaf
    if layout == "transposed":
        perm = list(range(values.dim()))[::-1]
        leaf = values.permute(perm).contiguous().requires_grad_(requires_grad)
        return leaf, leaf.permute(perm)
    if layout == "sliced":
        shape = list(values.shape)
        shape[-1] = 2 * shape[-1] + 1
        storage = torch.zeros(shape, dtype=values.dtype, device=values.device)
        storage[..., 1::2] = values
        leaf = storage.requires_grad_(requires_grad)
        return leaf, leaf[..., 1::2]
    if layout == "expanded":
        leaf = values[:1].clone().requires_grad_(requires_grad)
        return leaf, leaf.expand(values.shape)
    raise ValueError(layout)


def expanded_values(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The values ``strided(values, layout)[1]`` holds."""
    return values[:1].expand(values.shape) if layout == "expanded" else values


# --------------------------------------------------------------------------------------
# Input makers (CPU, seeded)
# --------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LOGIT_KINDS = ["randn", "ties", "all_equal", "special", "sparse_special"]

_TIE_SET = torch.tensor([-1.0, -0.0, 0.0, 0.5, 1.0, 2.0])
_SPECIAL_SET = torch.tensor(
    [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, -1.0, 1e-3, -1e-3, 65504.0, -65504.0]
)


def make_logits(kind: str, B: int, S: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(B, S) router logits / scores of the given kind, in ``dtype``, on the CPU."""
    if kind == "randn":
        v = torch.randn(B, S, generator=g)
    elif kind == "ties":  # many duplicates, including -0.0 vs 0.0
        v = _TIE_SET[torch.randint(len(_TIE_SET), (B, S), generator=g)]
    elif kind == "all_equal":
        v = torch.full((B, S), 0.25)
    elif kind == "special":  # NaN, +-inf, +-0, duplicates
        v = _SPECIAL_SET[torch.randint(len(_SPECIAL_SET), (B, S), generator=g)]
    elif kind == "sparse_special":  # mostly ordinary numbers with a few NaN / inf
        v = torch.randn(B, S, generator=g)
        r = torch.rand(B, S, generator=g)
        v = torch.where(r < 0.1, torch.full_like(v, float("nan")), v)
        v = torch.where((r >= 0.1) & (r < 0.15), torch.full_like(v, -float("inf")), v)
        v = torch.where((r >= 0.15) & (r < 0.18), torch.full_like(v, float("inf")), v)
    else:
        raise ValueError(kind)
    return v.to(dtype)


VALID_KINDS = [None, "random", "few", "all_invalid_row"]


def make_valid(kind: Optional[str], B: int, S: int, C: int, g: torch.Generator) -> Optional[torch.Tensor]:
    """(B, S) bool valid mask, or None.

    random: ~70% valid. few: fewer than C valid tokens per row where possible (padding).
    all_invalid_row: random, with row 0 entirely invalid.
    """
    if kind is None:
        return None
    if kind == "random":
        return torch.rand(B, S, generator=g) < 0.7
    if kind == "few":
        v = torch.zeros(B, S, dtype=torch.bool)
        for b in range(B):
            n = int(torch.randint(0, max(C, 1), (1,), generator=g))  # 0 .. C-1 valid
            pos = torch.randperm(S, generator=g)[:n]
            v[b, pos] = True
        return v
    if kind == "all_invalid_row":
        v = torch.rand(B, S, generator=g) < 0.7
        if B > 0:
            v[0] = False
        return v
    raise ValueError(kind)


def rand_indices(B: int, S: int, C: int, g: torch.Generator, ascending: bool = True) -> torch.Tensor:
    """(B, C) int64 positions, unique within each row."""
    idx = torch.rand(B, S, generator=g).argsort(dim=1)[:, :C]
    return idx.sort(dim=1).values if ascending else idx


def capacities(S: int) -> Sequence[int]:
    """1, S, and a couple in between."""
    return sorted({1, S, max(1, S // 2), max(1, (S + 2) // 3), max(1, S - 1)})


def to(t: Optional[torch.Tensor], device: str) -> Optional[torch.Tensor]:
    return None if t is None else t.to(device)


def rerun_on(device: str, fn: Callable, *args):
    """Call fn with every tensor argument moved to ``device``."""
    return fn(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
