"""LoRA-GGPO: a random weight perturbation sized by weight and gradient norms, around each step.

"LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation
Optimization", Chang et al. 2025. Like Flat-LoRA it seeks a flat region of the *full* weight
space without SAM's second backward pass: each step's forward and backward run at a
randomly perturbed merged weight ``W' + ε``, and the resulting gradient updates the
unperturbed adapter. GGPO sizes the noise of each output row ``i`` by that row's weight
norm and gradient norm::

    ε_i ~ N(0, σ_i² I),   σ_i = (ρ_w · ||W'_i|| + ρ_g · ||G_i||) / √n

with ``W' = W + ΔW`` the merged weight (``n`` inputs) and ``G`` the previous step's gradient
of the loss with respect to it. LoRA never forms ``G``; the rule uses what the factors see
of it, ``G_B A + B G_A`` (= ``s (G AᵀA + B Bᵀ G)``, the gradient restricted to the
adapter's row and column spaces), so it applies to methods with a LoRA factor pair.

The perturbation is added to the frozen base weight before the step's forward passes
(:meth:`GgpoRule.before_backward`) and removed right after backward (the saved weight is
copied back exactly), so the optimizer step, clipping and everything else see ``W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.adapters.base import Adapter
from rankwise.adapters.rules.base import RuleConfig, TrainingRule, register_rule
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class GgpoConfig(RuleConfig):
    """``rho_weight`` (ρ_w) and ``rho_grad`` (ρ_g): the noise per unit of row weight norm and
    of row gradient norm; ``seed``: the noise generator's seed."""

    rho_weight: float = 0.05
    rho_grad: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("rho_weight", "rho_grad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"ggpo: {name} must be a number >= 0, got {value!r}")
        if self.rho_weight == 0 and self.rho_grad == 0:
            raise ConfigError("ggpo: rho_weight and rho_grad are both 0 (no perturbation); set one > 0")


def factor_gradient(adapter: Adapter) -> torch.Tensor | None:
    """``G_B A + B G_A`` (out, in): the merged weight's gradient as the LoRA factors see it,
    or None before the first backward."""
    b, a = adapter.factor_pair()
    if b.grad is None or a.grad is None:
        return None
    return b.grad.float() @ a.detach().float() + b.detach().float() @ a.grad.float()


@register_rule("ggpo")
class GgpoRule(TrainingRule):
    """LoRA-GGPO: perturb the merged weight by noise sized by row weight and gradient norms (Chang et al. 2025)"""

    config_class = GgpoConfig
    works_with = "methods with a LoRA factor pair lora_A/lora_B (lora, dora, dylora, sora, ...) on float layers"

    def applies_to(self, adapter: Adapter) -> str | None:
        if adapter.factor_pair() is None:
            return "GGPO reads the merged weight's gradient through the LoRA factors lora_A/lora_B"
        if adapter.layer.is_quantized:
            return "the base weight is quantized; it cannot carry a floating-point perturbation"
        return None

    def setup(self, model, adapters, optimizer, *, steps):
        super().setup(model, adapters, optimizer, steps=steps)
        self._grad_norms: dict[str, torch.Tensor] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(self.config.seed)

    def noise_scale(self, path: str, adapter: Adapter) -> torch.Tensor:
        """``σ_i`` per output row (out,) for the adapter on ``path``."""
        merged = adapter.layer.weight_matrix().float() + adapter.delta_weight().detach()
        sigma = self.config.rho_weight * merged.norm(dim=1)
        if path in self._grad_norms:
            sigma = sigma + self.config.rho_grad * self._grad_norms[path].to(sigma.device)
        return sigma / math.sqrt(merged.shape[1])

    def before_backward(self, step: int) -> None:
        """Save each adapted base weight and add ``ε`` to it."""
        with torch.no_grad():
            for path, adapter in self.adapters.items():
                layer = adapter.layer
                w = layer.weight_matrix()
                sigma = self.noise_scale(path, adapter)
                noise = torch.randn(w.shape, generator=self._generator).to(w.device)
                self._saved[path] = layer.weight.detach().clone()
                layer.set_weight_matrix(w.float() + sigma[:, None] * noise)

    def restore(self) -> None:
        """Copy the saved (unperturbed) base weights back, exactly."""
        with torch.no_grad():
            for path, saved in reversed(list(self._saved.items())):  # two adapters, one layer
                self.adapters[path].layer.weight.copy_(saved)
        self._saved = {}

    def teardown(self) -> None:
        self.restore()

    def after_backward(self, step: int) -> None:
        """Remove the perturbation and keep the gradient norms for the next step."""
        self.restore()
        with torch.no_grad():
            for path, adapter in self.adapters.items():
                grad = factor_gradient(adapter)
                if grad is not None:
                    self._grad_norms[path] = grad.norm(dim=1).cpu()

    def state_dict(self) -> dict:
        return {"grad_norms": dict(self._grad_norms), "generator": self._generator.get_state()}

    def load_state_dict(self, state) -> None:
        self._grad_norms = dict(state.get("grad_norms", {}))
        if "generator" in state:
            self._generator.set_state(state["generator"])
