import pytest
import torch

from moecompress.merge import subspace
from moecompress.merge.subspace import merge_average, merge_subspace, rank_for


def _members(n: int, out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(3, 16, 24), (4, 24, 8), (2, 8, 8)])
def test_untruncated_subspace_equals_weighted_average(shape):
    w = _members(*shape)
    f = torch.tensor([0.5, 0.1, 0.3, 0.1][: shape[0]], dtype=torch.float64)
    merged = merge_subspace(w, f, rank=None)
    expected = (f[:, None, None] * w).sum(0) / f.sum()
    assert torch.allclose(merged, expected, atol=1e-10)
    assert torch.allclose(merge_average(w, f), expected, atol=1e-12)


def test_identical_members_return_that_expert():
    # Catches a wrong V split (row-major reshape of V instead of column blocks): blocks would be mixed up.
    one = _members(1, 12, 20)[0]
    w = one.expand(3, -1, -1).clone()
    merged = merge_subspace(w, torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64), rank=None)
    assert torch.allclose(merged, one, atol=1e-10)
    # The concatenation has rank rank(one) = 12, so any rank >= 12 is still exact.
    assert torch.allclose(merge_subspace(w, torch.ones(3, dtype=torch.float64), rank=12), one, atol=1e-10)


def test_v_blocks_are_column_blocks():
    # Members with disjoint weights: full-rank merge with a one-hot frequency returns exactly that member.
    w = _members(3, 10, 6, seed=3)
    for i in range(3):
        f = torch.zeros(3, dtype=torch.float64)
        f[i] = 1.0
        assert torch.allclose(merge_subspace(w, f), w[i], atol=1e-10)


def test_truncation_error_decreases_with_rank_and_keeps_dtype():
    w = _members(4, 32, 16, seed=1).float()
    f = torch.ones(4)
    avg = merge_average(w, f)
    errs = [float((merge_subspace(w, f, rank=r) - avg).norm()) for r in (4, 8, 16, 32)]
    assert all(a >= b - 1e-5 for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 1e-4 * float(avg.norm())
    assert merge_subspace(w.bfloat16(), f, rank=8).dtype == torch.bfloat16


def test_zero_frequency_cluster_falls_back_to_uniform():
    w = _members(2, 4, 4)
    assert torch.allclose(merge_subspace(w, torch.zeros(2, dtype=torch.float64)), w.mean(0), atol=1e-10)


def test_rank_for():
    assert rank_for(128, 256, 3, None, None) == 128
    assert rank_for(128, 256, 3, 40, 0.1) == 40
    assert rank_for(128, 256, 3, None, 0.5) == 64
    assert rank_for(256, 64, 2, None, 0.25) == 32
    assert rank_for(8, 8, 2, 1000, None) == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("block_bytes", [1, 8 * 3 * 24 * 5, 1 << 25])  # a row, 5 rows, all rows at a time
def test_average_in_row_blocks_is_bit_for_bit(monkeypatch, dtype, block_bytes):
    """merge_average's float64 rows a block at a time give the one-product average, rounded once, bit for bit."""
    w = _members(3, 37, 24, seed=5).to(dtype)
    f = torch.tensor([0.2, 0.5, 0.3])
    whole = torch.einsum("n,noi->oi", f.double() / f.double().sum(), w.to(torch.float64))
    for out_dtype in (None, torch.bfloat16):
        monkeypatch.setattr(subspace, "AVERAGE_BLOCK_BYTES", block_bytes)
        got = merge_average(w, f, out_dtype)
        assert got.dtype == (out_dtype or dtype)
        assert torch.equal(got, whole.to(out_dtype or dtype))
