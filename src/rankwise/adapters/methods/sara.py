"""SaRA: fine-tune the base model's least important weights (smallest ``|w|``), as a sparse update.

"SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank
Adaptation", Hu et al. 2024. The smallest 10–20% of a pre-trained model's weights by
absolute value barely affect its output; SaRA re-uses exactly those entries to learn the
new task. Here that is an adapter whose update is sparse::

    ΔW = scatter(index, values) + scatter(frozen_index, frozen_values)      (out, in)

``index`` holds the flat positions of the ``fraction`` smallest ``|W|`` entries of the
layer's weight, ``values`` (zeros at the start) is all that trains. SaRA's other two parts
are training rules, switched on with the method (``rules/sara.py``): a nuclear-norm penalty
``λ ||ΔW||_*`` that keeps the sparse update low-rank, and the progressive step
(:meth:`SaraAdapter.reselect`): part-way through training the learned values are frozen and
the now-least-important entries of ``W + ΔW`` train next.

The update has no scale factor (``alpha`` and ``use_rslora`` are ignored; ``rank`` is not
used: the penalty, not a factorisation, keeps the update low-rank). Saved in rankwise's
format (PEFT has no SaRA) as the positions and values, not a dense matrix. The positions
are float64 buffers (adapter files hold float tensors; float64 holds every index below 2⁵³
exactly) that keep float64 when the module is cast (``.half()`` moves them, never rounds them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, LayerView, register_method
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class SaraConfig(AdapterConfig):
    """``fraction``: the share of each weight matrix's entries (the smallest ``|w|``) that train."""

    fraction: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.fraction <= 0.5:
            raise ConfigError(
                f"fraction (the share of smallest weights SaRA trains) must be in (0, 0.5], "
                f"got {self.fraction!r}"
            )


POSITIONS = ("index", "frozen_index")  # float64 buffers of flat positions into (out, in)


def smallest_entries(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (sorted) of the ``k`` entries of ``matrix`` with the smallest ``|value|``
    (ties go to the earlier position, so the choice is reproducible from the same weights)."""
    order = torch.sort(matrix.detach().float().abs().flatten(), stable=True).indices
    return order[:k].sort().values


@register_method("sara")
class SaraAdapter(Adapter):
    """Sparse update on the ``fraction`` smallest-magnitude base weights (SaRA, Hu et al. 2024)."""

    summary = "SaRA: train the smallest-|w| base weights as a sparse, nuclear-norm-penalised update (Hu et al. 2024)"
    config_class = SaraConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: AdapterConfig) -> str | None:
        if layer.is_quantized:
            return "sara selects weights by magnitude; the layer's weight is quantized"
        return None

    @property
    def budget(self) -> int:
        """How many entries train: ``ceil(fraction · out · in)``."""
        return max(1, math.ceil(self.config.fraction * self.layer.out_features * self.layer.in_features))

    def build(self) -> None:
        k, dev = self.budget, self.layer.device
        self.values = nn.Parameter(torch.zeros(k, device=dev, dtype=self.param_dtype))
        self.register_buffer("index", torch.zeros(k, dtype=torch.float64, device=dev))
        self.register_buffer("frozen_values", torch.zeros(k, device=dev, dtype=self.param_dtype))
        self.register_buffer("frozen_index", torch.zeros(k, dtype=torch.float64, device=dev))

    def _apply(self, fn, recurse=True):
        """Casts and moves, except that the positions stay float64 (moved, never rounded)."""
        positions = {name: self._buffers[name] for name in POSITIONS}
        super()._apply(fn, recurse)
        for name, old in positions.items():
            self._buffers[name] = old.to(device=self._buffers[name].device)
        return self

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.index.copy_(smallest_entries(self.layer.weight_matrix(), self.budget))
            self.values.zero_()
            self.frozen_values.zero_()
            self.frozen_index.zero_()

    def sparse_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (differentiable) ``ΔW`` (out, in) in ``dtype`` (default: the values' dtype)."""
        out, n = self.layer.out_features, self.layer.in_features
        dtype = dtype or self.values.dtype
        flat = torch.zeros(out * n, device=self.values.device, dtype=dtype)
        flat = flat.index_add(0, self.frozen_index.long(), self.frozen_values.to(dtype))
        return flat.index_add(0, self.index.long(), self.values.to(dtype)).view(out, n)

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.layer.project_in(x, self.sparse_delta(x.dtype))

    def dense_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.sparse_delta(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.sparse_delta(torch.float32).detach()

    def reselect(self) -> None:
        """SaRA's progressive step: freeze what was learned, train the now-smallest entries.

        ``frozen_values`` takes the learned values (a second call folds them in only where the
        positions coincide, so SaRA reselects once); the trainable set becomes the smallest
        ``|W + ΔW|`` entries, starting from zero again.
        """
        with torch.no_grad():
            if bool(self.frozen_values.any()):
                raise ConfigError("sara reselects once (progressive_at); this adapter already did")
            merged = self.layer.weight_matrix().float() + self.delta_weight()
            self.frozen_values.copy_(self.values)
            self.frozen_index.copy_(self.index)
            self.index.copy_(smallest_entries(merged, self.budget))
            self.values.zero_()

    def peft_config(self) -> dict[str, Any] | None:
        return None

    def extra_repr(self) -> str:
        return f"method=sara, fraction={self.config.fraction:g}, trainable={self.budget}"
