"""LoRA: a trainable rank-r update ``x ↦ W x + s · B A x``.

``A`` is ``(r, in)``, ``B`` is ``(out, r)``, ``s = alpha / r`` (or ``alpha / √r`` with
``use_rslora``, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023).
``B`` starts at zero so the adapted model starts equal to the base model; ``A`` starts
like a linear layer's weight (Kaiming-uniform). "LoRA: Low-Rank Adaptation of Large
Language Models", Hu et al. 2021, eq. (3).

On disk in PEFT format these are ``lora_A.weight`` / ``lora_B.weight`` (conv layers keep
the kernel shape there; embeddings use ``lora_embedding_A`` / ``lora_embedding_B``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, register_method


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA options: everything is in :class:`AdapterConfig` (rank, alpha, dropout, use_rslora)."""


@register_method("lora")
class LoraAdapter(Adapter):
    """``Δ(x) = s · B (A x)``; ``ΔW = s · B A``."""

    summary = "LoRA: trainable rank-r update s·B A (Hu et al. 2021); PEFT format"
    config_class = LoraConfig

    def build(self) -> None:
        r, dev, dt = self.config.rank, self.layer.device, self.param_dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.layer.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(self.layer.out_features, r, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h = self.layer.project_in(x, self.lora_A)
        return self.layer.project_out(h, self.lora_B) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        # one fused multiply-add into y: no full-size (tokens × out) temporary for B A x
        h = self.layer.project_in(x, self.lora_A)
        return self.layer.add_projected(y, h, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, s)`` on a linear layer. A subclass whose forward differs (DyLoRA's rank,
        SoRA's gate, DoRA's norm) gets None unless it overrides this method as well."""
        cls = type(self)
        if cls.compose is not LoraAdapter.compose or cls.delta is not LoraAdapter.delta:
            return None
        if self.layer.kind not in ("linear", "transposed_linear"):
            return None
        return self.lora_A, self.lora_B, self.scaling

    # -- PEFT format
    def _peft_names(self) -> tuple[str, str]:
        if self.layer.kind == "embedding":
            return "lora_embedding_A", "lora_embedding_B"
        return "lora_A.weight", "lora_B.weight"

    def peft_config(self) -> dict[str, Any] | None:
        c = self.config
        return {
            "peft_type": "LORA",
            "r": c.rank,
            "lora_alpha": float(c.rank if c.alpha is None else c.alpha),
            "lora_dropout": float(c.dropout),
            "use_rslora": bool(c.use_rslora),
            "use_dora": False,
            "fan_in_fan_out": self.layer.kind == "transposed_linear",
            "bias": "none",
            "init_lora_weights": True,
        }

    def peft_state(self) -> dict[str, torch.Tensor]:
        name_a, name_b = self._peft_names()
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if self.layer.kind == "conv":  # PEFT keeps conv kernels: A (r, in, *k), B (out, r, 1…)
            w = self.layer.weight
            a = a.reshape(a.shape[0], *w.shape[1:])
            b = b.reshape(*b.shape, *(1,) * (w.dim() - 2))
        return {name_a: a, name_b: b}

    def peft_to_native(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name_a, name_b = self._peft_names()
        return {
            "lora_A": tensors[name_a].reshape(self.lora_A.shape),
            "lora_B": tensors[name_b].reshape(self.lora_B.shape),
        }
