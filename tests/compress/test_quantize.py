"""Group-wise quantizer: codebooks, bit packing, error vs bits, exact storage accounting."""

from __future__ import annotations

import pytest
import torch

from rankwise.errors import ConfigError, ShapeError
from rankwise.layers.quantize import (
    codebook,
    dequantize,
    pack_codes,
    quantize,
    quantize_dequantize,
    storage_bits,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebooks_are_sorted_in_unit_interval_with_exact_zero(bits):
    nf, uniform = codebook(bits, "nf"), codebook(bits, "int")
    assert len(nf) == 2**bits and len(uniform) == 2**bits - 1
    for levels in (nf, uniform):
        assert torch.all(levels[1:] > levels[:-1])
        assert float(levels.min()) == -1.0 and float(levels.max()) == 1.0
        assert 0.0 in levels.tolist()
    assert torch.allclose(uniform, -uniform.flip(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_error_falls_with_bits_and_stays_within_half_a_level():
    w = torch.randn(70, 130, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in (2, 3, 4, 8):
        q = quantize(w, bits=bits, fmt="int", group_size=64)
        errors.append(float((dequantize(q) - w).norm() / w.norm()))
        # symmetric int grid: every value within half a step of its group's scale
        flat = torch.cat([w.reshape(-1), w.new_zeros((-w.numel()) % 64)]).view(-1, 64)
        step = flat.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        deq = torch.cat([dequantize(q).reshape(-1), w.new_zeros((-w.numel()) % 64)]).view(-1, 64)
        assert torch.all((deq - flat).abs() <= step / 2 * 1.01 + 1e-6)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_nf4_beats_int4_on_gaussian_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    nf = (quantize_dequantize(w, bits=4, fmt="nf") - w).norm()
    uniform = (quantize_dequantize(w, bits=4, fmt="int") - w).norm()
    assert nf < uniform


def test_storage_bits_counts_the_stored_tensors_exactly():
    w = torch.randn(33, 50)
    q = quantize(w, bits=3, group_size=64)
    stored = q.codes.numel() * 8 + q.scales.numel() * 16
    assert storage_bits(33, 50, bits=3, group_size=64) == stored
    assert q.scales.dtype == torch.float16


def test_bad_inputs_raise():
    with pytest.raises(ConfigError, match="bits"):
        quantize(torch.randn(4, 4), bits=1)
    with pytest.raises(ConfigError, match="format"):
        quantize(torch.randn(4, 4), fmt="fp8")
    with pytest.raises(ShapeError, match="NaN"):
        quantize(torch.tensor([[float("nan"), 1.0]]))
