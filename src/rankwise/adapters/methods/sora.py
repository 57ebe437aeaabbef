"""SoRA: LoRA with a gate vector whose proximal (L1) updates prune rank during training.

"Sparse Low-rank Adaptation of Pre-trained Language Models", Ding et al. 2023. The update is
``Δ(x) = s · B (g ⊙ (A x))`` with a gate ``g ∈ R^r`` that starts at ones. ``A`` and ``B``
train with the optimizer like LoRA's factors; the gate does not: after each backward the
training loop calls :meth:`SoraAdapter.before_optimizer_step`, which takes a proximal
gradient step on ``g`` for the loss plus ``sparsity · ||g||₁``::

    g ← soft_threshold(g − η ∇g, η · sparsity),   soft_threshold(v, t) = sign(v) · max(|v| − t, 0)

(``η`` = ``gate_lr``, or the optimizer's current learning rate) and clears the gate's
gradient so the optimizer leaves it alone. Soft thresholding sets entries to exactly zero,
and a zero gate stays zero unless its gradient is large enough to pull it out, so the rank
of each layer shrinks during training to what the data needs; :func:`sora_ranks` reads it.
After training the zeroed components contribute nothing; merging folds ``g`` into ``ΔW``.

Saved in rankwise's format (PEFT has no SoRA), gate included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import AdapterConfig, register_method
from rankwise.adapters.methods.lora import LoraAdapter
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class SoraConfig(AdapterConfig):
    """``sparsity``: the L1 weight λ on the gate; ``gate_lr``: the gate's step size (None: the
    optimizer's learning rate at that step)."""

    sparsity: float = 1e-3
    gate_lr: float | None = None

    def validate(self) -> None:
        super().validate()
        if not self.sparsity >= 0:
            raise ConfigError(f"sparsity (the gate's L1 weight) must be >= 0; got {self.sparsity!r}")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise ConfigError(f"gate_lr must be a positive number or None; got {self.gate_lr!r}")


def soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    """``sign(v) · max(|v| − t, 0)``: the proximal map of ``t · ||·||₁``."""
    return v.sign() * (v.abs() - t).clamp_min(0)


@register_method("sora")
class SoraAdapter(LoraAdapter):
    """``Δ(x) = s · B (g ⊙ A x)``; the gate ``g`` is trained by proximal gradient steps."""

    summary = "SoRA: LoRA with an L1-gated rank, pruned during training by proximal steps (Ding et al. 2023)"
    config_class = SoraConfig

    def build(self) -> None:
        super().build()
        self.gate = nn.Parameter(torch.ones(self.config.rank, device=self.layer.device, dtype=self.param_dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.gate)

    def _gated_a(self) -> torch.Tensor:
        return self.lora_A * self.gate[:, None]

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h = self.layer.project_in(x, self._gated_a())
        return self.layer.project_out(h, self.lora_B) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h = self.layer.project_in(x, self._gated_a())
        return self.layer.add_projected(y, h, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self._gated_a().float()) * self.scaling

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(g ⊙ A, B, s)``: the gate folded into ``A`` (batched serving)."""
        if self.layer.kind not in ("linear", "transposed_linear"):
            return None
        return self._gated_a(), self.lora_B, self.scaling

    def before_optimizer_step(self, lr: float) -> None:
        """The gate's proximal step (see the module docstring); clears its gradient."""
        g = self.gate
        if g.grad is None or not g.requires_grad:
            return
        step = self.config.gate_lr if self.config.gate_lr is not None else lr
        with torch.no_grad():
            g.copy_(soft_threshold(g - step * g.grad, step * self.config.sparsity))
        g.grad = None

    @property
    def active_rank(self) -> int:
        """How many gate entries are non-zero."""
        return int(torch.count_nonzero(self.gate.detach()))

    def peft_config(self) -> dict[str, Any] | None:
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}, sparsity={self.config.sparsity:g}"


def sora_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Per layer, the rank a SoRA adapter ``name`` has left (non-zero gate entries)."""
    from rankwise.adapters.inject import adapted_layers

    return {
        path: layer.adapters[name].active_rank
        for path, layer in adapted_layers(model).items()
        if name in layer.adapters and isinstance(layer.adapters[name], SoraAdapter)
    }
