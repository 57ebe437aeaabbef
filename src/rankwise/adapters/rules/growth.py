"""Rank that grows during training (IncreLoRA, TriAdaptLoRA): the ``rank_growth`` rule.

The adapters are :class:`~rankwise.adapters.methods.increlora.GrowingLoraAdapter` (LoRA
with room for ``rank`` components, of which the first ``active`` are used, starting at
``init_rank``). This rule, switched on with every method built on them, uses the ordinary
hooks: after each backward every adapter updates its importance
(:meth:`GrowingLoraAdapter.observe`); every ``grow_every`` optimizer steps the method decides
which layers get one more component (:meth:`GrowingLoraAdapter.plan_growth`), until the total
rank reaches the budget ``target_rank × layers`` or ``grow_until`` of the steps have passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from rankwise.adapters.base import Adapter
from rankwise.adapters.methods.increlora import GrowingLoraAdapter
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule
from rankwise.errors import ConfigError


def total_rank(adapters: Mapping[str, Adapter]) -> int:
    """The summed active rank of the growing adapters."""
    return sum(a.active_rank for a in adapters.values() if isinstance(a, GrowingLoraAdapter))


@dataclass(frozen=True)
class GrowthRuleConfig(RuleConfig):
    """No options: the schedule is the method's (``init_rank``, ``target_rank``, ``grow_every``,
    ``grow_until`` in its config)."""


@register_rule("rank_growth")
class RankGrowthRule(TrainingRule):
    """Rank growth during training for IncreLoRA and TriAdaptLoRA (switched on with them)"""

    config_class = GrowthRuleConfig
    works_with = "methods that grow rank (increlora, triadapt), switched on with them"
    implied_by = ("increlora", "triadapt")

    def applies_to(self, adapter: Adapter) -> str | None:
        if not isinstance(adapter, GrowingLoraAdapter):
            return "it grows the rank of adapters built with room to grow"
        return None

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        classes = {type(a) for a in self.adapters.values()}
        if len(classes) > 1:
            names = sorted(c.method for c in classes)
            raise ConfigError(f"rank_growth grows one method at a time; the model trains {names}")
        configs = [a.config for a in self.adapters.values()]
        first = configs[0] if configs else None
        self.budget = sum(c.budget_rank for c in configs)
        self.last_step = max(1, math.floor(first.grow_until * steps)) if first else 0
        self.grow_every = (first.grow_every if first else None) or max(1, self.last_step // 10)
        if first and self.budget > total_rank(self.adapters) and self.last_step < self.grow_every:
            raise ConfigError(
                f"{first.__class__.__name__}: grow_every={self.grow_every} leaves no growth event "
                f"in the first grow_until={first.grow_until} of {steps} steps, so rank would never "
                f"grow; use grow_every <= {max(1, self.last_step)} (or more steps)"
            )
        self._observe(self.budget > total_rank(self.adapters))

    def _observe(self, on: bool) -> None:
        """Importance is measured only while growth events are still to come."""
        for adapter in self.adapters.values():
            adapter.observing = on

    def after_backward(self, step: int) -> None:
        for adapter in self.adapters.values():
            adapter.observe()

    def after_optimizer_step(self, step: int) -> None:
        """At growth event ``m`` (after ``m · grow_every`` steps) of ``M``, ask the method which
        layers grow, with the budget left, the events left (this one included) and progress."""
        done = step + 1
        if done % self.grow_every or done > self.last_step or not self.adapters:
            return
        remaining = self.budget - total_rank(self.adapters)
        if remaining <= 0:
            self._observe(False)
            return
        m, total_events = done // self.grow_every, self.last_step // self.grow_every
        events = total_events - m + 1
        progress = (m - 1) / max(1, total_events - 1)
        cls = type(next(iter(self.adapters.values())))
        open_layers = {p: a for p, a in self.adapters.items() if a.room > 0}
        for path in cls.plan_growth(open_layers, remaining, events, progress)[:remaining]:
            self.adapters[path].grow(1)
        if done + self.grow_every > self.last_step or total_rank(self.adapters) >= self.budget:
            self._observe(False)  # that was the last growth event

    def teardown(self) -> None:
        self._observe(False)
        super().teardown()

    def state_dict(self) -> dict:
        return {"stats": {p: dict(a.stats) for p, a in self.adapters.items()}}

    def load_state_dict(self, state) -> None:
        for path, stats in state.get("stats", {}).items():
            if path in self.adapters:
                self.adapters[path].stats = {k: float(v) for k, v in stats.items()}
