"""Bayesian-LoRA: differentiable gates choose each layer's rank and each factor's bit-width.

"Bayesian-LoRA: LoRA based Parameter Efficient Fine-Tuning using Optimal Quantization levels
and Rank Values trough Differentiable Bayesian Gates", Meo et al. 2024. The update is

    ΔW = s · Q(B) diag(z) Q(A)

- Rank gates ``z ∈ [0, 1]^r``, one per component, are hard-concrete gates (Louizos et al.
  2018): a stretched, clamped sigmoid of a learned logit plus logistic noise while training,
  deterministic at inference. The clamp makes exact 0 and 1 reachable, so a gate that closes
  removes its component exactly.
- Bit-width gates pick each factor's precision by Bayesian Bits' residual decomposition
  (van Baalen et al. 2020): ``Q(X) = X₂ + g₄ (X₄ − X₂ + g₈ (X₈ − X₄ + g₁₆ (X₁₆ − X₈ + g₃₂ (X − X₁₆))))``
  with ``X_b`` the symmetric ``b``-bit rounding of ``X`` (straight-through gradient) and
  ``g_b`` hard-concrete gates: closing ``g_b`` drops every precision from ``b`` bits up.
- The prior is the penalty ``rank_prior · Σ P(z_i ≠ 0) + bit_prior · Σ_b P(bits ≥ b) · (b − b')/32``
  (the expected number of components, and the expected extra bits per weight of each factor),
  added to the gradients after backward by the ``penalty`` training rule, which comes on
  with the method.

:func:`bayes_lora_choices` reads each layer's rank and bit-widths at inference. Saved in
rankwise's format (PEFT has no Bayesian-LoRA): factors and gate logits.
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

BITS = (2, 4, 8, 16, 32)  # 2 bits always; each gate opens the next level (32: unquantized)
GAMMA, ZETA, TEMPERATURE = -0.1, 1.1, 2 / 3  # hard-concrete stretch and temperature (Louizos 2018)


@dataclass(frozen=True)
class BayesLoraConfig(AdapterConfig):
    """``rank_prior`` / ``bit_prior``: the weights of the expected-rank and expected-bits
    penalties; ``gate_init``: the starting gate logit (positive: gates start open);
    ``gate_lr_scale``: the gate logits train at this multiple of the learning rate.

    How the defaults were chosen (SmolLM2, q/v, rank 8, 40 steps at lr 1e-3; bench/adaptive.py):
    with Adam a logit moves at most ``lr × gate_lr_scale`` per step, so over a cosine run at
    most about ``lr × gate_lr_scale × steps / 2``; a gate closes at inference below logit
    -2.4, about 5.4 below its start at 3. At the former scale of 50 the gates could move by
    1 and none closed (rank 8 of 8, 32 bits); at 300 they can move by 6. Where the loss does
    not care about a gate (every rank gate at the start, while ``B = 0``; the high-precision
    bits of a factor), Adam moves it at the full rate whatever the prior's weight, so the
    weight only sets where the loss wins: at 1e-2 every gate closed and the adapter did
    nothing; at 1e-3 the mean rank fell to 1.7 and factors to 2 bits, perplexity 41.5 against
    LoRA's 37.9; at 3e-4 rank 4.6 and 2.9 bits, perplexity 38.3; at 1e-4 (the default) rank
    6.7 and 4.4 bits, perplexity 37.5. For runs much longer or shorter than that, lower or raise ``gate_lr_scale``
    so that ``lr × gate_lr_scale × steps`` stays around 10."""

    rank_prior: float = 1e-4
    bit_prior: float = 1e-4
    gate_init: float = 3.0
    gate_lr_scale: float = 300.0

    def validate(self) -> None:
        super().validate()
        for name in ("rank_prior", "bit_prior"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not (math.isfinite(self.gate_lr_scale) and self.gate_lr_scale > 0):
            raise ConfigError(f"gate_lr_scale must be a positive number, got {self.gate_lr_scale!r}")
        if not math.isfinite(self.gate_init):
            raise ConfigError(f"gate_init must be a finite number, got {self.gate_init!r}")


def hard_concrete(log_alpha: torch.Tensor, sample: bool) -> torch.Tensor:
    """Gate values in [0, 1] (exact 0 and 1 included): sampled while training, else the
    deterministic ``clamp(sigmoid(log α)·(ζ−γ)+γ, 0, 1)``."""
    if sample:
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / TEMPERATURE)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(gate ≠ 0)`` of a hard-concrete gate (differentiable in ``log α``)."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-GAMMA / ZETA))


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor ``bits``-bit rounding of ``x`` with a straight-through gradient."""
    levels = 2 ** (bits - 1) - 1
    scale = x.detach().abs().max().clamp_min(1e-12) / levels
    q = (x / scale).round().clamp(-levels, levels) * scale
    return x + (q - x).detach()


def gated_quantize(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Bayesian Bits' residual sum: 2-bit ``x`` plus gated refinements up to full precision."""
    levels = [fake_quantize(x, b) for b in BITS[:-1]] + [x]
    out = levels[-1] - levels[-2]
    for i in range(len(BITS) - 2, 0, -1):  # inner to outer: g32 inside g16 inside ... g4
        out = levels[i] - levels[i - 1] + gates[i] * out
    return levels[0] + gates[0] * out


@register_method("bayes_lora")
class BayesLoraAdapter(LoraAdapter):
    """``ΔW = s · Q(B) diag(z) Q(A)`` with hard-concrete rank and bit-width gates."""

    summary = "Bayesian-LoRA: hard-concrete gates learn each layer's rank and each factor's bit-width (Meo et al. 2024)"
    config_class = BayesLoraConfig

    def build(self) -> None:
        super().build()
        dev, dt = self.layer.device, self.param_dtype
        self.rank_logit = nn.Parameter(torch.empty(self.config.rank, device=dev, dtype=dt))
        self.bits_logit_A = nn.Parameter(torch.empty(len(BITS) - 1, device=dev, dtype=dt))
        self.bits_logit_B = nn.Parameter(torch.empty(len(BITS) - 1, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for p in (self.rank_logit, self.bits_logit_A, self.bits_logit_B):
            nn.init.constant_(p, self.config.gate_init)

    def _sampling(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def gates(self, sample: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rank gates (r,), bit gates of A (4,), bit gates of B (4,))``."""
        sample = self._sampling() if sample is None else sample
        return tuple(
            hard_concrete(p, sample) for p in (self.rank_logit, self.bits_logit_A, self.bits_logit_B)
        )

    def _factors(self, sample: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(z) Q(A), Q(B))`` (gates sampled while training unless ``sample`` says)."""
        z, ga, gb = self.gates(sample)
        a = gated_quantize(self.lora_A, ga.to(self.lora_A.dtype)) * z[:, None].to(self.lora_A.dtype)
        return a, gated_quantize(self.lora_B, gb.to(self.lora_B.dtype))

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        a, b = self._factors()
        return self.layer.project_out(self.layer.project_in(x, a), b) * self.scaling

    def compose(self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        a, b = self._factors()
        return self.layer.add_projected(y, self.layer.project_in(x, a), b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors(sample=False)
        return (b.float() @ a.float()) * self.scaling

    def lowrank_factors(self):
        return None  # gates and quantization make the stored factors something else

    def lowrank_start(self, b, core, a):
        return None

    def lr_multipliers(self) -> dict[str, float]:
        scale = self.config.gate_lr_scale
        return {"rank_logit": scale, "bits_logit_A": scale, "bits_logit_B": scale}

    def penalty(self) -> torch.Tensor:
        """The gate prior (see the module docstring), differentiable in the gate logits."""
        c = self.config
        value = c.rank_prior * prob_open(self.rank_logit.float()).sum()
        steps = torch.tensor([b - a for a, b in zip(BITS, BITS[1:], strict=False)], dtype=torch.float32) / 32
        for logits in (self.bits_logit_A, self.bits_logit_B):
            level = torch.cumprod(prob_open(logits.float()), dim=0)  # P(bits >= 4, 8, 16, 32)
            value = value + c.bit_prior * (level * steps.to(level.device)).sum()
        return value

    def choices(self) -> tuple[int, int, int]:
        """``(rank, bits of A, bits of B)`` at inference (open gates; 32 = unquantized)."""
        z, ga, gb = (g.detach() for g in self.gates(sample=False))

        def bits(g: torch.Tensor) -> int:
            on = 0
            while on < len(g) and g[on] > 0:
                on += 1
            return BITS[on]

        return int((z > 0).sum()), bits(ga), bits(gb)

    def peft_config(self) -> dict[str, Any] | None:
        return None

    def extra_repr(self) -> str:
        rank, ba, bb = self.choices()
        return f"{super().extra_repr()}, active_rank={rank}, bits_A={ba}, bits_B={bb}"


def bayes_lora_choices(model: nn.Module, name: str = "default") -> dict[str, tuple[int, int, int]]:
    """Per layer, ``(rank, bits of A, bits of B)`` the Bayesian-LoRA adapter ``name`` chose."""
    from rankwise.adapters.inject import adapted_layers

    return {
        path: layer.adapters[name].choices()
        for path, layer in adapted_layers(model).items()
        if name in layer.adapters and isinstance(layer.adapters[name], BayesLoraAdapter)
    }
