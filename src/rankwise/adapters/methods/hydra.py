"""Hydra: a parallel and a sequential low-rank branch on one layer.

"Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning" (Kim et al.
2024). The parallel branch is LoRA on the input; the sequential branch is a low-rank map
applied to the *pre-trained features* ``W x`` (a learned linear combination of them)::

    Δ(x) = s · (B_p A_p x + B_s A_s (W x))        ΔW = s · (B_p A_p + B_s A_s W)

``A_p (r, in)``, ``B_p (out, r)``, ``A_s (r_s, out)``, ``B_s (out, r_s)``; ``r = rank``,
``r_s = seq_rank`` (default ``rank``); ``s = alpha / rank``. Trainable parameters per
layer: ``r·(in + out) + 2·r_s·out``. ``A``s start Kaiming-uniform and ``B``s at zero, so the
model starts unchanged. ``W x`` is the base output the engine already computed (no second
product with ``W``). ``ΔW`` reads ``W``, so merging caches it (see
:class:`~rankwise.adapters.methods.bone.WeightGuidedMerge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, LayerView, register_method
from rankwise.adapters.methods.bone import WeightGuidedMerge
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class HydraConfig(AdapterConfig):
    """Hydra options: ``rank`` (parallel branch) and ``seq_rank`` (sequential; None = rank)."""

    seq_rank: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.seq_rank is not None and self.seq_rank <= 0:
            raise ConfigError(f"seq_rank must be a positive integer or None, got {self.seq_rank!r}")

    @property
    def sequential_rank(self) -> int:
        return self.rank if self.seq_rank is None else self.seq_rank


@register_method("hydra")
class HydraAdapter(WeightGuidedMerge, Adapter):
    """``Δ(x) = s·(B_p A_p x + B_s A_s W x)``: parallel + sequential low-rank branches."""

    summary = "Hydra: parallel LoRA plus a sequential low-rank map of W x (Kim et al. 2024)"
    config_class = HydraConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: HydraConfig) -> str | None:
        if reason := super().check_layer(layer, config):
            return reason
        if config.sequential_rank > layer.out_features:
            return (
                f"seq_rank={config.sequential_rank} exceeds out={layer.out_features}; "
                f"valid: 1..{layer.out_features}"
            )
        return None

    def build(self) -> None:
        r, rs, dev, dt = self.config.rank, self.config.sequential_rank, self.layer.device, self.param_dtype
        out, inp = self.layer.out_features, self.layer.in_features
        self.lora_A = nn.Parameter(torch.empty(r, inp, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(out, r, device=dev, dtype=dt))
        self.seq_A = nn.Parameter(torch.empty(rs, out, device=dev, dtype=dt))
        self.seq_B = nn.Parameter(torch.empty(out, rs, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.seq_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.zeros_(self.seq_B)

    def _hidden(self, x: torch.Tensor, base: Callable[[], torch.Tensor]):
        h_par = self.layer.project_in(x, self.lora_A)  # (..., r)
        h_seq = self.layer.project_out(base(), self.seq_A)  # (..., r_s): A_s applied to W x
        return h_par, h_seq

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h_par, h_seq = self._hidden(x, base)
        out = self.layer.project_out(h_par, self.lora_B) + self.layer.project_out(h_seq, self.seq_B)
        return out * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h_par, h_seq = self._hidden(x, base)
        y = self.layer.add_projected(y, h_par, self.lora_B, self.scaling)
        return self.layer.add_projected(y, h_seq, self.seq_B, self.scaling)

    def fresh_delta_weight(self) -> torch.Tensor:
        w = self.layer.weight_matrix().detach().float()
        par = self.lora_B.float() @ self.lora_A.float()
        seq = self.seq_B.float() @ (self.seq_A.float() @ w)
        return (par + seq) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seq_rank={self.config.sequential_rank}"
