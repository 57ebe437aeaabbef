"""eora: eigenspace compensation beats none and beats plain SVD compensation on anisotropic inputs."""

from __future__ import annotations

import pytest
import torch
from test_lord import end_to_end

from rankwise.compress.calibrate import LayerStats
from rankwise.compress.methods.eora import (
    activation_eigenspace,
    eigenspace_compensation,
    eora_compensate,
)
from rankwise.errors import ConfigError
from rankwise.layers import CompensatedLinear, QuantizedLinear
from rankwise.layers.quantize import quantize, quantize_dequantize


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, dtype=torch.float64, generator=g)
    scales = torch.logspace(-2, 1, 64, dtype=torch.float64)  # strongly anisotropic inputs
    mix, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    x = torch.randn(500, 64, dtype=torch.float64, generator=g) * scales @ mix.T  # (tokens, in)
    return w, x


def test_eora_beats_no_compensation_and_plain_svd_compensation():
    w, x = _problem()
    quantized = quantize_dequantize(w.float(), bits=3).double()
    delta = w - quantized
    rank = 8
    comp = eigenspace_compensation(delta, activation_eigenspace(x.T @ x), rank)
    eora = ((delta - comp.B @ comp.A) @ x.T).norm()
    none = (delta @ x.T).norm()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    plain = ((delta - (u[:, :rank] * s[:rank]) @ vh[:rank]) @ x.T).norm()
    assert eora < 0.9 * plain < 0.9 * none
    # the returned spectrum is the activation-weighted error, exactly
    assert torch.isclose(eora.pow(2), comp.S[rank:].pow(2).sum(), rtol=1e-6)


def test_eora_compensate_wraps_any_compressed_layer():
    w, x = _problem(1)
    layer = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        layer.weight.copy_(w.float())
    model = torch.nn.Sequential(
        QuantizedLinear.from_quantized(quantize(layer.weight, bits=3), layer.bias.detach())
    )
    stats = {"0": LayerStats(out_features=48, in_features=64, gram=x.T @ x, tokens=500)}
    xf = x.float()
    before = (model(xf) - layer(xf)).norm()
    errors = eora_compensate(model, {"0": layer.weight.detach()}, stats, rank=6)
    assert isinstance(model[0], CompensatedLinear) and isinstance(model[0].base, QuantizedLinear)
    after = (model(xf) - layer(xf)).detach().norm()
    assert after < 0.7 * before
    assert errors["0"] == pytest.approx(
        float(after / (layer(xf) - layer.bias).detach().norm()), rel=1e-3
    )


def test_eora_on_quantized_tiny_model_meets_ratio_and_round_trips(tmp_path, texts):
    # 4-bit linear layers take ~0.55 of this model (embeddings stay float32); 0.6 leaves rank
    rel, res = end_to_end("eora", {"bits": 4}, 0.6, texts, out=tmp_path / "m")
    assert all(
        isinstance(m, CompensatedLinear)
        for n, m in res.model.named_modules()
        if n.endswith("_proj")
    )
    # same 4-bit grid and the same storage, but data-free (weight-space SVD) low-rank terms
    rel_lq, _ = end_to_end("lq", {"bits": (4,), "ranks": (0,), "allow_dense": False}, 0.6, texts)
    assert rel < rel_lq


def test_eora_after_another_method(texts):
    rel, res = end_to_end("eora", {"base": "svdllm", "rank": 4}, 0.8, texts)
    assert any(isinstance(m, CompensatedLinear) for m in res.model.modules())
    assert rel < 0.3


def test_eora_refuses_a_budget_below_the_quantized_model(texts):
    with pytest.raises(ConfigError, match="quantized layers alone"):
        end_to_end("eora", {"bits": 8}, 0.55, texts)
    with pytest.raises(ConfigError, match="not registered"):
        end_to_end("eora", {"base": "nope"}, 0.8, texts)
