"""SVFit: train only the top-r singular values of ``W``, ``x ↦ W x + s · U diag(Δσ) Vᵀ x``.

``U`` (out, r) and ``Vᵀ`` (r, in) are the top-r singular vectors of the pre-trained ``W``
(randomized SVD), frozen buffers saved with the adapter; the trainable ``Δσ`` (r,)
starts at zero. The paper writes the adapted weight as ``W_res + U diag(σ') Vᵀ`` with
``σ'`` trained from the singular values; ``σ' = σ + s·Δσ`` is the same model without
touching the base weight. ``r`` parameters per layer. "SVFit: Parameter-Efficient
Fine-Tuning of Large Pre-Trained Models Using Singular Values", 2024, Sec. 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter, register_method
from rankwise.adapters.init import float_weight
from rankwise.adapters.methods.lora_xs import LoraXSAdapter, LoraXSConfig


@dataclass(frozen=True)
class SVFitConfig(LoraXSConfig):
    """SVFit options: rank, alpha, dropout, and the SVD's ``n_iter``, ``exact``, ``seed``."""


@register_method("svfit")
class SVFitAdapter(LoraXSAdapter):
    """``ΔW = s · U diag(Δσ) Vᵀ`` (``lora_B = U``, ``lora_A = Vᵀ``, ``lora_sigma = Δσ``)."""

    summary = "SVFit: train only offsets of the top-r singular values of W (2024)"
    config_class = SVFitConfig
    update_start = Adapter.update_start  # LoRA-SB's start is for lora_xs / lora_sb only

    def build(self) -> None:
        r, out, inp = self.config.rank, self.layer.out_features, self.layer.in_features
        self.register_buffer("lora_B", self._factor(out, r, trainable=False))
        self.register_buffer("lora_A", self._factor(r, inp, trainable=False))
        self.lora_sigma = self._factor(r, trainable=True)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_sigma)
            if self.lora_A.is_meta:
                return
            U, _, Vh = self.config.svd_of(float_weight(self, self.method))
            self.lora_B.copy_(U)
            self.lora_A.copy_(Vh)

    def inner(self) -> torch.Tensor:
        return self.lora_sigma[:, None] * self.lora_A  # diag(Δσ) Vᵀ, (r, in)
