"""spectrum(): per-layer singular values and ranks against dense torch.linalg.svdvals."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from torch import nn

from rankwise.analysis import spectrum
from rankwise.errors import ConfigError, ModelError, ShapeError
from rankwise.linalg import effective_rank, energy_rank, nuclear_norm, stable_rank


def _mlp(seed: int = 0, shapes=((48, 40), (200, 120), (200, 120))) -> nn.Module:
    """Linear layers named like a transformer block: small (exact) and larger ones."""
    torch.manual_seed(seed)
    net = nn.Module()
    net.layers = nn.ModuleList()
    for out_f, in_f in shapes:
        block = nn.Module()
        block.proj = nn.Linear(in_f, out_f)
        with torch.no_grad():  # a decaying spectrum, like trained weights
            U, _ = torch.linalg.qr(torch.randn(out_f, out_f))
            V, _ = torch.linalg.qr(torch.randn(in_f, in_f))
            r = min(out_f, in_f)
            s = torch.exp(-torch.arange(r, dtype=torch.float32) / 15) + 0.01
            block.proj.weight.copy_(U[:, :r] @ torch.diag(s) @ V[:, :r].T)
        net.layers.append(block)
    return net


def test_exact_layers_match_dense_svdvals_and_linalg_metrics(tiny_llama):
    model, _ = tiny_llama
    result = spectrum(model)
    assert result.layers, "no layers analysed"
    for layer in result.layers:
        module = model.get_submodule(layer.name)
        W = module.weight.detach().float()
        dense = torch.linalg.svdvals(W)
        assert layer.exact  # tiny-llama layers are small: all exact with the default exact_below
        torch.testing.assert_close(torch.tensor(layer.singular_values), dense[:64], rtol=1e-5, atol=1e-6)
        assert layer.stable_rank == pytest.approx(float(stable_rank(W)), rel=1e-5)
        assert layer.effective_rank == pytest.approx(float(effective_rank(W)), rel=1e-5)
        assert layer.nuclear_norm == pytest.approx(float(nuclear_norm(W)), rel=1e-5)
        assert layer.energy_rank == int(energy_rank(dense, energy=0.9))
        assert layer.shape == tuple(W.shape)


def test_randomized_layers_top_values_and_bounds():
    net = _mlp()
    result = spectrum(net, top_k=8, exact_below=64)
    small, big = result.layers[0], result.layers[1]
    assert small.exact and not big.exact
    for layer in result.layers:
        W = net.get_submodule(layer.name).weight.detach()
        dense = torch.linalg.svdvals(W)
        torch.testing.assert_close(torch.tensor(layer.singular_values), dense[: len(layer.singular_values)], rtol=1e-4, atol=1e-5)
        # exact whatever the method: ‖W‖_F² / σ₁²
        assert layer.stable_rank == pytest.approx(float(stable_rank(W)), rel=1e-4)
        if not layer.exact:
            # tail completion: energy rank and nuclear norm are upper bounds of the exact ones
            assert layer.energy_rank >= int(energy_rank(dense, energy=0.9))
            assert layer.nuclear_norm >= float(dense.sum()) * (1 - 1e-6)
            assert layer.effective_rank >= float(effective_rank(W)) * (1 - 1e-6)


def test_method_exact_gives_exact_measures_on_big_layers():
    net = _mlp()
    result = spectrum(net, top_k=8, method="exact")
    W = net.layers[1].proj.weight.detach()
    layer = result["layers.1.proj"]
    assert layer.exact
    assert layer.effective_rank == pytest.approx(float(effective_rank(W)), rel=1e-5)
    assert layer.energy_rank == int(energy_rank(torch.linalg.svdvals(W), energy=0.9))


def test_same_seed_same_numbers_and_batching_matches_single_layers():
    net = _mlp()
    a = spectrum(net, top_k=8, exact_below=0)
    b = spectrum(net, top_k=8, exact_below=0)
    assert a.to_rows() == b.to_rows()
    one = spectrum(net, top_k=8, exact_below=0, layers="layers.2.proj")
    assert [r.name for r in one.layers] == ["layers.2.proj"]
    torch.testing.assert_close(
        torch.tensor(one.layers[0].singular_values), torch.tensor(a["layers.2.proj"].singular_values), rtol=1e-4, atol=1e-6
    )


def test_rows_json_and_csv():
    result = spectrum(_mlp(), top_k=4)
    rows = result.to_rows()
    assert len(rows) == 3 and all(not isinstance(v, (list, dict)) for r in rows for v in r.values())
    assert rows[0]["shape"] == "48x40" and rows[0]["kind"] == "proj" and rows[0]["block"] == 0
    parsed = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert [p["name"] for p in parsed] == [r["name"] for r in rows]
    full = result.to_dict()
    assert len(full["layers"][1]["singular_values"]) == 4


def test_write_csv(tmp_path):
    path = tmp_path / "spectrum.csv"
    spectrum(_mlp(), top_k=4).write_csv(path)
    assert path.read_text().startswith("name,kind,block,shape")


def test_layer_patterns_and_typos(tiny_llama):
    model, _ = tiny_llama
    result = spectrum(model, layers=["q_proj", "*.mlp.down_proj"])
    assert {r.kind for r in result.layers} == {"q_proj", "down_proj"}
    with pytest.raises(ConfigError, match="q_prj.*matched no linear layer.*q_proj"):
        spectrum(model, layers="q_prj")


def test_conv1d_is_read_transposed():
    from transformers.pytorch_utils import Conv1D

    net = nn.Module()
    net.c_attn = Conv1D(30, 12)  # weight stored (in=12, out=30)
    layer = spectrum(net).layers[0]
    assert layer.shape == (30, 12)
    torch.testing.assert_close(torch.tensor(layer.singular_values), torch.linalg.svdvals(net.c_attn.weight.detach()), rtol=1e-5, atol=1e-6)


def test_adapted_layers_are_read_merged_by_default(tiny_llama):
    from rankwise.adapters import attach

    model, _ = tiny_llama
    base = spectrum(model, layers="q_proj")
    attach(model, "lora", targets=["q_proj"], r=2, alpha=4)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    adapter = next(iter(layer.adapters.values()))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()  # a non-zero update
    merged = spectrum(model, layers="q_proj")
    assert [r.name for r in merged.layers] == [r.name for r in base.layers]  # the wrapper, not .base_layer
    assert merged.layers[0].singular_values != base.layers[0].singular_values
    unmerged = spectrum(model, layers="q_proj", merged=False)
    assert unmerged.layers[0].singular_values == base.layers[0].singular_values
    assert layer.merged == []  # reading the merged view did not merge the model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"top_k": 0}, "top_k"), ({"energy": 1.5}, "energy"), ({"method": "svd"}, "method"), ({"exact_below": -1}, "exact_below")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        spectrum(_mlp(), **kwargs)


def test_model_without_linear_layers():
    with pytest.raises(ModelError, match="no linear layers"):
        spectrum(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))


def test_nan_weight_is_refused():
    net = _mlp()
    with torch.no_grad():
        net.layers[0].proj.weight[0, 0] = float("nan")
    with pytest.raises(ShapeError, match="layers.0.proj.*NaN"):
        spectrum(net)
