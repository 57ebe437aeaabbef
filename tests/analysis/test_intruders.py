"""intruder_dimensions(): planted intruders are found; no false positives; mismatches named."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from rankwise.analysis import intruder_dimensions
from rankwise.analysis.intruders import left_singular_vectors
from rankwise.errors import ConfigError, ShapeError

LAYER = "model.layers.1.mlp.up_proj"  # 128 x 64 in tiny-llama


def _plant(model: nn.Module, name: str, count: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Add ``count`` strong rank-one directions spread evenly over 16 base singular vectors
    each (|cos| = 0.25 with every one of them), as a LoRA update of rank ``count`` would."""
    layer = model.get_submodule(name)
    W = layer.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    planted = []
    with torch.no_grad():
        for c in range(count):
            cols = torch.arange(16 * c, 16 * (c + 1))
            signs = torch.randint(0, 2, (16,), generator=g).double() * 2 - 1
            u = U[:, cols] @ signs / 4  # unit vector, |cos| = 1/4 with 16 base vectors
            v = Vh[cols].T @ signs / 4
            layer.weight += ((3 + c) * S[0] * torch.outer(u, v)).float()
            planted.append(u)
    return planted


def _random_lora(model, seed: int = 3):
    from rankwise.adapters import attach

    attach(model, "lora", targets=["up_proj", "q_proj"], rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 if "lora_B" in name else 1.0))


def test_left_singular_vectors_match_torch_svd():
    torch.manual_seed(0)
    for shape in [(20, 35), (35, 20)]:
        W = torch.randn(*shape, dtype=torch.float64)
        U, S = left_singular_vectors(W)
        U_ref, S_ref, _ = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(S, S_ref)
        torch.testing.assert_close((U.T @ U_ref).abs().diagonal(), torch.ones(min(shape), dtype=torch.float64))


def test_identical_models_have_no_intruders(tiny_llama):
    model, _ = tiny_llama
    result = intruder_dimensions(model, copy.deepcopy(model))
    assert result.total == 0
    assert all(min(layer.max_cosine) > 0.999 for layer in result.layers)
    assert len(result.layers) == 15  # 2 blocks x 7 + lm_head


def test_planted_intruders_are_found_where_planted(tiny_llama):
    model, _ = tiny_llama
    tuned = copy.deepcopy(model)
    planted = _plant(tuned, LAYER, 2)
    result = intruder_dimensions(model, tuned, top_k=10)
    assert result.counts()[LAYER] == 2
    assert result.total == 2  # nothing elsewhere
    layer = next(r for r in result.layers if r.name == LAYER)
    assert layer.indices == [0, 1]  # the planted directions are now the two largest
    # the found vectors are the planted ones
    U, _ = left_singular_vectors(tuned.get_submodule(LAYER).weight.detach())
    for u in planted:
        assert float((U[:, :2].T @ u).abs().max()) > 0.95


def test_small_dense_update_like_full_finetuning_has_no_intruders(tiny_llama):
    model, _ = tiny_llama
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p += 0.02 * p.abs().mean() * torch.randn(p.shape, generator=g)
    assert intruder_dimensions(model, tuned, top_k=5).total == 0


def test_adapter_on_the_same_model_is_compared_with_its_base(tiny_llama):
    from rankwise.adapters import attach

    model, _ = tiny_llama
    attach(model, "lora", targets=["up_proj"], r=2, alpha=2)
    layer = model.get_submodule(LAYER)
    adapter = next(iter(layer.adapters.values()))
    W = layer.base_layer.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with torch.no_grad():  # B A = 8 σ₁ u vᵀ, u spread over 16 base directions
        u = U[:, 16:32].sum(1) / 4
        v = Vh[16:32].sum(0) / 4
        A, B = adapter.lora_A, adapter.lora_B
        A.zero_()
        B.zero_()
        A[0] = v.float()
        B[:, 0] = (8 * S[0] * u).float() / adapter.config.scaling
    result = intruder_dimensions(model)  # tuned=None: the model's merged view vs its base view
    assert result.counts()[LAYER] == 1
    assert result.total == 1
    assert layer.merged == []  # the model was not modified


def test_mismatched_architectures_name_the_first_layer(tiny_llama):
    from rankwise.models import tiny_llama as build

    model, _ = tiny_llama
    wider, _ = build(hidden=32)
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.self_attn\.q_proj.*64x64.*32x32"):
        intruder_dimensions(model, wider)
    deeper, _ = build(layers=3)
    with pytest.raises(ShapeError, match=r"differ in architecture: layer 'lm_head' .* is 'model\.layers\.2\.self_attn\.q_proj' in the tuned"):
        intruder_dimensions(model, deeper)


def test_models_without_linear_layers_are_refused():
    from rankwise.errors import ModelError

    plain = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ModelError, match="no linear layers"):
        intruder_dimensions(plain, copy.deepcopy(plain))


@pytest.mark.parametrize(("kwargs", "message"), [({"threshold": 0}, "threshold"), ({"top_k": 0}, "top_k")])
def test_bad_arguments(tiny_llama, kwargs, message):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match=message):
        intruder_dimensions(model, model, **kwargs)


def test_rows(tiny_llama):
    model, _ = tiny_llama
    tuned = copy.deepcopy(model)
    _plant(tuned, LAYER, 1)
    rows = intruder_dimensions(model, tuned).to_rows()
    row = next(r for r in rows if r["name"] == LAYER)
    assert row["count"] == 1 and row["indices"] == "0" and row["min_max_cosine"] < 0.5


def test_finds_the_dimensions_peft_reduce_intruder_dimension_acts_on(tiny_llama, tmp_path):
    """PEFT 0.21's mitigation step detects intruders by the same definition (top 10 left
    singular vectors of W + ΔW, max |cos| with the base's < 0.5); on one saved adapter the
    per-layer counts it logs must equal rankwise's."""
    peft = pytest.importorskip("peft")
    intruders = pytest.importorskip("peft.tuners.lora.intruders", reason="this peft has no reduce_intruder_dimension")
    from rankwise.adapters import save_adapter
    from rankwise.models import tiny_llama as build

    model, _ = tiny_llama
    _random_lora(model)
    ours = intruder_dimensions(model).counts()
    folder = save_adapter(model, tmp_path / "adapter", format="peft")

    fresh, _ = build()
    peft_model = peft.PeftModel.from_pretrained(fresh, folder)
    logged: list[str] = []
    intruders.reduce_intruder_dimension(peft_model, logging_sink=logged.append)
    theirs = {}
    for line in logged:  # "<layer>: No intruders" / "<layer>: Intruders: <n>" (other lines ignored)
        m = re.fullmatch(r"(\S+): (?:No intruders|Intruders: (\d+))", str(line))
        if m:
            theirs[m.group(1).removeprefix("base_model.model.")] = int(m.group(2) or 0)
    assert theirs, logged
    assert any(theirs.values()), "the planted update should create intruders"
    assert {k: ours[k] for k in theirs} == theirs


def test_reduce_intruder_dimensions_matches_peft_and_shrinks_them(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    intruders = pytest.importorskip("peft.tuners.lora.intruders", reason="this peft has no reduce_intruder_dimension")
    from rankwise.adapters import adapted_layers, save_adapter
    from rankwise.analysis.intruders import reduce_intruder_dimensions
    from rankwise.models import tiny_llama as build

    model, _ = tiny_llama
    _random_lora(model)
    folder = save_adapter(model, tmp_path / "adapter", format="peft")
    before = intruder_dimensions(model)
    untouched = {p: layer.adapters["default"].delta_weight().clone() for p, layer in adapted_layers(model).items()}
    found = reduce_intruder_dimensions(model, keep=0.75)
    assert found.counts() == {k: v for k, v in before.counts().items() if k in found.counts()}
    assert found.total > 0

    fresh, _ = build()
    peft_model = peft.PeftModel.from_pretrained(fresh, folder)
    intruders.reduce_intruder_dimension(peft_model, mitigation_lambda=0.75, logging_sink=None)
    for path, layer in adapted_layers(model).items():
        ours = layer.adapters["default"].delta_weight()
        theirs = peft_model.base_model.model.get_submodule(path).get_delta_weight("intruder_reduced")
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-3, atol=1e-4)
        if found.counts()[path] == 0:
            assert torch.equal(ours, untouched[path])
    # keep=0 removes the intruder components: fewer intruders afterwards
    model2, _ = build()
    _random_lora(model2)
    reduce_intruder_dimensions(model2, keep=0.0)
    assert intruder_dimensions(model2).total < before.total


def test_reduce_intruder_dimensions_bad_input(tiny_llama):
    from rankwise.analysis.intruders import reduce_intruder_dimensions

    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="no adapter named 'default'"):
        reduce_intruder_dimensions(model)
    _random_lora(model)
    with pytest.raises(ConfigError, match="keep"):
        reduce_intruder_dimensions(model, keep=1.5)
