"""SoRA's gate training: a proximal Adam step on each gate, with the sparsifying schedule.

The ``sora_gate`` rule comes on with the ``sora`` method. Right before each optimizer step
(gradients clipped) it gives every SoRA gate its proximal step (Adam, then soft
thresholding; :class:`~rankwise.adapters.methods.sora.GateAdam`) with the step size and
threshold of :meth:`~rankwise.adapters.methods.sora.SoraConfig.gate_schedule`, and clears
the gate's gradient so the optimizer does not move it again. It is a rule rather than the
adapter's own hook because the schedule is set by the run's length (``steps``), which only
rules are told. The gates' Adam moments are in the rule's state, so a resumed run continues
exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rankwise.adapters.base import Adapter
from rankwise.adapters.methods.sora import GateAdam, SoraAdapter
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule


@dataclass(frozen=True)
class SoraGateConfig(RuleConfig):
    """No options: ``sparsity``, ``gate_lr`` and ``sparsity_warmup`` are the method's."""


@register_rule("sora_gate")
class SoraGateRule(TrainingRule):
    """SoRA's proximal gate step with the sparsifying schedule (switched on with sora)"""

    config_class = SoraGateConfig
    works_with = "sora adapters, switched on with them"
    implied_by = ("sora",)

    def applies_to(self, adapter: Adapter) -> str | None:
        if not isinstance(adapter, SoraAdapter):
            return "it trains the gate of SoRA adapters, and this adapter has none"
        return None

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        self.gate_opt = {path: GateAdam(a.gate) for path, a in self.adapters.items()}

    def before_optimizer_step(self, step: int, lr: float) -> None:
        for path, adapter in self.adapters.items():
            if adapter.gate.requires_grad:
                eta, threshold = adapter.config.gate_schedule(step, self.steps)
                self.gate_opt[path].step(adapter.gate, eta, threshold)

    def state_dict(self) -> dict[str, Any]:
        return {path: opt.state_dict() for path, opt in self.gate_opt.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for path, opt in self.gate_opt.items():
            if path in state:
                opt.load_state_dict(state[path])
