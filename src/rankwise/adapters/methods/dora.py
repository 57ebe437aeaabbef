"""DoRA: LoRA with a learned per-output-row magnitude, ``W' = g ⊙ (W + s·BA) / ‖W + s·BA‖_row``.

"DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al. 2024, eq. 5) splits each output
row of the adapted weight into a direction and a trainable length ``g`` (initialised to the
row norms, so the model starts unchanged). As in the paper (section 4.3) and PEFT, the
norm is treated as a constant in backward (detached). The layer output is::

    y = W x + b + (v - 1) ⊙ W x + v ⊙ s·B A x,     v = g / ‖W + s·BA‖_row

The row norm is computed from factors, never from the dense ``(out, in)`` product B A
("Scaling DoRA: High-Rank Adaptation via Factored Norms and Fused Kernels", 2025)::

    ‖W + s·BA‖²_row = ‖W‖²_row + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B G) ⊙ B),  G = A Aᵀ

``‖W‖²_row`` is cached (W is frozen; the cache follows W's version counter); ``W Aᵀ`` is
``(out, r)`` and ``G`` is ``(r, r)``. The output combination is one autograd function
that saves a single ``(tokens, out)`` tensor for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import LayerView, register_method
from rankwise.adapters.methods.lora import LoraAdapter, LoraConfig


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA options: the LoRA ones (rank, alpha, dropout, use_rslora)."""


def _factored_row_norm(
    w: torch.Tensor, w_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``‖W + scale·B A‖`` per row from ``W (out, in)``, ``‖W‖²_row``, ``A (r, in)``, ``B (out, r)``."""
    cross = (b * (w @ a.t())).sum(dim=1)  # (out,)  <W_row, (BA)_row>
    gram = ((b @ (a @ a.t())) * b).sum(dim=1)  # (out,)  ‖(BA)_row‖²
    return (w_sq + (2.0 * scale) * cross + (scale * scale) * gram).clamp_min(0).sqrt()


class _DoraCompose(torch.autograd.Function):
    """``out = y + (v - 1) ⊙ base + v ⊙ s·lora``, saving only ``t = base + s·lora``."""

    @staticmethod
    def forward(ctx, y, base, lora, v, scale):  # v already shaped to broadcast
        t = torch.add(base, lora, alpha=scale)
        out = t * v
        out += y.to(out.dtype)
        out -= base
        ctx.save_for_backward(t, v)
        ctx.scale = scale
        ctx.y_dtype = y.dtype
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        t, v = ctx.saved_tensors
        grad = grad.to(t.dtype)
        grad_y = grad.to(ctx.y_dtype) if ctx.needs_input_grad[0] else None
        grad_base = grad * (v - 1) if ctx.needs_input_grad[1] else None
        grad_lora = grad * (v * ctx.scale) if ctx.needs_input_grad[2] else None
        grad_v = (grad * t).sum_to_size(v.shape) if ctx.needs_input_grad[3] else None
        return grad_y, grad_base, grad_lora, grad_v, None


@register_method("dora")
class DoraAdapter(LoraAdapter):
    """LoRA factors plus ``lora_magnitude`` ``(out,)``; row norms from factors (see module doc)."""

    summary = "DoRA: LoRA plus a learned per-row magnitude (Liu et al. 2024); PEFT format"
    config_class = DoraConfig

    def build(self) -> None:
        super().build()
        out, dev = self.layer.out_features, self.layer.device
        self.lora_magnitude = nn.Parameter(torch.empty(out, device=dev, dtype=self.param_dtype))
        self._w_sq: tuple[tuple, torch.Tensor] | None = None
        self._norm: tuple[tuple, torch.Tensor] | None = None
        self._merged_norm: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.after_init()

    def after_init(self) -> None:
        """Set the magnitude to the current row norms (the model output is then unchanged)."""
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norm())

    @classmethod
    def check_layer(cls, layer: LayerView, config: Any) -> str | None:
        if layer.is_quantized:
            return f"DoRA needs the base weight, but it is quantized ({layer.weight.dtype})"
        return super().check_layer(layer, config)

    # -- the norm
    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.layer.weight_matrix().detach().to(dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B A‖`` per output row, detached, in the adapter's dtype; shape ``(out,)``."""
        if self.merged and self._merged_norm is not None:
            return self._merged_norm
        w_param, a, b = self.layer.weight, self.lora_A, self.lora_B
        dtype = a.dtype
        key = (w_param.data_ptr(), w_param._version, w_param.device, dtype)
        if self._w_sq is None or self._w_sq[0] != key:
            w = self._weight(dtype)
            self._w_sq = (key, w.pow(2).sum(dim=1))
        norm_key = (key, a.data_ptr(), a._version, b.data_ptr(), b._version, self.scaling)
        if self._norm is None or self._norm[0] != norm_key:
            n = _factored_row_norm(self._weight(dtype), self._w_sq[1], a, b, self.scaling)
            self._norm = (norm_key, n)
        return self._norm[1]

    def _row_scale(self) -> torch.Tensor:
        return self.lora_magnitude / self.weight_norm()

    # -- forward
    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        v = self._row_scale()
        lora = LoraAdapter.delta(self, x, base)
        return self.layer.scale_out(base(), v - 1) + self.layer.scale_out(lora, v)

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h = self.layer.project_in(x, self.lora_A)
        lora = self.layer.project_out(h, self.lora_B)
        b = base()
        v = self._row_scale().view(self.layer.channel_shape(b))
        return _DoraCompose.apply(y, b, lora, v, self.scaling)

    # -- merging: W' = v ⊙ (W + s·BA) = W + (v - 1) ⊙ W + v ⊙ s·BA
    def merge_terms(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not self.merged:
            self._merged_norm = self.weight_norm().clone()
        v = (self.lora_magnitude / self._merged_norm).detach().float()
        return v - 1, v[:, None] * LoraAdapter.delta_weight(self)

    def delta_weight(self) -> torch.Tensor:
        v = self._row_scale().detach().float()
        w = self._weight(torch.float32)
        return (v - 1)[:, None] * w + v[:, None] * LoraAdapter.delta_weight(self)

    # -- PEFT format: LoRA's tensors plus lora_magnitude_vector, with use_dora=True
    def peft_config(self) -> dict[str, Any] | None:
        return {**super().peft_config(), "use_dora": True}

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {**super().peft_state(), "lora_magnitude_vector": self.lora_magnitude.detach()}

    def peft_to_native(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            **super().peft_to_native(tensors),
            "lora_magnitude": tensors["lora_magnitude_vector"].reshape(self.lora_magnitude.shape),
        }
