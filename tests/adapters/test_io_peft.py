"""Saving/loading: PEFT's format both ways (real peft), rankwise's format, bad files."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import (
    ConvNet,
    assert_same_state,
    damage_adapter_folder,
    gpt2,
    llama,
    logits,
    make_trained,
    perturb_peft_lora,
    snapshot,
    tokens,
)
from safetensors.torch import load_file

from rankwise.adapters import adapted_layers, attach, load_adapter, save_adapter
from rankwise.errors import CheckpointError, ConfigError

CASES = [
    (llama, "lora", ["q_proj", "v_proj", "embed_tokens"], {}),
    (llama, "lora", ["o_proj", "gate_proj"], {"use_rslora": True}),
    (llama, "dora", ["q_proj", "down_proj"], {}),
    (gpt2, "lora", ["c_attn", "c_fc"], {}),
    (gpt2, "dora", ["c_attn", "c_proj"], {}),
]
FILES = ["adapter_config.json", "adapter_model.safetensors"]
IDS = ["llama-lora+embedding", "llama-rslora", "llama-dora", "gpt2-lora", "gpt2-dora"]


@pytest.mark.parametrize(("build", "method", "targets", "extra"), CASES, ids=IDS)
def test_saved_here_loads_in_peft_with_equal_outputs(tmp_path, build, method, targets, extra):
    from peft import PeftModel

    model = build()
    attach(model, method, targets=targets, rank=4, alpha=8, **extra)
    make_trained(model, std=0.2)
    x = tokens()
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [*FILES, "rankwise_output.json"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (method == "dora") and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["fan_in_fan_out"] == (build is gpt2)
    theirs = PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("build", "method", "targets", "extra"), CASES, ids=IDS)
def test_peft_adapter_loads_here_with_equal_outputs(tmp_path, build, method, targets, extra):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(
        build(),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora",
            fan_in_fan_out=build is gpt2, **extra,
        ),
    )  # fmt: skip
    perturb_peft_lora(theirs)
    theirs.save_pretrained(tmp_path)
    ours = build()
    plan = load_adapter(ours, tmp_path)
    assert plan.method == method
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rankwise_format_round_trip_with_conv_and_embedding(tmp_path, method):
    model = ConvNet()
    attach(model, method, targets=["embed", "conv1", "conv2", "head"], rank=2, name="mine")
    make_trained(model, "mine")
    x = tokens(vocab=20)
    save_adapter(model, tmp_path / "native", "mine", format="rankwise")
    save_adapter(model, tmp_path / "peft", "mine", format="peft")
    for folder in ("native", "peft"):
        fresh = ConvNet()
        load_adapter(fresh, tmp_path / folder, name="mine")
        torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=1e-6, rtol=1e-5)


def test_fresh_lora_saves_but_all_zero_is_refused(tmp_path, tiny):
    attach(tiny, "lora", targets="q_proj", rank=2)
    save_adapter(tiny, tmp_path / "fresh")  # B = 0 but A is not: a valid starting point
    with torch.no_grad():
        for layer in adapted_layers(tiny).values():
            layer.adapters["default"].lora_A.zero_()
    with pytest.raises(CheckpointError, match="zero"):
        save_adapter(tiny, tmp_path / "zero")
    assert not (tmp_path / "zero" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        save_adapter(tiny, tmp_path / "x", "other")


def _saved(tmp_path, **kwargs):
    model = llama()
    attach(model, "lora", targets=["q_proj", "v_proj"], rank=4, **kwargs)
    make_trained(model)
    save_adapter(model, tmp_path)
    return tmp_path


def test_shape_mismatch_names_the_key_and_leaves_the_model_unchanged(tmp_path):
    from rankwise.models import tiny_llama

    folder = _saved(tmp_path)
    other, _ = tiny_llama(hidden=32)  # another base model
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_A\.weight.*shape"):
        load_adapter(other, folder)
    assert_same_state(other, before)


def test_transposed_factors_are_caught(tmp_path):
    folder = _saved(tmp_path)
    damage_adapter_folder(folder, "transposed", "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="v_proj.lora_B.weight"):
        load_adapter(model, folder)
    assert_same_state(model, before)


@pytest.mark.parametrize("damage", ["truncate", "missing_key", "extra_key", "nan", "bad_json"])
def test_corrupt_files_raise_checkpoint_error_and_change_nothing(tmp_path, damage):
    folder = _saved(tmp_path)
    damage_adapter_folder(folder, damage, "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError):
        load_adapter(model, folder)
    assert_same_state(model, before)
    assert not adapted_layers(model)


def test_unknown_config_keys_warn_and_load(tmp_path):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    model = llama()
    with pytest.warns(UserWarning, match="some_future_option"):
        load_adapter(model, folder)
    assert adapted_layers(model)


def test_writes_follow_the_output_folder_policy(tmp_path):
    model = llama()
    attach(model, "lora", targets="q_proj", rank=2)
    make_trained(model)
    out = tmp_path / "adapter"
    save_adapter(model, out)
    first = load_file(out / "adapter_model.safetensors")
    make_trained(model, seed=3)
    with pytest.raises(CheckpointError, match="not empty; pass overwrite=True"):
        save_adapter(model, out)
    assert torch.equal(
        load_file(out / "adapter_model.safetensors")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ],
        first["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )
    save_adapter(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == [*FILES, "rankwise_output.json"]
    assert not [p for p in os.listdir(tmp_path) if p != "adapter"]  # no temporary left over
    second = load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert (os.stat(out / "adapter_model.safetensors").st_mode & 0o777) == 0o666 & ~_umask()
    (out / "thesis.txt").write_text("mine")  # a folder holding the user's files is never replaced
    with pytest.raises(CheckpointError, match="thesis.txt"):
        save_adapter(model, out, overwrite=True)
    assert (out / "thesis.txt").read_text() == "mine"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_loading_twice_under_one_name_is_a_clash(tmp_path):
    folder = _saved(tmp_path)
    model = llama()
    load_adapter(model, folder)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already has"):
        load_adapter(model, folder)
    assert_same_state(model, before)
    load_adapter(copy.deepcopy(model), folder, name="second")


@pytest.mark.parametrize("fmt", ["peft", "rankwise"])
def test_loads_frozen_for_inference_unless_trainable(tmp_path, fmt):
    model = llama()
    attach(model, "lora", targets="q_proj", rank=2)
    make_trained(model)
    save_adapter(model, tmp_path / "a", format=fmt)
    fresh = llama()
    load_adapter(fresh, tmp_path / "a")
    assert not any(p.requires_grad for p in fresh.parameters())
    again = llama()
    load_adapter(again, tmp_path / "a", trainable=True)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("fmt", ["peft", "rankwise"])
def test_layers_the_adapter_targets_but_has_no_weights_for(tmp_path, fmt):
    from rankwise.models import tiny_llama

    small = llama()  # 2 layers
    attach(small, "lora", targets=["q_proj", "v_proj"], rank=2)
    make_trained(small)
    save_adapter(small, tmp_path / "a", format=fmt)
    big, _ = tiny_llama(layers=3)
    before = snapshot(big)
    with pytest.raises(
        CheckpointError,
        match=r"no weights for 2 layer\(s\).*layers\.2\.self_attn\.q_proj.*strict=False",
    ):
        load_adapter(big, tmp_path / "a")
    assert_same_state(big, before)
    assert not adapted_layers(big)
    with pytest.warns(UserWarning, match=r"layers\.2\.self_attn\.v_proj"):
        load_adapter(big, tmp_path / "a", strict=False)
    assert len(adapted_layers(big)) == 4


def test_explicit_layer_targets_do_not_claim_other_layers(tmp_path):
    model = llama()
    attach(model, "lora", targets=["layers.0.self_attn.q_proj"], rank=2)
    make_trained(model)
    for fmt in ("peft", "rankwise"):
        save_adapter(model, tmp_path / fmt, format=fmt)
        load_adapter(llama(), tmp_path / fmt)  # layer 1's q_proj was never targeted: no error


def test_config_records_the_base_model_as_named_never_a_cache_path(tmp_path, monkeypatch):
    from rankwise.models import cache_dir

    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    model = llama()
    attach(model, "svfit", targets="q_proj", rank=2)
    make_trained(model)
    model.config._name_or_path = str(cache_dir() / "models" / "SmolLM2-abc")
    save_adapter(model, tmp_path / "a")
    assert (
        json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"]
        is None
    )
    save_adapter(model, tmp_path / "b", base_model="smollm2")
    cfg = json.loads((tmp_path / "b/adapter_config.json").read_text())
    assert cfg["format"] == "rankwise-adapter" and cfg["base_model_name_or_path"] == "smollm2"
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    save_adapter(model, tmp_path / "c", format="auto")
    cfg = json.loads((tmp_path / "c/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert cfg["config"]["rank"] == 2 and cfg["target_modules"] == ["q_proj"]


def test_native_files_written_with_r_still_load(tmp_path):
    model = llama()
    attach(model, "lora_xs", targets="q_proj", rank=2)
    make_trained(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["config"]["r"] = cfg["config"].pop("rank")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = llama()
    load_adapter(fresh, tmp_path)
    x = tokens()
    torch.testing.assert_close(logits(fresh, x), logits(model, x))
