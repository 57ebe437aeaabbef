"""hybrid: exactly MoDeGPT's MLP step plus SVD-LLM on attention, within the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lord import end_to_end

from rankwise.compress.base import CompressionJob, get_method
from rankwise.compress.calibrate import calibrate, linear_layers
from rankwise.compress.methods.hybrid import ATTENTION, ATTENTION_CAP, ATTENTION_EXCESS, Hybrid
from rankwise.compress.methods.modegpt import MoDeGPT
from rankwise.compress.methods.svdllm import SVDLLM
from rankwise.errors import ConfigError, ModelError
from rankwise.layers import LowRankLinear, ResizedLinear, module_storage_bits
from rankwise.models import tiny_llama


@pytest.fixture()
def calibrated(texts):
    model, tok = tiny_llama(seed=0, layers=2, hidden=64)
    cal = calibrate(model, tok, texts, tokens=512, seq_len=64, statistics=("gram", "out_grad"))
    return model, cal


def _run(method, model, cal, budget, allocation="fisher"):
    net = copy.deepcopy(model)
    rows = method.compress_model(CompressionJob(net, linear_layers(net), cal, budget, allocation))
    return net, rows


def _storage(net, names) -> int:
    return sum(-(-module_storage_bits(net.get_submodule(n)) // 32) for n in names)


def _is_attention(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ATTENTION


def test_hybrid_is_modegpt_on_the_mlp_and_svdllm_on_attention_within_the_budget(calibrated):
    model, cal = calibrated
    layers = linear_layers(model)
    dense = sum(m.weight.numel() for m in layers.values())
    budget = int(0.7 * dense)
    share = 0.6
    net, rows = _run(Hybrid(mlp_share=share), model, cal, budget)
    assert [r.name for r in rows] == list(layers)
    assert _storage(net, layers) <= budget
    assert _storage(net, layers) >= budget - 0.02 * dense  # the budget is used, not wasted

    # the MLP is exactly MoDeGPT's MLP-only step at the MLP's share of the cut
    attention_cut = round((1 - share) * (dense - budget))
    reference, _ = _run(MoDeGPT(parts=("mlp",)), model, cal, budget + attention_cut, "uniform")
    for name in layers:
        if not _is_attention(name):
            ours, ref = net.get_submodule(name), reference.get_submodule(name)
            assert isinstance(ours, ResizedLinear) and ours.weight.shape == ref.weight.shape
            assert torch.equal(ours.weight, ref.weight), name

    # every attention layer is SVD-LLM's factorisation at the rank it was given
    low_rank = [n for n in layers if _is_attention(n) and isinstance(net.get_submodule(n), LowRankLinear)]
    assert low_rank
    for name in low_rank:
        ours = net.get_submodule(name)
        ref = SVDLLM().factorize(layers[name], cal.stats[name], ours.U.shape[1])
        assert torch.allclose(ours.U @ ours.V, ref.U @ ref.V, atol=1e-6), name


def test_mlp_share_one_leaves_attention_dense_and_zero_leaves_the_mlp(calibrated):
    model, cal = calibrated
    layers = linear_layers(model)
    budget = int(0.8 * sum(m.weight.numel() for m in layers.values()))
    net, _ = _run(Hybrid(mlp_share=1.0), model, cal, budget)
    for name in layers:
        if _is_attention(name):
            assert torch.equal(net.get_submodule(name).weight, layers[name].weight), name
    net, _ = _run(Hybrid(mlp_share=0.0), model, cal, budget)
    for name in layers:
        if not _is_attention(name):
            assert net.get_submodule(name).weight.shape == layers[name].weight.shape, name
        assert _storage(net, layers) <= budget


@pytest.mark.parametrize("kept", [0.9, 0.75, 0.5])
def test_the_default_split_cuts_attention_by_1_4_times_the_layers_fraction_at_most_half(calibrated, kept):
    model, cal = calibrated
    layers = linear_layers(model)
    dense = sum(m.weight.numel() for m in layers.values())
    attention = sum(m.weight.numel() for n, m in layers.items() if _is_attention(n))
    budget = int(kept * dense)
    net, _ = _run(get_method("hybrid"), model, cal, budget)
    cut = attention - _storage(net, [n for n in layers if _is_attention(n)])
    expected = min(ATTENTION_EXCESS * (dense - budget) / dense, ATTENTION_CAP)
    assert abs(cut / attention - expected) < 0.05, (cut / attention, expected)
    assert _storage(net, layers) <= budget


@pytest.mark.parametrize("share", [-0.1, 1.5, "half"])
def test_bad_mlp_share_names_the_option(share):
    with pytest.raises(ConfigError, match="mlp_share"):
        get_method("hybrid", mlp_share=share)


def test_a_model_without_llama_blocks_is_refused(calibrated):
    model, cal = calibrated
    model.model.layers[0].mlp = torch.nn.Identity()  # no gate/up/down projections any more
    with pytest.raises(ModelError, match="Llama-style"):
        _run(Hybrid(), model, cal, 10_000)


def test_hybrid_end_to_end_meets_the_ratio_and_round_trips(tmp_path, texts):
    rel, res = end_to_end("hybrid", {}, 0.8, texts, out=tmp_path / "m")
    assert rel < 1.0
    kinds = {r["layer_type"] for r in res.report["layers"]}
    assert "ResizedLinear" in kinds
