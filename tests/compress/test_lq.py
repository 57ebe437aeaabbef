"""lq: quantized + low-rank alternation, budgeted configuration choice, packed storage on disk."""

from __future__ import annotations

import pytest
import torch
from test_lord import end_to_end

from rankwise.compress.allocate import choose_configurations
from rankwise.compress.methods.lq import lq_decompose
from rankwise.errors import ConfigError
from rankwise.layers import QuantizedLinear, QuantizedLowRankLinear
from rankwise.layers.quantize import dequantize
from rankwise.models import count_parameters


def _low_rank_plus_noise(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(96, 6, generator=g), torch.randn(6, 128, generator=g)
    return a @ b + 0.05 * torch.randn(96, 128, generator=g)


def test_low_rank_term_absorbs_the_outliers_quantization_cannot():
    w = _low_rank_plus_noise()
    quant_only = lq_decompose(w, bits=3, rank=0)
    lq = lq_decompose(w, bits=3, rank=6)
    assert lq.error < 0.2 * quant_only.error
    recon = dequantize(lq.Q).double() + lq.L1 @ lq.L2
    assert float((w.double() - recon).pow(2).sum()) == pytest.approx(lq.error, rel=1e-6)


def test_fisher_rows_weight_the_error():
    w = _low_rank_plus_noise(1)
    f = torch.ones(96, dtype=torch.float64)
    f[:10] = 100.0  # ten important rows
    plain = lq_decompose(w, bits=2, rank=3)
    weighted = lq_decompose(w, bits=2, rank=3, row_weights=f)

    def row_error(res):
        return (w.double() - dequantize(res.Q).double() - res.L1 @ res.L2).pow(2).sum(1)

    assert row_error(weighted)[:10].sum() < row_error(plain)[:10].sum()
    assert float((f * row_error(weighted)).sum()) <= float((f * row_error(plain)).sum())


def test_choose_configurations_fits_the_budget_and_spends_it_well():
    costs = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]], dtype=torch.float64)
    errors = torch.tensor([[10.0, 5.0, 0.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
    assert choose_configurations(costs, errors, 2.0).tolist() == [0, 0]
    assert choose_configurations(costs, errors, 5.0).tolist() == [
        2,
        0,
    ]  # layer 0 gains most per unit
    assert choose_configurations(costs, errors, 100.0).tolist() == [2, 2]
    with pytest.raises(ConfigError, match="cheapest"):
        choose_configurations(costs, errors, 1.5)


def test_lq_end_to_end_counts_storage_honestly(tmp_path, texts):
    rel, res = end_to_end(
        "lq", {"bits": (2, 3, 4), "ranks": (0, 4), "iterations": 2}, 0.6, texts, out=tmp_path / "m"
    )
    kinds = {type(m) for m in res.model.modules()}
    assert kinds & {QuantizedLinear, QuantizedLowRankLinear}
    assert rel < 0.3
    # the file's tensor data is exactly what the count says: float32 tensors + packed codes +
    # scales (+ group minima for the affine format); the rest is the safetensors header
    path = res.path / "model.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - 8 - header == 4 * count_parameters(res.model)
    codes = [m.codes for m in res.model.modules() if isinstance(m, QuantizedLinear)]
    assert codes and all(c.dtype == torch.uint8 for c in codes)


def test_lq_options_are_validated():
    from rankwise.compress.base import get_method

    with pytest.raises(ConfigError, match="bits"):
        get_method("lq", bits=(1,))
    with pytest.raises(ConfigError, match="fmt"):
        get_method("lq", fmt="fp4")
    assert get_method("lq", fisher=True).needs == frozenset({"fisher"})


@pytest.mark.parametrize("shape", [(96, 128), (128, 96)])
def test_gram_svd_matches_lapack_on_the_leading_triplets(shape):
    from rankwise.compress.methods.lq import _svd

    g = torch.Generator().manual_seed(7)
    scales = torch.logspace(0, -3, min(shape), dtype=torch.float64)
    a = torch.randn(shape[0], min(shape), dtype=torch.float64, generator=g) * scales
    a = a @ torch.randn(min(shape), shape[1], dtype=torch.float64, generator=g)
    u, s, vh = _svd(a)
    ref_u, ref_s, ref_vh = torch.linalg.svd(a, full_matrices=False)
    assert torch.allclose(s, ref_s, atol=1e-9 * float(ref_s[0]))
    for r in (1, 16):
        assert torch.allclose((u[:, :r] * s[:r]) @ vh[:r], (ref_u[:, :r] * ref_s[:r]) @ ref_vh[:r], atol=1e-9)
