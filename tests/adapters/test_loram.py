"""LoRAM: a LoRA trained on a pruned copy, recovered to the full model's shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trained

from rankwise.adapters import attach, disable
from rankwise.adapters.inject import adapted_layers
from rankwise.adapters.local_training import lm_loss
from rankwise.adapters.loram import LoramConfig, loram, loram_prune, recover
from rankwise.adapters.structure import decoder_shape, head_rows
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
