"""IncreLoRA: start every layer at a small rank and add rank where it matters most, up to a budget.

"IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
Zhang et al. 2023. Instead of pruning a large rank down (AdaLoRA, SoRA), every layer starts
at ``init_rank`` and, at each growth event, the layers with the highest importance get
``grow_by`` more components each, until the model's total rank reaches ``target_rank ×
layers``. A layer's rank is bounded only by ``rank`` (its capacity), not by an even split of
the budget; the budget is what is compared with a LoRA of rank ``target_rank``.

Importance is the paper's (AdaLoRA-style) sensitivity of each layer's update matrix:
``I = Σ |ΔW ⊙ ∇_ΔW L| / √(out · in)``, with ``∇_ΔW L = Σ_tokens g xᵀ`` taken from the layer's
input and output gradient during the growth window, smoothed ``Ī ← β Ī + (1-β) I`` and
multiplied by its uncertainty ``Ū ← β Ū + (1-β) |I - Ī|``. (Layers that are not linear, conv
and embedding, fall back to the sensitivity of the factors, ``mean |θ ⊙ ∇θ|``.) Each growth
event hands out ``ceil(budget left / events left)`` components, ``grow_by`` at a time, to the
highest-scoring layers with room: the paper's top-h layers × ``incre_rank_num``, with h set
so that the budget is reached by the end of the growth window.

The scale is ``alpha / k`` at the active rank ``k`` (the released code's ``scaling /
ranknum``; ``alpha`` defaults to ``target_rank``, so at the budget rank it is a plain LoRA's
of that rank): a layer at rank 1 moves its update as fast as one at rank 8 instead of eight
times slower, which is what lets a method that starts small keep up with LoRA. When a layer
grows, ``B`` is rescaled by ``k_new / k_old`` so its output does not change.

Growth runs in the ``rank_growth`` training rule (``rules/growth.py``), switched on with the
method. :class:`GrowingLoraAdapter` (here, shared with TriAdaptLoRA) is a LoRA with room for
``rank`` components of which the first ``active`` are used: every tensor keeps its shape, so
the optimizer, checkpoints and saved files need nothing special (unused components get
exactly zero gradients, so their Adam moments are still zero when they are switched on:
their first steps are Adam's first steps, about half the learning rate and rising, like the
paper's restart warm-up), and ``active`` is a saved buffer. A new component starts with a
zero column of ``B``, so growing never changes the model's output. The paper's "advance
learning" (reserve components trained at a 1e-5 weight before they join) needs its SVD form
and is not reproduced. Saved in rankwise's format (PEFT has no IncreLoRA), the active rank of
each layer included.
"""

from __future__ import annotations

import abc
import functools
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
    of training after which rank stops growing (0.3: the paper's runs finish growing within
    the first 20-40% of training, so most steps train at the full budget); ``alpha``: the
    scale's numerator (None: ``target_rank``), divided by the active rank."""

    init_rank: int = 1
    target_rank: int | None = None
    grow_every: int | None = None
    grow_until: float = 0.3

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
        self.observing = False  # on while the rank_growth rule still has growth events to come

    @property
    def active_rank(self) -> int:
        return int(self.active)

    @property
    def scaling(self) -> float:
        """``alpha / k`` at the active rank ``k`` (``alpha / √k`` with ``use_rslora``)."""
        return self.rank_scaling(self.active_rank)

    @scaling.setter
    def scaling(self, value: float) -> None:
        """Ignored: ``Adapter.__init__`` sets the config's fixed scale; this one follows the rank."""

    def rank_scaling(self, k: int) -> float:
        """The scale at rank ``k``; ``alpha`` defaults to the budget rank (``target_rank``)."""
        c = self.config
        alpha = float(c.budget_rank if c.alpha is None else c.alpha)
        return alpha / math.sqrt(k) if c.use_rslora else alpha / k

    @property
    def room(self) -> int:
        """How many more components this layer can take."""
        return self.config.rank - self.active_rank

    @torch.no_grad()
    def grow(self, n: int = 1) -> int:
        """Activate ``n`` more components (fewer at capacity); returns how many were added.
        ``B`` takes the ratio of the old scale to the new one, so the output is unchanged."""
        n = max(0, min(n, self.room))
        if n:
            k = self.active_rank
            self.lora_B[:, :k].mul_(self.rank_scaling(k) / self.rank_scaling(k + n))
            self.active.add_(n)
        return n

    def parameters_in_use(self) -> int:
        """Trained parameters of the active components (what a budget compares; the unused
        capacity gets no gradient): ``k · (in + out)``."""
        return self.active_rank * (self.layer.in_features + self.layer.out_features)

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



def hand_out(
    adapters: Mapping[str, GrowingLoraAdapter], order: list[str], n: int, per_turn: Mapping[str, int] | None = None
) -> list[str]:
    """``n`` components for the layers in ``order``: ``per_turn[p]`` (default 1) to each in
    turn, within its room, again from the top while some are left and a layer has room. A
    path appears once per component."""
    room = {p: adapters[p].room for p in order}
    chosen: list[str] = []
    while len(chosen) < n and any(room.values()):
        for p in order:
            take = min((per_turn or {}).get(p, 1), room[p], n - len(chosen))
            chosen += [p] * take
            room[p] -= take
    return chosen


@dataclass(frozen=True)
class IncreLoraConfig(GrowthConfig):
    """``beta``: the smoothing of the sensitivity and its uncertainty (AdaLoRA's β₁ = β₂);
    ``grow_by``: components a chosen layer gets at one growth event (None: half of
    ``target_rank``, the released code's 1, 2, 3, 4 for target ranks 2, 4, 6, 8)."""

    beta: float = 0.85
    grow_by: int | None = None

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1), got {self.beta!r}")
        if self.grow_by is not None and not 1 <= self.grow_by <= self.rank:
            raise ConfigError(f"grow_by must be in [1, rank={self.rank}] (components per chosen layer), got {self.grow_by}")

    @property
    def step_rank(self) -> int:
        """Components a chosen layer gets at one growth event."""
        return self.grow_by if self.grow_by is not None else max(1, self.budget_rank // 2)


@register_method("increlora")
class IncreLoraAdapter(GrowingLoraAdapter):
    """LoRA whose rank grows during training where the sensitivity is highest (IncreLoRA)."""

    summary = "IncreLoRA: start at init_rank, add rank to the most important layers up to a budget (Zhang et al. 2023)"
    config_class = IncreLoraConfig

    @property
    def score(self) -> float:
        return self.stats.get("sensitivity", 0.0) * self.stats.get("uncertainty", 0.0)

    def build(self) -> None:
        super().build()
        self._sensed: float | None = None  # Σ |ΔW ⊙ ∇ΔW| / √numel since the last observe()

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._watch(x, super().delta(x, base))

    def compose(self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self._watch(x, super().compose(y, x, base))

    def _watch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """While observing, have the backward pass report the output gradient (see :meth:`_sense`)."""
        if self.observing and out.requires_grad and self.layer.kind in ("linear", "transposed_linear"):
            out.register_hook(functools.partial(self._sense, x.detach().reshape(-1, x.shape[-1])))
        return out

    @torch.no_grad()
    def _sense(self, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``Σ |ΔW ⊙ ∇_ΔW L| / √numel`` with ``∇_ΔW L = gᵀ x`` (summed over the tokens)."""
        grad_w = grad.reshape(-1, grad.shape[-1]).float().T @ inputs.float()
        dw = self.delta_weight()
        self._sensed = (self._sensed or 0.0) + float((dw * grad_w).abs().sum()) / math.sqrt(dw.numel())

    def _factor_sensitivity(self) -> float | None:
        """``mean |θ ⊙ ∇θ|`` over the active components of A and B (layers without ``gᵀx``)."""
        k = self.active_rank
        if self.lora_A.grad is None or self.lora_B.grad is None:
            return None
        pairs = [(self.lora_A[:k], self.lora_A.grad[:k]), (self.lora_B[:, :k], self.lora_B.grad[:, :k])]
        with torch.no_grad():
            total = sum(float((w * g).abs().sum()) for w, g in pairs)
        return total / sum(w.numel() for w, _ in pairs)

    def observe(self) -> None:
        now, self._sensed = self._sensed, None
        if now is None:
            now = self._factor_sensitivity()
        if now is None:
            return
        beta = self.config.beta
        smooth = beta * self.stats.get("sensitivity", now) + (1 - beta) * now
        spread = beta * self.stats.get("uncertainty", 0.0) + (1 - beta) * abs(now - smooth)
        self.stats = {"sensitivity": smooth, "uncertainty": spread}

    @classmethod
    def plan_growth(
        cls, adapters: Mapping[str, GrowingLoraAdapter], budget: int, events_left: int, progress: float
    ) -> list[str]:
        """``ceil(budget / events_left)`` components, ``grow_by`` (at most the room) to each
        of the highest-scoring layers in turn, again from the top while some are left. None
        while no layer has a score yet (the update is still zero: the paper's initial warm-up
        before the first allocation); later events hand out what was left."""
        if not any(a.score > 0 for a in adapters.values()):
            return []
        order = sorted(adapters, key=lambda p: adapters[p].score, reverse=True)
        per_turn = {p: adapters[p].config.step_rank for p in order}
        return hand_out(adapters, order, math.ceil(budget / max(1, events_left)), per_turn)
