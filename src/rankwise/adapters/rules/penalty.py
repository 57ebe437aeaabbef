"""A method's own regulariser, added to the gradients after backward (Bayesian-LoRA's gate prior).

Some methods train with a loss term of their own: a prior on gates, a sparsity cost. The
training loop computes only the task loss; this rule adds the gradient of each adapter's
:meth:`penalty` (a differentiable scalar) to the parameters' gradients right after backward,
which is the same as training on ``loss + Σ penalty``. It comes on with every method listed
in ``implied_by``; a method joins by defining ``penalty()`` and adding its name there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.adapters.base import Adapter
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule


@dataclass(frozen=True)
class PenaltyConfig(RuleConfig):
    """No options: the weights of a penalty are the method's own options."""


def add_penalty_gradient(adapter: Adapter) -> float:
    """Add ``∇ adapter.penalty()`` to the gradients of its trainable parameters; returns the
    penalty's value."""
    params = [p for p in adapter.parameters() if p.requires_grad]
    with torch.enable_grad():
        value = adapter.penalty()
        grads = torch.autograd.grad(value, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)
    return float(value.detach())


@register_rule("penalty")
class PenaltyRule(TrainingRule):
    """The adapter's own regulariser (e.g. Bayesian-LoRA's gate prior), switched on with the method"""

    config_class = PenaltyConfig
    works_with = "methods that define penalty() (bayes_lora), switched on with them"
    implied_by = ("bayes_lora",)

    def applies_to(self, adapter: Adapter) -> str | None:
        if not callable(getattr(adapter, "penalty", None)):
            return "the method defines no penalty() to add"
        return None

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        self.last = 0.0

    def after_backward(self, step: int) -> None:
        self.last = sum(add_penalty_gradient(a) for a in self.adapters.values())
