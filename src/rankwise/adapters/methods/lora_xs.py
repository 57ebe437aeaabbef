"""LoRA-XS: a trainable r×r matrix between frozen SVD factors, ``x ↦ W x + s · B R A x``.

``B = U_r S_r`` (out, r) and ``A = V_rᵀ`` (r, in) come from the top-r (randomized) SVD of
the pre-trained ``W`` and stay frozen (buffers, saved with the adapter); only ``R``
(r, r) trains, so a layer costs ``r²`` parameters whatever its size. ``R`` starts at zero,
so the adapted model starts equal to the base. "LoRA-XS: Low-Rank Adaptation with
Extremely Small Number of Parameters", Bałazy et al. 2024, eq. (2).

:class:`LoraXSAdapter` is also the shape ``lora_sb`` and ``nlora`` build on (and
``svfit``, with a diagonal ``R``): subclasses change which factors train and how they
start, and :meth:`LoraXSAdapter.inner` says what ``R A`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import Adapter, LayerView, register_method
from rankwise.adapters.init import SVDInitConfig, float_weight


@dataclass(frozen=True)
class LoraXSConfig(SVDInitConfig):
    """LoRA-XS options: rank, alpha, dropout, plus the SVD's ``n_iter``, ``exact``, ``seed``."""


@register_method("lora_xs")
class LoraXSAdapter(Adapter):
    """``Δ(x) = s · B (R A) x``; ``ΔW = s · B R A``; ``B``, ``A`` frozen, ``R`` trained."""

    summary = "LoRA-XS: trainable r×r matrix between frozen SVD factors of W (Bałazy et al. 2024)"
    config_class = LoraXSConfig

    def _factor(self, *shape: int, trainable: bool) -> torch.Tensor | nn.Parameter:
        t = torch.zeros(*shape, device=self.layer.device, dtype=self.param_dtype)
        return nn.Parameter(t) if trainable else t

    def build(self) -> None:
        r, out, inp = self.config.rank, self.layer.out_features, self.layer.in_features
        self.register_buffer("lora_B", self._factor(out, r, trainable=False))
        self.register_buffer("lora_A", self._factor(r, inp, trainable=False))
        self.lora_R = self._factor(r, r, trainable=True)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lora_R.zero_()
            if self.lora_A.is_meta:  # a shape-only probe (dry run, load validation)
                return
            U, S, Vh = self.config.svd_of(float_weight(self, self.method))
            self.lora_B.copy_(U * S)
            self.lora_A.copy_(Vh)

    @classmethod
    def check_layer(cls, layer: LayerView, config: Any) -> str | None:
        if layer.is_quantized:
            return f"{cls.method} needs the base weight's SVD, but it is quantized"
        return super().check_layer(layer, config)

    def inner(self) -> torch.Tensor:
        """The ``(r, in)`` matrix applied before ``B``: here ``R A``."""
        return self.lora_R @ self.lora_A

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h = self.layer.project_in(x, self.inner())
        return self.layer.project_out(h, self.lora_B) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h = self.layer.project_in(x, self.inner())
        return self.layer.add_projected(y, h, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.inner().float()) * self.scaling

    def update_start(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
    ) -> Callable[[], None]:
        """LoRA-SB's start (``init="lora_sb"``, for lora_xs and lora_sb) from an update's top-r SVD: ``B = U/√s``, ``R = diag(S)``,
        ``A = Vh/√s``, so ``s·B R A = U diag(S) Vh`` and ``√s·B``, ``√s·A`` are orthonormal."""
        root = math.sqrt(self.scaling)
        b, r, a = u / root, torch.diag(s), vh / root

        def write() -> None:
            with torch.no_grad():
                self.lora_B.copy_(b)
                self.lora_R.copy_(r)
                self.lora_A.copy_(a)

        return write
