"""PELA (2024): truncated-SVD factors of a pretrained layer, trained with feature distillation
and a weight perturbation regulariser against the frozen original."""

from __future__ import annotations

import copy

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
from rankwise.errors import ConfigError, ShapeError
from rankwise.models import count_parameters, tiny_llama


def test_forward_equals_the_dense_weight_and_is_the_best_rank_r_fit():
    dense = linear(24, 16)
    layer = L.PELALinear.from_linear(dense, rank=4)
    assert_forward_is_dense_weight(layer)
    S = torch.linalg.svdvals(dense.weight.detach())
    torch.testing.assert_close((dense.weight - layer.dense_weight()).norm(), S[4:].norm(), atol=1e-5, rtol=1e-4)


def test_equals_the_original_layer_at_full_rank():
    dense = linear(24, 16)
    layer = L.PELALinear.from_linear(dense, rank=16)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_parameter_count_and_saved_as_a_low_rank_layer():
    layer = L.PELALinear.from_linear(linear(40, 30), rank=5)
    assert count_parameters(layer) == 5 * (40 + 30) + 30
    assert isinstance(layer, L.LowRankLinear)
    assert L.module_spec(layer) == {"type": "LowRankLinear", "in_features": 40, "out_features": 30, "rank": 5, "bias": True}


def test_training_lowers_the_loss():
    first, last = fit_random_map(L.PELALinear.from_linear(linear(24, 16), rank=4))
    assert last < 0.5 * first


def test_state_dict_round_trip():
    layer = L.PELALinear.from_linear(linear(24, 16, seed=0), rank=4)
    assert_state_dict_round_trip(layer, L.PELALinear.from_linear(linear(24, 16, seed=1), rank=4))


def test_bad_rank_names_the_layer_and_valid_values():
    with pytest.raises(ConfigError, match=r"PELALinear: rank must be in \[1, 16\] for a 16x24 layer; got 20"):
        L.PELALinear.from_linear(linear(24, 16), rank=20)
    with pytest.raises(ConfigError, match=r"PELALinear: rank must be in \[1, 16\] for a 16x24 layer; got 0"):
        L.convert(nn.Sequential(linear(24, 16)), "pela", rank=0)


def test_weight_perturbation_loss_is_the_relative_distance_to_the_original():
    teacher, _ = tiny_llama(seed=0, layers=1, hidden=32)
    student = copy.deepcopy(teacher)
    L.convert(student, "pela", rank=32, targets=["q_proj", "o_proj"])  # full rank: no perturbation
    assert L.weight_perturbation_loss(student, teacher) < 1e-10
    student = copy.deepcopy(teacher)
    new = L.convert(student, "pela", rank=4, targets="q_proj")
    path, layer = next(iter(new.items()))
    W = teacher.get_submodule(path).weight
    expected = (layer.dense_weight() - W).pow(2).sum() / W.pow(2).sum()
    torch.testing.assert_close(L.weight_perturbation_loss(student, teacher), expected)
    with pytest.raises(ConfigError, match="no PELALinear layer"):
        L.weight_perturbation_loss(teacher, teacher)


def test_feature_distillation_loss_checks_shapes():
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(L.feature_distillation_loss([a, a], [b, a]), (a - b).pow(2).mean() / 2)
    with pytest.raises(ShapeError, match="differ in shape"):
        L.feature_distillation_loss(a, b[:, :4])
    with pytest.raises(ShapeError, match="as many student as teacher"):
        L.feature_distillation_loss([a], [a, b])


def test_pela_stage_distils_the_frozen_model_into_the_low_rank_one():
    """The paper's intermediate stage: only the low-rank model trains, towards the frozen one."""
    teacher, _ = tiny_llama(seed=0, layers=2, hidden=32)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    L.convert(student, "pela", rank=6)
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher(input_ids=ids, output_hidden_states=True).hidden_states[1:]

    def objective() -> torch.Tensor:
        hidden = student(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        return L.feature_distillation_loss(hidden, target) + 0.1 * L.weight_perturbation_loss(student, teacher)

    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    first = objective().item()
    for _ in range(30):
        loss = objective()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert objective().item() < 0.7 * first
