"""FLoRA: the update of an N-D weight as a Tucker product with a small core.

"FLoRA: Low-Rank Core Space for N-dimension" (Si et al. 2024). The change of a weight
tensor with modes ``(n_1, ..., n_N)`` lives in a low-rank core space of the same shape::

    ΔW = s · G ×_1 U_1 ×_2 U_2 ... ×_N U_N,     G (r_1, ..., r_N),  U_k (n_k, r_k)

A Conv2d kernel is a 4-D tensor ``(out, in, kh, kw)``: ranks ``(rank, rank, kr, kr)`` with
``kr = min(k, kernel_rank)`` (``kernel_rank=None`` keeps the full kernel size), so the
spatial structure is kept instead of flattening the kernel into a matrix. A Linear layer is
the 2-D case ``ΔW = s · U_1 G U_2ᵀ``. Trainable parameters per layer:
``Π r_k + Σ n_k r_k``. The factors start with orthonormal columns and the core at zero, so
the model starts unchanged. ``s = alpha / rank``.

Forward: the core and the input-side factors fold into one ``(r_1, in·kh·kw)`` kernel
``A = G ×_2 U_2 ×_3 U_3 ×_4 U_4`` (tiny next to the layer), then ``Δ(x) = s · U_1 (A x)`` is
one low-rank conv (or matmul) — the cost of LoRA at rank ``r_1``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, LayerView, register_method
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class FloraConfig(AdapterConfig):
    """FLoRA options: ``rank`` for the channel modes, ``kernel_rank`` for the spatial modes
    (None = full kernel size), ``ndim`` the weight dimensionality required (None = any)."""

    kernel_rank: int | None = None
    ndim: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.kernel_rank is not None and self.kernel_rank <= 0:
            raise ConfigError(f"kernel_rank must be a positive integer or None, got {self.kernel_rank!r}")
        if self.ndim is not None and self.ndim < 2:
            raise ConfigError(f"ndim must be >= 2 or None, got {self.ndim!r}")


def weight_modes(layer: LayerView) -> tuple[int, ...]:
    """The weight as a tensor: ``(out, in, *kernel)`` for convs, ``(out, in)`` otherwise."""
    if layer.kind == "conv":
        return tuple(layer.weight.shape)
    return (layer.out_features, layer.in_features)


def mode_ranks(modes: tuple[int, ...], config: FloraConfig) -> tuple[int, ...]:
    """The Tucker ranks: ``rank`` for the two channel modes, ``kernel_rank`` (capped) for the rest."""
    kernel = [k if config.kernel_rank is None else min(k, config.kernel_rank) for k in modes[2:]]
    return (config.rank, config.rank, *kernel)


def tucker_fold(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``core ×_2 U_2 ... ×_N U_N`` (every mode but the first), flattened to ``(r_1, Π n_k)``."""
    letters = string.ascii_lowercase
    n = core.dim()
    core_idx = letters[:n]
    out_idx = letters[n : 2 * n - 1]
    terms = [f"{out_idx[k - 1]}{core_idx[k]}" for k in range(1, n)]
    spec = f"{core_idx},{','.join(terms)}->{core_idx[0]}{out_idx}"
    return torch.einsum(spec, core, *factors).reshape(core.shape[0], -1)


@register_method("flora")
class FloraAdapter(Adapter):
    """``ΔW = s · G ×_1 U_1 ... ×_N U_N`` (Tucker) over the weight's own modes."""

    summary = "FLoRA: Tucker core for N-D weights, conv kernels kept 4-D (Si et al. 2024)"
    config_class = FloraConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: FloraConfig) -> str | None:
        modes = weight_modes(layer)
        kind = type(layer.module).__name__
        if config.ndim is not None and len(modes) != config.ndim:
            return (
                f"ndim={config.ndim} but this {kind} has a {len(modes)}-D weight {modes}; "
                f"valid ndim here: {len(modes)} or None"
            )
        limit = min(modes[0], modes[1])
        if config.rank > limit:
            return f"rank={config.rank} exceeds min(out, in channels) = {limit}; valid: 1..{limit}"
        return None

    def build(self) -> None:
        modes = weight_modes(self.layer)
        ranks = mode_ranks(modes, self.config)
        dev, dt = self.layer.device, self.param_dtype
        self.flora_core = nn.Parameter(torch.empty(ranks, device=dev, dtype=dt))
        self.flora_factors = nn.ParameterList(
            nn.Parameter(torch.empty(n, r, device=dev, dtype=dt)) for n, r in zip(modes, ranks, strict=True)
        )

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.flora_core)
        for u in self.flora_factors:
            if u.device.type == "meta":
                continue
            g = torch.randn(u.shape, dtype=torch.float32, device=u.device)
            with torch.no_grad():
                u.copy_(torch.linalg.qr(g).Q)

    def _input_kernel(self) -> torch.Tensor:
        """``(r_1, in·k…)``: the core folded with every factor but the output one."""
        return tucker_fold(self.flora_core, list(self.flora_factors)[1:])

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h = self.layer.project_in(x, self._input_kernel())
        return self.layer.project_out(h, self.flora_factors[0]) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h = self.layer.project_in(x, self._input_kernel())
        return self.layer.add_projected(y, h, self.flora_factors[0], self.scaling)

    def delta_weight(self) -> torch.Tensor:
        u_out = self.flora_factors[0].float()
        return (u_out @ self._input_kernel().float()) * self.scaling

    def extra_repr(self) -> str:
        ranks = tuple(self.flora_core.shape)
        return f"{super().extra_repr()}, tucker_ranks={ranks}"


def parameter_count(modes: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """FLoRA's trainable parameters for one weight: ``Π r_k + Σ n_k r_k``."""
    return math.prod(ranks) + sum(n * r for n, r in zip(modes, ranks, strict=True))
