"""IncreLoRA: start every layer at a small rank and add rank where it matters most, up to a budget.

"IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
Zhang et al. 2023. Instead of pruning a large rank down (AdaLoRA, SoRA), every layer starts
at ``init_rank`` and, every ``grow_every`` steps, the layers with the highest importance get
one more component, until the model's total rank reaches ``target_rank × layers``. A layer's
rank is bounded only by ``rank`` (its capacity), not by an even split of the budget.

Importance is AdaLoRA-style sensitivity, per layer: ``I = mean |θ ⊙ ∇θ|`` over the active
components of ``A`` and ``B``, smoothed ``Ī ← β Ī + (1-β) I`` and multiplied by its
uncertainty ``Ū ← β Ū + (1-β) |I - Ī|``. Each growth event hands out
``ceil(budget left / events left)`` components to the highest-scoring layers that have room.

Growth runs in the ``rank_growth`` training rule (``rules/growth.py``), switched on with the
method. :class:`GrowingLoraAdapter` (here, shared with TriAdaptLoRA) is a LoRA with room for
``rank`` components of which the first ``active`` are used: every tensor keeps its shape, so
the optimizer, checkpoints and saved files need nothing special (unused components get zero
gradients, and ``active`` is a saved buffer); a new component starts with a zero column of
``B``, so growing never changes the model's output. Saved in rankwise's format (PEFT has no IncreLoRA), the active rank of each layer included.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.adapters.base import AdapterConfig, register_method
from rankwise.adapters.methods.lora import LoraAdapter
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class GrowthConfig(AdapterConfig):
    """``rank``: the most components a layer can grow to; ``init_rank``: where every layer
    starts; ``target_rank``: the average rank per layer at the end (the budget is
    ``target_rank × layers``; None: half of ``rank``); ``grow_every``: optimizer steps between
    growth events (None: ten events spread over the growth window); ``grow_until``: the share
    of training after which rank stops growing."""

    init_rank: int = 1
    target_rank: int | None = None
    grow_every: int | None = None
    grow_until: float = 0.7

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.init_rank <= self.rank:
            raise ConfigError(f"init_rank must be in [1, rank={self.rank}], got {self.init_rank}")
        if not self.init_rank <= self.budget_rank <= self.rank:
            raise ConfigError(
                f"target_rank must be in [init_rank={self.init_rank}, rank={self.rank}] (the "
                f"average final rank per layer; rank is the most one layer can reach), got "
                f"{self.target_rank}"
            )
        if self.grow_every is not None and self.grow_every < 1:
            raise ConfigError(f"grow_every must be >= 1 (optimizer steps), got {self.grow_every}")
        if not 0 < self.grow_until <= 1:
            raise ConfigError(f"grow_until must be in (0, 1] (a share of the steps), got {self.grow_until}")

    @property
    def budget_rank(self) -> int:
        """The average final rank per layer (``target_rank``, default ``max(init_rank, rank // 2)``)."""
        return self.target_rank if self.target_rank is not None else max(self.init_rank, self.rank // 2)


class GrowingLoraAdapter(LoraAdapter):
    """LoRA with capacity ``rank`` whose first ``active`` components are used (see module doc).

    Subclasses define :meth:`plan_growth` (which layers grow at a growth event) and may
    override :meth:`core` (a ``(k, k)`` matrix between ``B`` and ``A``) and :meth:`observe`.
    """

    config_class = GrowthConfig

    def build(self) -> None:
        super().build()
        # a float buffer (adapter files hold float tensors): the number of active components
        self.register_buffer("active", torch.tensor(float(self.config.init_rank), device=self.layer.device))
        self.stats: dict[str, float] = {}  # the method's running importance numbers (observe)

    @property
    def active_rank(self) -> int:
        return int(self.active)

    @property
    def room(self) -> int:
        """How many more components this layer can take."""
        return self.config.rank - self.active_rank

    def grow(self, n: int = 1) -> int:
        """Activate ``n`` more components (fewer at capacity); returns how many were added."""
        n = max(0, min(n, self.room))
        self.active.add_(n)
        return n

    def core(self, k: int) -> torch.Tensor | None:
        """A ``(k, k)`` matrix between ``B`` and ``A`` (None: the identity, plain LoRA)."""
        return None

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_k, B_k)`` with any core folded into ``A`` (k = active rank)."""
        k = self.active_rank
        a, b = self.lora_A[:k], self.lora_B[:, :k]
        core = self.core(k)
        return (a if core is None else core @ a), b

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        a, b = self._factors()
        return self.layer.project_out(self.layer.project_in(x, a), b) * self.scaling

    def compose(self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        a, b = self._factors()
        return self.layer.add_projected(y, self.layer.project_in(x, a), b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return (b.float() @ a.float()) * self.scaling

    def lowrank_factors(self):
        return None  # the inactive components make the stored factors something else

    def lowrank_start(self, b, core, a):
        return None

    def observe(self) -> None:
        """Update :attr:`stats` after a backward (gradients present). Default: nothing."""

    @classmethod
    @abc.abstractmethod
    def plan_growth(
        cls, adapters: Mapping[str, GrowingLoraAdapter], budget: int, events_left: int, progress: float
    ) -> list[str]:
        """Which layers get one more component at this growth event (a path listed twice gets two). ``budget``: components
        still to hand out; ``events_left``: growth events left including this one;
        ``progress``: the share of the growth window passed (0 at the first event)."""

    def peft_config(self) -> dict[str, Any] | None:
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}"



@dataclass(frozen=True)
class IncreLoraConfig(GrowthConfig):
    """``beta``: the smoothing of the sensitivity and its uncertainty (AdaLoRA's β₁ = β₂)."""

    beta: float = 0.85

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1), got {self.beta!r}")


@register_method("increlora")
class IncreLoraAdapter(GrowingLoraAdapter):
    """LoRA whose rank grows during training where the sensitivity is highest (IncreLoRA)."""

    summary = "IncreLoRA: start at init_rank, add rank to the most important layers up to a budget (Zhang et al. 2023)"
    config_class = IncreLoraConfig

    @property
    def score(self) -> float:
        return self.stats.get("sensitivity", 0.0) * self.stats.get("uncertainty", 0.0)

    def observe(self) -> None:
        k = self.active_rank
        parts = [(self.lora_A, self.lora_A[:k]), (self.lora_B, self.lora_B[:, :k])]
        if any(p.grad is None for p, _ in parts):
            return
        grads = [self.lora_A.grad[:k], self.lora_B.grad[:, :k]]
        with torch.no_grad():
            now = sum(float((w * g).abs().sum()) for (_, w), g in zip(parts, grads, strict=True))
            now /= sum(w.numel() for _, w in parts)
        beta = self.config.beta
        smooth = beta * self.stats.get("sensitivity", now) + (1 - beta) * now
        spread = beta * self.stats.get("uncertainty", 0.0) + (1 - beta) * abs(now - smooth)
        self.stats = {"sensitivity": smooth, "uncertainty": spread}

    @classmethod
    def plan_growth(
        cls, adapters: Mapping[str, GrowingLoraAdapter], budget: int, events_left: int, progress: float
    ) -> list[str]:
        """``ceil(budget / events_left)`` components for the highest-scoring layers, one each
        in score order, again from the top while some are left and layers have room."""
        n = math.ceil(budget / max(1, events_left))
        order = sorted(adapters, key=lambda p: adapters[p].score, reverse=True)
        room = {p: adapters[p].room for p in order}
        chosen: list[str] = []
        while len(chosen) < n and any(room.values()):
            for p in order:
                if room[p] and len(chosen) < n:
                    chosen.append(p)
                    room[p] -= 1
        return chosen
