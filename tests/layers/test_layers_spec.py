"""Saved layer types: a compressed folder written before the layer types moved to
``rankwise.layers`` (tests/layers/data/compressed-v2, written by commit dbe7df3 with every
registered type in it) loads with the same module types and the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise.layers as L
from rankwise.compress.checkpoint import COMPRESSED_MARKER, load_compressed, save_compressed
from rankwise.errors import CheckpointError

DATA = Path(__file__).parent / "data"
OLD = DATA / "compressed-v2"
SAVED_TYPES = {  # the "type" names checkpoints hold: they must never change
    "CompensatedLinear", "GatherLinear", "QuantizedLinear", "QuantizedLowRankLinear",
    "ResizedLinear", "ScatterLinear", "SparseDictLinear",
}  # fmt: skip


def test_saved_type_names_are_stable():
    assert SAVED_TYPES <= set(L.LAYER_TYPES.names())  # new types may be added, none renamed
    assert all(L.LAYER_TYPES[n].__name__ == n for n in SAVED_TYPES)


def test_a_folder_written_before_the_move_loads_with_identical_logits(tmp_path):
    model, _ = load_compressed(OLD)
    marker = json.loads((OLD / COMPRESSED_MARKER).read_text())
    for path, spec in marker["modules"].items():
        assert type(model.get_submodule(path)).__name__ == spec["type"]
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), L.LowRankLinear)
    ref = load_file(str(DATA / "compressed-v2-logits.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-6)
    # and written again by today's code, it describes the same modules
    again = save_compressed(model, None, tmp_path / "again", method="handmade")
    assert json.loads((again / COMPRESSED_MARKER).read_text())["modules"] == marker["modules"]


def test_spec_round_trip_for_every_saved_type():
    model, _ = load_compressed(OLD)
    for path, module in L.registered_modules(model).items():
        rebuilt = L.build_module(L.module_spec(module), torch.float32)
        rebuilt.load_state_dict(module.state_dict())
        x = torch.randn(3, module.in_features)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), module(x), msg=path)
        torch.testing.assert_close(L.dense_weight(rebuilt), L.dense_weight(module))
        assert L.module_storage_bits(rebuilt) == L.module_storage_bits(module) > 0


def test_dense_weight_is_what_the_forward_applies():
    model, _ = load_compressed(OLD)
    for path, module in L.registered_modules(model).items():
        x = torch.randn(5, module.in_features)
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ L.dense_weight(module).T, atol=1e-2, rtol=1e-2, msg=path)


def test_unknown_or_broken_specs_name_the_problem():
    with pytest.raises(CheckpointError, match="unknown to this rankwise; known: .*SparseDictLinear"):
        L.build_module({"type": "FancyLinear"}, torch.float32)
    with pytest.raises(CheckpointError, match="description of a SparseDictLinear layer is invalid"):
        L.build_module({"type": "SparseDictLinear", "in_features": 4}, torch.float32)
    with pytest.raises(CheckpointError, match="not a registered layer type"):
        L.module_spec(nn.ReLU())
