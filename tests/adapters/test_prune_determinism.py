"""LoRAPrune is reproducible from its config seed alone (issue 16: the bench's LoRAPrune
perplexity moved between two runs because the LoRA init drew from torch's global generator,
which torch seeds differently in every process)."""

from __future__ import annotations

import dataclasses

import torch

from rankwise.adapters.prune import LoraPruneConfig, lora_prune
from rankwise.models import tiny_llama

CONFIG = LoraPruneConfig(ratio=0.5, iterations=2, steps_per_iteration=2, recovery_steps=1, rank=4, lr=3e-3)


def blocks() -> torch.Tensor:
    return torch.randint(0, 260, (8, 32), generator=torch.Generator().manual_seed(0))


def pruned(global_seed: int, config: LoraPruneConfig = CONFIG) -> dict[str, torch.Tensor]:
    """The parameters after lora_prune, run with the global generator in another state."""
    torch.manual_seed(global_seed)  # stands for whatever the caller drew before (bench rows)
    model, _ = tiny_llama()
    lora_prune(model, blocks(), config)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [name for name in a if a[name].shape != b[name].shape or not torch.equal(a[name], b[name])]
    assert not differ, f"parameters differ between two runs with the same seed: {differ[:4]}"


def test_same_seed_gives_identical_parameters_whatever_the_global_generator():
    assert_same(pruned(1), pruned(2))


def test_the_seed_matters_and_the_callers_generator_is_left_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model, _ = tiny_llama()
    lora_prune(model, blocks(), CONFIG)
    assert torch.equal(torch.rand(3), expected)  # lora_prune neither drew from nor reseeded it
    a, b = pruned(1), pruned(1, dataclasses.replace(CONFIG, seed=1))
    assert any(not torch.equal(a[n], b[n]) for n in a if "lora_A" in n)
