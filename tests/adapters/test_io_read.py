"""load_adapter in two steps: read_adapter (files and checks, model untouched) and
attach_checkpoint (the only step that changes the model)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    assert_same_state,
    damage_adapter_folder,
    llama,
    logits,
    make_trained,
    snapshot,
    tokens,
)
from torch import nn

import rankwise.adapters.io as io
from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.adapters.io import attach_checkpoint, read_adapter
from rankwise.errors import CheckpointError, ConfigError


def _saved(folder, method="lora", fmt="auto", targets=("q_proj", "v_proj")):
    model = llama()
    attach(model, method, targets=list(targets), rank=4)
    make_trained(model)
    save_adapter(model, folder, format=fmt)
    return folder


def _tree(model: nn.Module, grads: bool = True) -> list:
    """Everything about the model's structure and adapters that an attach would change."""
    return [
        (path, type(m).__name__, list(getattr(m, "adapters", {})), list(getattr(m, "active", [])))
        for path, m in model.named_modules()
    ] + [(n, p.requires_grad) for n, p in model.named_parameters() if grads]


@pytest.mark.parametrize(("method", "fmt"), [("lora", "peft"), ("dora", "peft"), ("loldu", "rankwise")])
def test_read_never_changes_the_model_and_attach_equals_load_adapter(tmp_path, method, fmt):
    folder = _saved(tmp_path / "a", method, fmt)
    model = llama()
    attach(model, "lora", targets=["q_proj"], name="other", rank=2)  # some layers already wrapped
    make_trained(model, "other")
    reference = copy.deepcopy(model)
    before, tree, rng = snapshot(model), _tree(model), torch.get_rng_state()
    checkpoint = read_adapter(model, folder)
    assert_same_state(model, before)
    assert _tree(model) == tree
    assert torch.equal(torch.get_rng_state(), rng)
    assert checkpoint.method == method and checkpoint.nbytes > 0
    attach_checkpoint(model, checkpoint, "mine")
    load_adapter(reference, folder, "mine")
    assert_same_state(model, snapshot(reference))
    x = tokens()
    assert torch.equal(logits(model, x), logits(reference, x))


def test_alike_layers_share_one_shape_probe_and_factor_shapes(tmp_path):
    checkpoint = read_adapter(llama(), _saved(tmp_path / "a"))
    probes = checkpoint.probes
    q = [p for path, p in probes.items() if path.endswith("q_proj")]
    assert len(q) == 2 and q[0] is q[1]  # two layers, one probe
    shapes = checkpoint.factor_shapes()
    assert shapes["model.layers.0.self_attn.q_proj"] == (torch.Size([4, 64]), torch.Size([64, 4]))
    dora = read_adapter(llama(), _saved(tmp_path / "d", "dora"))
    assert dora.factor_shapes() == {}  # DoRA's term is not s·B(Ax): no slot copies


@pytest.mark.parametrize("damage", ["truncate", "missing_key", "nan", "transposed", "bad_json"])
def test_bad_files_fail_in_the_read_step_before_anything_is_attached(tmp_path, monkeypatch, damage):
    folder = _saved(tmp_path / "a")
    damage_adapter_folder(folder, damage, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")

    def no_attach(*args, **kwargs):
        raise AssertionError("attach was called for a bad adapter folder")

    monkeypatch.setattr(io, "attach", no_attach)
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError):
        read_adapter(model, folder)
    with pytest.raises(CheckpointError):
        load_adapter(model, folder)
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_a_checkpoint_attaches_only_to_its_model_and_unchanged_layers(tmp_path):
    folder = _saved(tmp_path / "a")
    model = llama()
    checkpoint = read_adapter(model, folder)
    with pytest.raises(ConfigError, match="read for another model; call read_adapter"):
        attach_checkpoint(llama(), checkpoint)
    model.model.layers[0].self_attn.q_proj = nn.Linear(64, 64, bias=True)  # the model changed
    before, tree = snapshot(model), _tree(model)
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.q_proj' changed since.*read_adapter again"):
        attach_checkpoint(model, checkpoint)
    assert_same_state(model, before)
    assert _tree(model) == tree


def test_a_copy_that_fails_after_attaching_is_rolled_back(tmp_path):
    model = llama()
    checkpoint = read_adapter(model, _saved(tmp_path / "a"))
    layer = "model.layers.1.self_attn.v_proj"
    checkpoint.tensors[layer]["lora_B"] = torch.ones(3, 3)  # altered after the checks
    before, tree = snapshot(model), _tree(model, grads=False)
    with pytest.raises(RuntimeError):
        attach_checkpoint(model, checkpoint, "mine")
    assert_same_state(model, before)
    assert _tree(model, grads=False) == tree  # the adapter is gone again (the base stays frozen)
