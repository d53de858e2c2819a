"""mod_ext/_args.py: one rule for integer and real arguments across the Python API
(NumPy scalars accepted where Python numbers are; bools refused), with errors that name
the argument."""

import math

import pytest
import torch

import mod_ext
from mod_ext._args import as_int, as_real
from mod_ext.models import ModelConfig, MoDTransformer

np = pytest.importorskip("numpy")


def test_as_int():
    assert as_int(np.int64(5), "n", 1) == 5 and type(as_int(np.int64(5), "n", 1)) is int
    assert as_int(torch.tensor(3), "n", 0) == 3  # a 0-d integer tensor has __index__
    assert as_int(None, "n", 1, allow_none=True) is None
    for bad in (True, np.bool_(True), 2.0, "3", np.float64(2.0), None, [1]):
        with pytest.raises(ValueError, match="f: n must be an int >= 1"):
            as_int(bad, "n", 1, where="f")
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 4\), got 4"):
        as_int(4, "n", 0, 4)


def test_as_real():
    assert as_real(np.float32(0.5), "t", "f", low=0.0) == 0.5
    assert as_real(math.inf, "t", "f", low=0.0) == math.inf
    for bad in (True, np.bool_(False), float("nan"), -1.0, "1", None, torch.tensor(1.0)):
        with pytest.raises(ValueError, match="f: t must be"):
            as_real(bad, "t", "f", low=0.0)


class _Update(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, positions, slot_mask):
        return self.lin(x)


def test_numpy_scalars_through_the_api():
    blk = mod_ext.MoDBlock(_Update(8), np.int64(8), max_seq_len=np.int32(16))
    assert blk.d_model == 8 and type(blk.d_model) is int and blk.max_seq_len == 16
    cfg = ModelConfig(vocab_size=np.int64(32), block_size=np.int64(16), n_layer=np.int64(2), n_head=2,
                      d_model=np.int16(16), capacity_factor=np.float32(0.25))
    assert type(cfg.block_size) is int and cfg.block_size == 16
    model = MoDTransformer(cfg).eval()
    cache = model.allocate_cache(batch=np.int64(2), max_len=np.int64(16), decode_capacity=np.int64(1))
    assert cache.batch == 2 and cache.max_len == 16
    lc = mod_ext.MoDLayerCache(np.int64(2), np.int64(4), np.int64(4), np.int64(2), np.int64(8),
                               dtype=torch.float32, device="cpu")
    assert lc.batch == 2
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 32, (2, 3), generator=g)
    out_np = model.generate(idx, np.int64(4), temperature=np.float32(0.8), top_k=np.int64(5),
                            generator=torch.Generator().manual_seed(1))
    out_py = model.generate(idx, 4, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_np, out_py)


def test_bools_are_not_numbers_in_the_api():
    with pytest.raises(ValueError, match="MoDBlock: d_model"):
        mod_ext.MoDBlock(_Update(8), True)
    with pytest.raises(ValueError, match="ModelConfig: block_size"):
        ModelConfig(block_size=np.bool_(True))
    model = MoDTransformer(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16)).eval()
    with pytest.raises(ValueError, match="allocate_cache: max_len"):
        model.allocate_cache(batch=1, max_len=True)
    with pytest.raises(ValueError, match="generate: temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=True)
