"""DyLoRA: one LoRA trained for every rank in ``[min_rank, rank]`` at once.

"DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free
Low-Rank Adaptation", Valipour et al. 2022. In every training forward each layer samples a
rank ``b`` uniformly from ``[min_rank, rank]`` and uses only the first ``b`` rows of ``A``
and columns of ``B``, scaled by ``alpha / b``: ``Δ(x) = (alpha / b) · B[:, :b] A[:b] x``.
Because every prefix is trained to work on its own, the components come out *ordered*
(nested-dropout style), and after training any rank ``k`` in the range is usable without
retraining: :func:`set_rank` truncates every DyLoRA adapter of a model to ``k``.

``update="all"`` (default) lets every kept component learn in a step; ``update="last"`` is
the paper's cheaper variant, where only the ``b``-th row of ``A`` and column of ``B`` get
gradients and the earlier components are held fixed for that step.

Outside training (``model.eval()`` or no grad) the adapter runs at its active rank, the full
``rank`` unless :func:`set_rank` chose another. Saved in rankwise's format (PEFT has no
DyLoRA); the active rank is not saved (a loaded adapter runs at full rank until
:func:`set_rank`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import AdapterConfig, register_method
from rankwise.adapters.methods.lora import LoraAdapter
from rankwise.errors import ConfigError

UPDATES = ("all", "last")


@dataclass(frozen=True)
class DyLoraConfig(AdapterConfig):
    """``min_rank``: the smallest rank sampled in training (1..rank); ``update``: "all" or "last"."""

    min_rank: int = 1
    update: str = "all"

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.min_rank <= self.rank:
            raise ConfigError(f"min_rank must be in [1, rank={self.rank}]; got {self.min_rank}")
        if self.update not in UPDATES:
            raise ConfigError(f"update must be one of {list(UPDATES)}; got {self.update!r}")


@register_method("dylora")
class DyLoraAdapter(LoraAdapter):
    """LoRA whose training samples a rank per forward; :func:`set_rank` picks one for inference."""

    summary = "DyLoRA: LoRA trained at every rank in [min_rank, rank] at once; set_rank(model, k) after (Valipour et al. 2022)"
    config_class = DyLoraConfig

    def build(self) -> None:
        super().build()
        self.active_rank = self.config.rank

    def scaling_at(self, b: int) -> float:
        """``alpha / b`` (``alpha / √b`` with rsLoRA): the scale of the rank-``b`` truncation."""
        alpha = float(self.config.rank if self.config.alpha is None else self.config.alpha)
        return alpha / math.sqrt(b) if self.config.use_rslora else alpha / b

    def _sampling(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A[:b], B[:, :b], scale)`` for this forward (a sampled ``b`` while training)."""
        if not self._sampling():
            b = self.active_rank
            return self.lora_A[:b], self.lora_B[:, :b], self.scaling_at(b)
        lo, hi = self.config.min_rank, self.config.rank
        b = int(torch.randint(lo, hi + 1, ()).item())
        a, up = self.lora_A[:b], self.lora_B[:, :b]
        if self.config.update == "last" and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]])
            up = torch.cat([up[:, : b - 1].detach(), up[:, b - 1 :]], dim=1)
        return a, up, self.scaling_at(b)

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        a, up, scale = self._factors()
        return self.layer.project_out(self.layer.project_in(x, a), up) * scale

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        a, up, scale = self._factors()
        return self.layer.add_projected(y, self.layer.project_in(x, a), up, scale)

    def delta_weight(self) -> torch.Tensor:
        b = self.active_rank
        return (self.lora_B[:, :b].float() @ self.lora_A[:b].float()) * self.scaling_at(b)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A[:b], B[:, :b], alpha/b)`` at the active rank ``b`` when not sampling (serving)."""
        if self._sampling() or self.layer.kind not in ("linear", "transposed_linear"):
            return None
        b = self.active_rank
        return self.lora_A[:b], self.lora_B[:, :b], self.scaling_at(b)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """LoRA's factors cut to the active rank, ``B``'s part rescaled so ``s·P Q`` is the
        rank-``b`` update (``s = alpha / rank``, the scale the contract assumes)."""
        pair = super().lowrank_factors()
        if pair is None:
            return None
        b = self.active_rank
        up, a = pair
        return up[:, :b] * (self.scaling_at(b) / self.scaling), a[:b]

    def peft_config(self) -> dict[str, Any] | None:
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}, min_rank={self.config.min_rank}"


def set_rank(model: nn.Module, rank: int, name: str | None = None) -> int:
    """Run every DyLoRA adapter of ``model`` (only adapter ``name`` if given) at ``rank``.

    Returns how many adapters changed. ConfigError when ``rank`` is outside an adapter's
    trained range ``[min_rank, rank]`` (nothing is changed then), when the model has no
    DyLoRA adapter, or when an adapter is merged (unmerge first: the merged weight holds
    the old rank's update).
    """
    from rankwise.adapters.inject import adapted_layers

    found = [
        (path, adapter_name, adapter)
        for path, layer in adapted_layers(model).items()
        for adapter_name, adapter in layer.adapters.items()
        if isinstance(adapter, DyLoraAdapter) and (name is None or adapter_name == name)
    ]
    if not found:
        which = "" if name is None else f" named {name!r}"
        raise ConfigError(f"the model has no dylora adapter{which}; attach one with method='dylora'")
    for path, adapter_name, adapter in found:
        lo, hi = adapter.config.min_rank, adapter.config.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not lo <= rank <= hi:
            raise ConfigError(
                f"rank {rank!r} is outside the range adapter {adapter_name!r} on {path} was trained "
                f"for: [{lo}, {hi}]"
            )
        if adapter.merged:
            raise ConfigError(f"adapter {adapter_name!r} on {path} is merged; unmerge before set_rank")
    for _, _, adapter in found:
        adapter.active_rank = rank
    return len(found)
