"""LoRAPrune's importance estimate, accumulated during training from LoRA gradients only.

"LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning" (Zhang et al., 2023):
the first-order importance of a weight, ``|W'_ij · ∂L/∂W_ij|``, needs the gradient of the
frozen weight, which LoRA never computes. With ``W' = W + s·B A`` the LoRA gradients are
``G_B = s·G Aᵀ`` and ``G_A = s·Bᵀ G``, so ``G_B A + B G_A = s·(G AᵀA + B Bᵀ G)`` is the full
gradient ``G`` seen through the adapter's subspaces — what LoRAPrune uses in its place:

    I = |(W + s·B A) ⊙ (G_B A + B G_A)|

A unit's importance is the sum over its weights (a query head: its ``q_proj`` rows and
``o_proj`` columns; an MLP channel: its ``gate_proj``/``up_proj`` rows and ``down_proj``
column), smoothed over steps with a moving average ``Ī ← m·Ī + (1 - m)·I``.
``rankwise.adapters.prune.lora_prune`` reads :attr:`LoraPruneImportance.scores` to decide
what to remove.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter
from rankwise.adapters.inject import AdaptedLayer
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule
from rankwise.adapters.structure import ATTN, Block, Shape, decoder_blocks, decoder_shape
from rankwise.errors import ConfigError

ADAPTED = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # where importance is read


@dataclass(frozen=True)
class LoraPruneImportanceConfig(RuleConfig):
    """``momentum``: the moving-average factor ``m`` of the importance (0: last step only)."""

    momentum: float = 0.9

    def validate(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")


def lora_gradient_importance(layer: AdaptedLayer, name: str = "default") -> torch.Tensor:
    """``|(W + s·B A) ⊙ (G_B A + B G_A)|`` (out, in) for LoRA adapter ``name`` on ``layer``,
    from the LoRA factors' ``.grad`` (call after backward, before the optimizer step)."""
    adapter = layer.adapters[name]
    b, a = adapter.lora_B, adapter.lora_A
    if b.grad is None or a.grad is None:
        raise ConfigError(
            "LoRA-guided importance needs the LoRA gradients: call it after backward, with the "
            "adapter trainable"
        )
    grad = b.grad.float() @ a.detach().float() + b.detach().float() @ a.grad.float()
    weight = layer.view.weight_matrix().float() + adapter.delta_weight().detach()
    return (weight * grad).abs()


def unit_importance(block: Block, shape: Shape, name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """``(per query head (heads,), per MLP channel (channels,))`` importance of one layer."""

    def imp(module: nn.Module) -> torch.Tensor:
        return lora_gradient_importance(module, name)

    q = imp(block.attn.q_proj).sum(1).view(shape.heads, shape.head_dim).sum(1)
    o = imp(block.attn.o_proj).sum(0).view(shape.heads, shape.head_dim).sum(1)
    mlp = imp(block.mlp.gate_proj).sum(1) + imp(block.mlp.up_proj).sum(1)
    return q + o, mlp + imp(block.mlp.down_proj).sum(0)


def check_lora_on_units(model: nn.Module, name: str = "default") -> None:
    """ConfigError unless every q/o/gate/up/down projection carries LoRA adapter ``name``."""
    missing = []
    for block in decoder_blocks(model):
        for proj in ADAPTED:
            module = getattr(block.attn if proj in ATTN else block.mlp, proj)
            adapter = module.adapters[name] if isinstance(module, AdaptedLayer) and name in module.adapters else None
            if adapter is None or adapter.lowrank_factors() is None:
                missing.append(f"{block.prefix}.{'self_attn' if proj in ATTN else 'mlp'}.{proj}")
    if missing:
        raise ConfigError(
            f"LoRA-guided pruning reads LoRA gradients on {list(ADAPTED)}; no LoRA adapter "
            f"{name!r} on {missing[:3]}{' ...' if len(missing) > 3 else ''}; attach "
            f"method='lora' with targets={list(ADAPTED)} (or 'all-linear')"
        )


@register_rule("lora_prune_importance")
class LoraPruneImportance(TrainingRule):
    """LoRAPrune: head/channel importance from LoRA weights and gradients (moving average; lora_prune reads it)."""

    config_class = LoraPruneImportanceConfig
    works_with = "method 'lora' on q/o/gate/up/down projections of a Llama-style decoder"

    def __init__(self, config: LoraPruneImportanceConfig | None = None) -> None:
        super().__init__(config)
        self.scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (heads, channels)
        self.updates = 0

    def applies_to(self, adapter: Adapter) -> str | None:
        if adapter.lowrank_factors() is None:
            return f"{adapter.method!r} is not a plain LoRA (lora_A, lora_B)"
        return None

    def setup(self, model, adapters: Mapping[str, Adapter], optimizer, *, steps: int) -> None:
        super().setup(model, adapters, optimizer, steps=steps)
        check_lora_on_units(model)

    def after_backward(self, step: int) -> None:
        shape = decoder_shape(self.model)
        m = self.config.momentum
        fresh = [unit_importance(block, shape) for block in decoder_blocks(self.model)]
        sizes = [(h.shape, c.shape) for h, c in self.scores]
        if sizes != [(h.shape, c.shape) for h, c in fresh]:  # first step, or pruned without keep()
            self.scores = fresh
        else:
            self.scores = [
                (m * h + (1 - m) * nh, m * c + (1 - m) * nc)
                for (h, c), (nh, nc) in zip(self.scores, fresh, strict=True)
            ]
        self.updates += 1

    def keep(self, heads: list[torch.Tensor], channels: list[torch.Tensor]) -> None:
        """Drop the scores of removed units (after :func:`~rankwise.adapters.structure.prune_units`)."""
        self.scores = [(h[kh], c[kc]) for (h, c), kh, kc in zip(self.scores, heads, channels, strict=True)]

    def state_dict(self) -> dict:
        return {"updates": self.updates, "scores": [t for pair in self.scores for t in pair]}

    def load_state_dict(self, state) -> None:
        flat = list(state.get("scores", []))
        self.scores = list(zip(flat[0::2], flat[1::2], strict=True))
        self.updates = int(state.get("updates", 0))
