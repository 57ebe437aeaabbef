"""PEFT's per-layer rank_pattern / alpha_pattern, read here (zero-padded to one adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import gpt2, llama, logits, perturb_peft_lora, tokens
from safetensors.torch import load_file

from rankwise.adapters import adapted_layers, load_adapter
from rankwise.errors import CheckpointError


def _peft_saved(tmp_path, build, method="lora", **options):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(build(), LoraConfig(use_dora=method == "dora", **options))
    perturb_peft_lora(theirs)
    theirs.save_pretrained(tmp_path)
    return theirs


CASES = [
    (llama, "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6})),
    (llama, "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                         use_rslora=True, rank_pattern={"q_proj": 3},
                         alpha_pattern={"layers.1.self_attn.v_proj": 2.0})),
    (llama, "dora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                         rank_pattern={"down_proj": 1}, alpha_pattern={"q_proj": 16})),
    (gpt2, "lora", dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                        rank_pattern={"h.1.attn.c_attn": 5})),
]  # fmt: skip


@pytest.mark.parametrize(("build", "method", "options"), CASES, ids=["lora", "rslora+alpha", "dora", "gpt2"])
def test_a_peft_adapter_with_per_layer_ranks_loads_with_equal_outputs(tmp_path, build, method, options):
    theirs = _peft_saved(tmp_path, build, method, **options)
    ours = build()
    plan = load_adapter(ours, tmp_path)
    top = max([options["r"], *options.get("rank_pattern", {}).values()])
    assert plan.method == method and plan.config.rank == top  # one adapter, padded to the largest
    x = tokens()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_factors_of_another_rank_than_the_pattern_says_are_refused(tmp_path):
    _peft_saved(tmp_path, llama, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"layers.0.self_attn.q_proj": 2})
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"layers.0.self_attn.q_proj": 3}
    cfg_path.write_text(json.dumps(cfg))
    model = llama()
    with pytest.raises(CheckpointError, match=r"lora_A.weight has rank 2 but the config gives this layer rank 3"):
        load_adapter(model, tmp_path)
    assert not adapted_layers(model)  # nothing attached
    cfg["rank_pattern"] = {"q_proj": 0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank_pattern must map module patterns to positive integer ranks"):
        load_adapter(model, tmp_path)
    cfg["rank_pattern"] = {"q_proj(": 2}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is not a regex"):
        load_adapter(model, tmp_path)


def test_a_layer_the_pattern_gives_a_rank_is_padded_and_its_b_rescaled(tmp_path):
    """The mechanism: rank 2 at alpha 8 (scaling 4) inside a rank-4 adapter (scaling 2)."""
    _peft_saved(tmp_path, llama, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"layers.0.self_attn.q_proj": 2})
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    model = llama()
    load_adapter(model, tmp_path)
    ad = adapted_layers(model)["model.layers.0.self_attn.q_proj"].adapters["default"]
    torch.testing.assert_close(ad.lora_A[:2], saved[key.format("A")])
    assert not ad.lora_A[2:].any() and not ad.lora_B[:, 2:].any()
    torch.testing.assert_close(ad.lora_B[:, :2], saved[key.format("B")] * 2.0)
