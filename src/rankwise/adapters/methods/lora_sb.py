"""LoRA-SB: LoRA-XS's ``B R A`` started from the first full fine-tuning step.

Same architecture as ``lora_xs`` (frozen ``B`` (out, r), ``A`` (r, in); trainable ``R``
(r, r); ``r²`` parameters per layer), but the default ``init="lora_sb"`` estimates the
first update of full fine-tuning from a few batches (``init_options={"inputs": ids}``)
and sets ``B = U/√s``, ``A = Vh/√s``, ``R = diag(S)`` from its top-r SVD, so ``s·B R A``
is that update's best rank-r approximation and training ``R`` follows the projected
full gradient regardless of ``alpha`` (see :func:`rankwise.adapters.init.lora_sb`).
"Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning", Ponkshe et al. 2024.

``init="default"`` falls back to LoRA-XS's SVD-of-``W`` start (used when loading).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.adapters.base import register_method
from rankwise.adapters.methods.lora_xs import LoraXSAdapter, LoraXSConfig


@dataclass(frozen=True)
class LoraSBConfig(LoraXSConfig):
    """LoRA-SB options: LoRA-XS's, with ``init="lora_sb"`` by default (needs ``inputs``)."""

    init: str = "lora_sb"


@register_method("lora_sb")
class LoraSBAdapter(LoraXSAdapter):
    """``ΔW = s · B R A``, ``B``/``A`` frozen; initialised from the update approximation."""

    summary = (
        "LoRA-SB: LoRA-XS started from the first full fine-tuning update (Ponkshe et al. 2024)"
    )
    config_class = LoraSBConfig

    def reset_parameters(self) -> None:
        if self.config.init == "lora_sb":  # the initialiser sets B, R, A: skip the SVD of W
            with torch.no_grad():
                self.lora_R.zero_()
            return
        super().reset_parameters()
