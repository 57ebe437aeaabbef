"""LoRAPrune: importance from LoRA gradients, physical head/channel removal, smaller model."""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2, make_trained

import rankwise
from rankwise.adapters import attach
from rankwise.adapters.inject import adapted_layers
from rankwise.adapters.prune import LoraPruneConfig, lora_prune, save_pruned
from rankwise.adapters.rules import build_rules, rule_names
from rankwise.adapters.rules.lora_prune_importance import lora_gradient_importance
from rankwise.adapters.structure import decoder_shape, head_rows, prune_units, top_units
from rankwise.data import load_corpus, perplexity
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama


def text_blocks(tok, texts, seq_len=64):
    ids = torch.tensor(tok("\n".join(texts))["input_ids"])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_importance_is_lora_projection_of_the_full_gradient():
    model, _ = tiny_llama()
    attach(model, "lora", ["q_proj"], rank=4, alpha=8)
    make_trained(model)
    layer = adapted_layers(model)["model.layers.0.self_attn.q_proj"]
    layer.base_layer.weight.requires_grad_(True)  # only to get the true gradient for the check
    x = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    g = layer.base_layer.weight.grad.float()
    a, b, s = layer.adapters["default"].lora_A.detach(), layer.adapters["default"].lora_B.detach(), 2.0
    expected = ((layer.base_layer.weight.detach() + s * b @ a) * s * (g @ a.T @ a + b @ b.T @ g)).abs()
    torch.testing.assert_close(lora_gradient_importance(layer), expected, rtol=1e-4, atol=1e-7)


def test_removing_dead_heads_and_channels_keeps_outputs():
    model, _ = tiny_llama()
    shape = decoder_shape(model)  # 4 query heads in 2 groups, 128 channels
    attach(model, "lora", "all-linear", rank=4)
    make_trained(model)
    heads, channels = torch.tensor([0, 3]), torch.arange(0, 128, 2)
    dead_heads = head_rows(torch.tensor([1, 2]), shape.head_dim)
    dead_channels = torch.arange(1, 128, 2)
    with torch.no_grad():  # make the removed units contribute nothing, adapters included
        for path, layer in adapted_layers(model).items():
            if path.endswith("o_proj"):
                layer.base_layer.weight[:, dead_heads] = 0
                layer.adapters["default"].lora_A[:, dead_heads] = 0
            if path.endswith("down_proj"):
                layer.base_layer.weight[:, dead_channels] = 0
                layer.adapters["default"].lora_A[:, dead_channels] = 0
    x = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=x).logits
    prune_units(model, [heads, heads], [channels, channels])
    after = model(input_ids=x).logits
    assert decoder_shape(model).heads == 2 and model.config.intermediate_size == 64
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_top_units_keeps_the_best_of_each_group():
    model, _ = tiny_llama()
    shape = decoder_shape(model)
    heads, channels = top_units(shape, torch.tensor([1.0, 5.0, 7.0, 2.0]), torch.arange(128.0), 1, 3)
    assert heads.tolist() == [1, 2] and channels.tolist() == [125, 126, 127]


def test_lora_prune_makes_a_smaller_model_that_saves_and_loads(tmp_path, corpus):
    model, tok = tiny_llama()
    blocks = text_blocks(tok, corpus.train[:60])
    ppl = lambda m: perplexity(m, tok, corpus.validation[:20], seq_len=64, max_tokens=3000).perplexity  # noqa: E731
    before = ppl(model)
    config = LoraPruneConfig(ratio=0.5, iterations=2, steps_per_iteration=15, recovery_steps=15, lr=3e-3)
    result = lora_prune(model, blocks, config)
    assert result.heads == (4, 2) and result.channels == (128, 64)
    assert result.parameters[1] < result.parameters[0]
    assert result.schedule == [0.25, 0.5]
    after = ppl(model)
    assert after < before  # the LoRA trained on the corpus while the model was cut
    save_pruned(model, tok, tmp_path / "pruned")
    loaded, tok2 = rankwise.load_model(str(tmp_path / "pruned"))
    assert loaded.config.num_attention_heads == 2 and loaded.config.intermediate_size == 64
    assert sum(p.numel() for p in loaded.parameters()) == result.parameters[1]
    x = blocks[:2]
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert ppl(loaded) == pytest.approx(after, rel=1e-3)


def test_the_importance_rule_is_registered_and_refuses_other_methods():
    assert "lora_prune_importance" in rule_names()
    rule = build_rules(["lora_prune_importance"], {"momentum": 0.5})[0]
    model, _ = tiny_llama()
    attach(model, "dora", ["q_proj"], rank=2)
    adapter = next(iter(adapted_layers(model).values())).adapters["default"]
    assert "not a plain LoRA" in rule.applies_to(adapter)
    with pytest.raises(ConfigError, match="momentum"):
        build_rules(["lora_prune_importance"], {"momentum": 1.5})


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_bad_ratio_names_the_range(ratio):
    with pytest.raises(ConfigError, match=r"ratio .* must be in \(0, 1\)"):
        LoraPruneConfig(ratio=ratio)


def test_bad_models_and_adapters():
    model, _ = tiny_llama()
    with pytest.raises(ConfigError, match="larger ratio"):
        lora_prune(model, torch.zeros(4, 8, dtype=torch.long), LoraPruneConfig(ratio=0.001))
    with pytest.raises(ConfigError, match="Llama-style"):
        lora_prune(gpt2(), torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match="non-empty"):  # refused before anything is attached
        lora_prune(model, torch.zeros(0, 8, dtype=torch.long))
    assert adapted_layers(model) == {}
    attach(model, "lora", ["q_proj", "v_proj"], rank=2)
    with pytest.raises(ConfigError, match="targets="):
        lora_prune(model, torch.zeros(4, 8, dtype=torch.long))
