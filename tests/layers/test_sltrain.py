"""SLTrain (2024): W = (α/r) B A + S with a fixed random sparse support."""

from __future__ import annotations

import pytest
import torch
from layer_checks import (
    assert_forward_is_dense_weight,
    assert_state_dict_round_trip,
    fit_random_map,
    linear,
)
from torch import nn

import rankwise.layers as L
from rankwise.errors import ConfigError
from rankwise.layers.sltrain import _SparsePlusLowRank
from rankwise.models import count_parameters, tiny_llama


def _layer(rank=4, density=0.1, seed=0, **kw) -> L.SLTrainLinear:
    layer = L.SLTrainLinear.from_linear(linear(24, 16, seed=seed), rank=rank, density=density,
                                        generator=torch.Generator().manual_seed(seed), **kw)  # fmt: skip
    with torch.no_grad():
        layer.B.normal_()  # B starts at 0 (the paper's init): give the low-rank part a value
    return layer


def test_forward_equals_the_dense_weight_and_the_paper_formula():
    layer = _layer()
    assert_forward_is_dense_weight(layer)
    S = layer.sparse_part()
    torch.testing.assert_close(layer.dense_weight(), 32 / 4 * layer.B @ layer.A + S)
    assert int((S != 0).sum()) == layer.nnz == int(0.1 * 24 * 16)


def test_paper_initialisation():
    layer = L.SLTrainLinear.from_linear(linear(400, 300), rank=8, generator=torch.Generator().manual_seed(1))
    assert layer.density == 0.03 and layer.alpha == 32 and layer.nnz == int(0.03 * 400 * 300)
    assert torch.count_nonzero(layer.B) == 0  # starts as W = S
    torch.testing.assert_close(layer.dense_weight(), layer.sparse_part())
    bound = 1 / 400**0.5
    for t in (layer.A, layer.values):
        assert t.abs().max() <= bound and t.std() > 0.5 * bound  # U(-1/√in, 1/√in)
    idx = layer.index.long()
    assert idx.unique().numel() == idx.numel() and bool((idx[1:] > idx[:-1]).all())
    rows = torch.bincount(idx // 400, minlength=300).float()
    assert rows.min() > 0 and rows.std() < 3 * rows.mean() ** 0.5  # spread uniformly, not in a block


def test_parameter_count_and_no_dense_tensor():
    layer = _layer(rank=4, density=0.1)
    nnz = int(0.1 * 24 * 16)
    assert count_parameters(layer) == 4 * (24 + 16) + nnz + 16
    tensors = [*layer.parameters(), *layer.buffers()]
    assert all(t.numel() < 24 * 16 for t in tensors)
    assert layer.index.dtype == torch.int32 and layer.index.numel() == nnz


def test_custom_backward_matches_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randperm(30, generator=g)[:7]
    assert torch.autograd.gradcheck(lambda *t: _SparsePlusLowRank.apply(*t, index, 0.5), (x, B, A, values))


def test_backward_keeps_no_dense_weight_alive():
    layer = L.SLTrainLinear.from_linear(linear(96, 80), rank=4, density=0.05)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = layer(torch.randn(3, 96, requires_grad=True)).sum()
    assert saved and (80, 96) not in saved and (96, 80) not in saved
    loss.backward()
    assert layer.B.grad is not None and layer.values.grad.shape == (layer.nnz,)


def test_training_lowers_the_loss_and_keeps_the_support():
    layer = _layer(rank=4, density=0.1)
    support, values = layer.index.clone(), layer.values.detach().clone()
    first, last = fit_random_map(layer)
    assert last < 0.5 * first
    assert torch.equal(layer.index, support) and not torch.equal(layer.values, values)


def test_state_dict_round_trip():
    assert_state_dict_round_trip(_layer(seed=0), _layer(seed=1))


def test_bad_rank_density_and_alpha_name_the_layer_and_valid_values():
    with pytest.raises(ConfigError, match=r"SLTrainLinear: rank must be in \[1, 16\] for a 16x24 layer; got 17"):
        _layer(rank=17)
    for bad in (0, 1.5, -0.1, "0.1"):
        with pytest.raises(ConfigError, match=r"SLTrainLinear: density must be a number in \(0, 1\]"):
            _layer(density=bad)
    with pytest.raises(ConfigError, match=r"gives no non-zero in a 16x24 layer; use density >= 0.0026"):
        _layer(density=1e-4)
    with pytest.raises(ConfigError, match="SLTrainLinear: alpha must be a number > 0"):
        _layer(alpha=0)


def test_convert_a_tiny_llama_and_train_it():
    model, _ = tiny_llama(seed=0, layers=1, hidden=32)
    new = L.convert(model, "sltrain", rank=4, density=0.05, generator=torch.Generator().manual_seed(0))
    assert len(new) == 7 and all(isinstance(m, L.SLTrainLinear) for m in new.values())
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if "layers" in n)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    with pytest.raises(ConfigError, match=r"'sltrain' has no option\(s\) \['sparsity'\].*options are: density, alpha, generator"):
        L.convert(model, "sltrain", rank=4, sparsity=0.1)
