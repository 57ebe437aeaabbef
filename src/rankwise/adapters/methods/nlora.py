"""NLoRA: three trainable factors ``x ↦ W_res x + s · B M A x``, started by Nyström.

StructuredLoRA (SLoRA) puts a small ``M`` (r, r) between LoRA's ``A`` (r, in) and ``B``
(out, r). NLoRA initialises it from the generalized Nyström approximation
``W ≈ (WX)(YᵀWX)⁺(YᵀW)`` (two sketches, no SVD): ``B``, ``A`` orthonormal, ``M`` the
core, and the base becomes ``W_res = W - s·B M A`` so the model starts unchanged (the
default ``init="nystrom"``, :func:`rankwise.adapters.init.nystrom`). With
``int_tune=True`` (IntermediateTune) only ``M`` trains (``r²`` parameters per layer; ``B``
and ``A`` are frozen buffers); otherwise ``r(out + in) + r²``. "NLoRA: Nyström-Initiated
Low-Rank Adaptation for Large Language Models", 2025, Sec. 3.

``init="default"`` is SLoRA's plain start: ``A`` Kaiming-uniform, ``M = I``, ``B = 0``
(with ``int_tune`` that trains nothing; it exists for loading saved adapters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, register_method
from rankwise.adapters.methods.lora_xs import LoraXSAdapter


@dataclass(frozen=True)
class NLoraConfig(AdapterConfig):
    """NLoRA options: rank, alpha, dropout, ``int_tune`` (train only ``M``); init "nystrom"."""

    init: str = "nystrom"
    int_tune: bool = False


@register_method("nlora")
class NLoraAdapter(LoraXSAdapter):
    """``ΔW = s · B M A`` (``lora_B``, ``lora_R`` = M, ``lora_A``); ``B``, ``A`` frozen with
    ``int_tune``."""

    summary = "NLoRA: B M A factors started by a Nyström sketch on a residual base (2025)"
    config_class = NLoraConfig
    update_start = Adapter.update_start  # LoRA-SB's start is for lora_xs / lora_sb only

    def build(self) -> None:
        r, out, inp = self.config.rank, self.layer.out_features, self.layer.in_features
        train = not self.config.int_tune
        for name, shape in (("lora_B", (out, r)), ("lora_A", (r, inp))):
            t = self._factor(*shape, trainable=train)
            if train:
                setattr(self, name, t)
            else:
                self.register_buffer(name, t)
        self.lora_R = self._factor(r, r, trainable=True)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_R.copy_(torch.eye(self.config.rank))
            self.lora_B.zero_()

    def lowrank_start(
        self, b: torch.Tensor, core: torch.Tensor, a: torch.Tensor
    ) -> Callable[[], None]:
        """NLoRA's start: ``B = b``, ``M = core / s``, ``A = a`` (``s·B M A = b core a``)."""
        m = core / self.scaling

        def write() -> None:
            with torch.no_grad():
                self.lora_B.copy_(b)
                self.lora_R.copy_(m)
                self.lora_A.copy_(a)

        return write

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B M, A)``: ``ΔW = s · (B M) A``."""
        return self.lora_B @ self.lora_R, self.lora_A
