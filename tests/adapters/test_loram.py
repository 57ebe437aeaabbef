"""LoRAM: a LoRA trained on a pruned copy, recovered to the full model's shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trained

from rankwise.adapters import attach, disable
from rankwise.adapters.inject import adapted_layers
from rankwise.adapters.local_training import lm_loss
from rankwise.adapters.loram import LoramConfig, align, loram, loram_prune, recover
from rankwise.adapters.structure import decoder_shape, head_rows
from rankwise.data import load_corpus
from rankwise.errors import ConfigError
from rankwise.models import tiny_llama

TASK = [
    "def add(a, b):\n    return a + b\n",
    "def mul(x, y):\n    return x * y\n",
    "def sub(p, q):\n    return p - q\n",
] * 30


def task_blocks(tok, seq_len=32):
    ids = torch.tensor(tok("".join(TASK))["input_ids"])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def test_recovered_adapter_on_full_model_equals_pruned_model():
    full, _ = tiny_llama()
    small, prune_map = loram_prune(full, 0.5, criterion="random", seed=3)
    assert decoder_shape(small).heads == 2 and decoder_shape(full).heads == 4
    attach(small, "lora", "all-linear", rank=4)
    make_trained(small)
    recover(small, full, prune_map)
    # zero the removed units of the full base: it then computes what the small model does
    with torch.no_grad():
        for path, layer in adapted_layers(full).items():
            rows, cols = prune_map.rows_cols(path)
            w = layer.base_layer.weight
            if rows is not None:
                mask = torch.ones(w.shape[0], dtype=torch.bool)
                mask[rows] = False
                w[mask] = 0
            if cols is not None:
                mask = torch.ones(w.shape[1], dtype=torch.bool)
                mask[cols] = False
                w[:, mask] = 0
    x = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(full(input_ids=x).logits, small(input_ids=x).logits, rtol=1e-4, atol=1e-5)


def test_recovered_factors_are_zero_on_removed_units():
    full, _ = tiny_llama()
    small, prune_map = loram_prune(full, 0.5)
    attach(small, "lora", ["q_proj", "down_proj"], rank=2)
    make_trained(small)
    recover(small, full, prune_map)
    layers = adapted_layers(full)
    q = layers["model.layers.0.self_attn.q_proj"].adapters["default"].lora_B
    kept = head_rows(prune_map.heads[0], decoder_shape(full).head_dim)
    assert q.shape[0] == 64 and int((q.abs().sum(1) > 0).sum()) == len(kept)
    down = layers["model.layers.1.mlp.down_proj"].adapters["default"].lora_A
    assert down.shape[1] == 128 and int((down.abs().sum(0) > 0).sum()) == 64


def test_loram_beats_no_adapter_on_the_task():
    model, tok = tiny_llama()
    blocks = task_blocks(tok)
    result = loram(model, blocks, LoramConfig(ratio=0.5, steps=40, lr=5e-3))
    assert result.parameters[1] < result.parameters[0]
    model.eval()
    with torch.no_grad():
        adapted = lm_loss(model, blocks[:16]).item()
        with disable(model):
            base = lm_loss(model, blocks[:16]).item()
    assert adapted < base - 0.3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ratio": 1.0}, r"ratio .* must be in \(0, 1\)"),
    ({"ratio": 0.001}, "larger ratio"),
    ({"criterion": "biggest"}, "criterion must be one of"),
])
def test_bad_pruning_options(kwargs, match):
    model, _ = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        loram_prune(model, **{"ratio": 0.5, **kwargs})


def test_recover_refuses_another_model_and_a_missing_adapter():
    full, _ = tiny_llama()
    small, prune_map = loram_prune(full, 0.5)
    with pytest.raises(ConfigError, match="train one on it first"):
        recover(small, full, prune_map)
    attach(small, "lora", ["q_proj"], rank=2)
    make_trained(small)
    other, _ = tiny_llama(hidden=48)
    with pytest.raises(ConfigError, match="recover onto the model that was pruned"):
        recover(small, other, prune_map)
    attach(full, "lora", ["q_proj"], rank=2)
    with pytest.raises(ConfigError, match="before attaching adapters"):
        loram_prune(full, 0.5)


def corpus_blocks(tok, texts, seq_len=32, max_tokens=6000):
    ids = torch.tensor(tok("\n".join(texts))["input_ids"][:max_tokens])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@pytest.fixture(scope="module")
def general():
    """General text: training blocks for the alignment and held-out blocks to judge it."""
    corpus = load_corpus()
    _, tok = tiny_llama()
    return corpus_blocks(tok, corpus.train[:40]), corpus_blocks(tok, corpus.validation[:20], max_tokens=1600)


def held_loss(model, blocks):
    model.eval()
    with torch.no_grad():
        return lm_loss(model, blocks).item()


def test_alignment_lowers_the_pruned_models_loss_on_held_text(general):
    train, held = general
    full, _ = tiny_llama()
    small, _ = loram_prune(full, 0.5)
    before = held_loss(small, held)
    flags = [p.requires_grad for p in small.parameters()]
    full_weights = {k: v.clone() for k, v in full.state_dict().items()}
    losses = align(small, train, steps=30, lr=3e-3)
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert held_loss(small, held) < before - 0.3
    assert [p.requires_grad for p in small.parameters()] == flags  # restored
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in full_weights.items())  # the full model is untouched


def test_loram_with_alignment_recovers_full_shaped_adapter_onto_the_untouched_model(general):
    train, held = general
    model, tok = tiny_llama()
    blocks = task_blocks(tok)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    # a small align_lr: on a random tiny model, a strong alignment moves the copy away from
    # the full model (there is no knowledge to recover), and its LoRA then fits the full one less
    config = LoramConfig(ratio=0.5, steps=20, lr=5e-3, align_steps=20, align_lr=3e-4)
    result = loram(model, blocks, config, align_blocks=train)
    assert len(result.align_losses) == 20 and result.align_losses[-1] < result.align_losses[0]
    layers = adapted_layers(model)
    after = {k.replace(".base_layer", ""): v for k, v in model.named_parameters() if ".adapters." not in k}
    assert after.keys() == weights.keys()  # the base weights are unchanged: alignment trained only the copy
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    shape = decoder_shape(model)
    q = layers["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert q.lora_B.shape == (shape.heads * shape.head_dim, 8) and q.lora_A.shape == (8, 64)
    down = layers["model.layers.1.mlp.down_proj"].adapters["default"]
    assert down.lora_A.shape == (8, shape.channels) and int((down.lora_A.abs().sum(0) > 0).sum()) == shape.channels // 2
    model.eval()
    with torch.no_grad():
        adapted = lm_loss(model, blocks[:16]).item()
        with disable(model):
            base = lm_loss(model, blocks[:16]).item()
    assert adapted < base - 0.2


@pytest.mark.parametrize(("kwargs", "align_given", "match"), [
    ({"align_steps": 5}, False, "align_blocks"),
    ({}, True, "align_steps > 0"),
    ({"align_steps": -1}, False, "align_steps must be an integer >= 0"),
    ({"align_steps": 2, "align_lr": 0.0}, True, "align_lr must be a positive number"),
])
def test_bad_alignment_options_name_the_option(general, kwargs, align_given, match):
    model, tok = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        loram(model, task_blocks(tok), LoramConfig(**kwargs), align_blocks=general[0] if align_given else None)
    assert not adapted_layers(model)


def test_align_refuses_a_pruned_model_that_already_has_its_lora(general):
    full, _ = tiny_llama()
    small, _ = loram_prune(full, 0.5)
    attach(small, "lora", ["q_proj"], rank=2)
    with pytest.raises(ConfigError, match="before attaching its LoRA"):
        align(small, general[0], steps=2)
