"""SoRA: LoRA with a gate vector whose proximal (L1) updates prune rank during training.

"Sparse Low-rank Adaptation of Pre-trained Language Models", Ding et al. 2023. The update is
``Δ(x) = s · B (g ⊙ (A x))`` with a gate ``g ∈ R^r`` that starts at ones. ``A`` and ``B``
train with the optimizer like LoRA's factors; the gate does not: the ``sora_gate`` training
rule (on with the method, see ``rules/sora_gate.py``) gives it a proximal gradient step for
the loss plus an L1 penalty after each backward, and clears its gradient so the optimizer
leaves it alone. The step is the one of the authors' released optimizer: an Adam step, then
soft thresholding::

    g ← soft_threshold(g − η · m̂ / (√v̂ + ε),  η · λ_t),   soft_threshold(v, t) = sign(v) · max(|v| − t, 0)

Soft thresholding sets entries to exactly zero, and a zero gate stays zero unless its
gradient is strong enough to pull it out, so each layer's rank shrinks during training to
what the data needs; :func:`sora_ranks` reads it. After training the zeroed components
contribute nothing; merging folds ``g`` into ``ΔW``.

Why the options are relative (measured on SmolLM2, see docs/benchmarks.md): a raw gradient
step ``η ∇g`` has the scale of the model's gradients, so an absolute L1 weight either
outweighs the data for every component or for none (λ 0.3 at η 0.1 pruned all 480
components of the 40-step bench run; the former default λ 1e-3 at the optimizer's rate
could move a gate by less than 1e-4 in that run). With Adam's normalised step, ``|m̂ / √v̂| ≤ 1`` whatever the
model, so ``sparsity`` (λ) is a plain fraction: a component is pushed to zero when the
loss pulls its gate up less consistently than λ of a full step. How far a gate can travel
in a run is ``η × steps``; the default ``gate_lr`` is ``GATE_TRAVEL / steps`` (at most ``MAX_GATE_LR``), so a gate
can go from 1 to 0 and back in a 40-step run as in a 10,000-step one, and the options need
not be re-tuned for the run length (measured at 40 steps only; the toy test uses 600). The paper's
sparsifying schedule raises the threshold during training: λ_t rises linearly from 0 to
``sparsity`` over the first ``sparsity_warmup`` of the steps, so every component gets a
chance to become useful before the L1 pressure is on.

Saved in rankwise's format by default (PEFT has no SoRA), gate included, so training can go
on. ``save_adapter(..., format="peft")`` exports what the paper deploys: a plain LoRA with
the zeroed components removed and the gate folded into ``A`` (``g_i A_i`` for each kept
``i``), each layer at its own rank in PEFT's ``rank_pattern`` (a layer with no rank left is
left out of the file), which the ``peft`` package loads and which computes the same outputs.
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

GATE_TRAVEL = 3.0  # default gate_lr = GATE_TRAVEL / steps (see the module docstring)
# ... at most this: B starts at 0, so the gates' first gradients are 0 and the threshold alone
# moves them; in a run of a few steps an uncapped step would prune every gate before the data
# could pull any up (a 3-step run left the model unchanged). Binds below 30 steps.
MAX_GATE_LR = 0.1


@dataclass(frozen=True)
class SoraConfig(AdapterConfig):
    """``sparsity``: λ, the L1 threshold per step as a fraction of the gate's Adam step (0: no
    pruning; 1: a component is kept only if the loss pulls its gate up at every step; above
    1 every gate shrinks at every step and only the factors growing can make up for it,
    which a short run cannot. Measured on the 40-step SmolLM2 bench (LoRA: perplexity 37.9):
    0.5 pruned 6% (35.8), 0.8 17% (36.8), 1.0 28% (37.9), 1.2 42% (40.3), 1.5 71% with the
    surviving gates near zero (47.5, the base model 48.7); hence the default 1.0);
    ``gate_lr``: the gate's step size η (None: ``GATE_TRAVEL / steps`` of the run);
    ``sparsity_warmup``: the share of the steps over which λ rises from 0 to ``sparsity``."""

    sparsity: float = 1.0
    gate_lr: float | None = None
    sparsity_warmup: float = 0.25

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.sparsity) and self.sparsity >= 0):
            raise ConfigError(
                f"sparsity (the gate's L1 threshold as a fraction of its step) must be >= 0; "
                f"got {self.sparsity!r}"
            )
        if self.gate_lr is not None and not (math.isfinite(self.gate_lr) and self.gate_lr > 0):
            raise ConfigError(f"gate_lr must be a positive number or None; got {self.gate_lr!r}")
        if not 0 <= self.sparsity_warmup <= 1:
            raise ConfigError(
                f"sparsity_warmup must be a fraction of the steps in [0, 1]; got {self.sparsity_warmup!r}"
            )

    def gate_schedule(self, step: int, steps: int) -> tuple[float, float]:
        """``(η, threshold)`` of the gate's proximal step ``step`` (from 0) of ``steps``."""
        eta = self.gate_lr if self.gate_lr is not None else min(GATE_TRAVEL / max(1, steps), MAX_GATE_LR)
        ramp = self.sparsity_warmup * steps
        lam = self.sparsity * (min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0)
        return eta, eta * lam


def soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    """``sign(v) · max(|v| − t, 0)``: the proximal map of ``t · ||·||₁``."""
    return v.sign() * (v.abs() - t).clamp_min(0)


class GateAdam:
    """The gate's proximal Adam step (one per adapter; state kept for a resumed run)."""

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, gate: torch.Tensor) -> None:
        self.m = torch.zeros_like(gate, dtype=torch.float32)
        self.v = torch.zeros_like(gate, dtype=torch.float32)
        self.t = 0

    @torch.no_grad()
    def step(self, gate: nn.Parameter, eta: float, threshold: float) -> None:
        """``g ← soft_threshold(g − η m̂/(√v̂ + ε), threshold)``; clears ``g.grad``."""
        if gate.grad is None:
            return
        b1, b2 = self.betas
        grad = gate.grad.float()
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        moved = gate.float() - eta * m_hat / (v_hat.sqrt() + self.eps)
        gate.copy_(soft_threshold(moved, threshold).to(gate.dtype))
        gate.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m.clone(), "v": self.v.clone(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.t = int(state["t"])


@register_method("sora")
class SoraAdapter(LoraAdapter):
    """``Δ(x) = s · B (g ⊙ A x)``; the gate ``g`` is trained by proximal gradient steps."""

    summary = "SoRA: LoRA with an L1-gated rank, pruned during training by proximal steps (Ding et al. 2023)"
    config_class = SoraConfig
    peft_by_default = False  # format="peft" exports a plain LoRA (gate dropped): only on request

    def build(self) -> None:
        super().build()
        self.gate = nn.Parameter(torch.ones(self.config.rank, device=self.layer.device, dtype=self.param_dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.gate)

    def _gated_a(self) -> torch.Tensor:
        return self.lora_A * self.gate[:, None]

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h = self.layer.project_in(x, self._gated_a())
        return self.layer.project_out(h, self.lora_B) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h = self.layer.project_in(x, self._gated_a())
        return self.layer.add_projected(y, h, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self._gated_a().float()) * self.scaling

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(g ⊙ A, B, s)``: the gate folded into ``A`` (batched serving)."""
        if self.layer.kind not in ("linear", "transposed_linear"):
            return None
        return self._gated_a(), self.lora_B, self.scaling

    @property
    def active_rank(self) -> int:
        """How many gate entries are non-zero."""
        return int(torch.count_nonzero(self.gate.detach()))

    def kept_components(self) -> torch.Tensor:
        """Indices of the non-zero gate entries (the rank an export keeps)."""
        return torch.nonzero(self.gate.detach()).flatten()

    def peft_state(self) -> dict[str, torch.Tensor]:
        """A plain LoRA's PEFT tensors at this adapter's scaling: ``g ⊙ A`` and ``B`` with
        only the kept components (rank = :attr:`active_rank`); ``{}`` when none is kept.
        ``save_adapter`` puts the per-layer rank in ``rank_pattern`` and rescales ``B`` for
        PEFT's per-layer scaling."""
        keep = self.kept_components()
        if keep.numel() == 0:
            return {}
        state = super().peft_state()  # the full-rank factors in PEFT's layout
        name_a, name_b = self._peft_names()
        a, b = state[name_a][keep], state[name_b][:, keep]
        gate = self.gate.detach()[keep].to(a.dtype).reshape(-1, *(1,) * (a.dim() - 1))
        return {name_a: a * gate, name_b: b}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_rank={self.active_rank}, sparsity={self.config.sparsity:g}"


def sora_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Per layer, the rank a SoRA adapter ``name`` has left (non-zero gate entries)."""
    from rankwise.adapters.inject import adapted_layers

    return {
        path: layer.adapters[name].active_rank
        for path, layer in adapted_layers(model).items()
        if name in layer.adapters and isinstance(layer.adapters[name], SoraAdapter)
    }
