"""NOLA: LoRA's factors as learned linear combinations of fixed random matrices.

``ΔW = s · B A`` with ``A = c_a Σ_{j<k_a} β_j A_j`` (r, in) and ``B = c_b Σ_{i<k_b} α_i B_i``
(out, r). The random bases ``A_j``, ``B_i`` (entries N(0, 1)) are frozen, generated from
``seed`` and shared by every layer of the same shape (:mod:`rankwise.adapters.random_bases`);
only the ``k_a + k_b`` coefficients train, whatever the rank and the layer size, and only
they and the seed are saved. "NOLA: Networks as Linear Combination of Low Rank Random
Basis", Koohpayegani et al. 2023, eq. (2).

The mixture scale ``c`` (:func:`mixture_scale`) makes a training step move the factors as
much as a LoRA step would, whatever the number of bases: Adam moves every coefficient by
about the learning rate per step, so without it the factors' step grows with ``k`` (k
coefficients pushed by one gradient move a factor coherently) and thousands of bases blow a
model up at LoRA's learning rate. ``α`` starts at zero (the model starts unchanged), ``β``
so that ``A``'s entries have variance ``1/in`` (like LoRA's ``A``).

Saved coefficients are read with the scales of the config's ``format_version``: 2 is the
above; 1 (files written before versions existed, which have no ``format_version``) used
``c_a = 1/√in``, ``c_b = 1/√r``, and loads with those scales, so it computes what it did.

Per step ``A`` and ``B`` are formed once (``k·r·(in + out)`` multiply-adds, independent of
the token count, reading the shared bases in place), then applied like LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, register_method
from rankwise.adapters.random_bases import SharedBasis
from rankwise.errors import ConfigError

FORMAT_VERSION = 2  # how the saved coefficients are read (see the module docstring)
KNOWN_VERSIONS = {1: "unnormalised mixture, before format versions", 2: "normalised mixture"}


def mixture_scale(k: int, entries: int) -> float:
    """The scale ``c`` of a mixture ``c Σ_{j<k} w_j M_j`` of ``k`` random matrices with
    ``entries`` N(0, 1) entries each, such that moving every ``w_j`` by ``±lr`` along its
    gradient's sign (what Adam's first step does) moves the mixture by ``lr`` per entry (RMS),
    for any ``k``.

    The signs correlate with the bases (``E[sign(⟨ĝ, M_j⟩) M_j] = √(2/π) ĝ`` for the unit
    gradient ``ĝ``), so ``E‖Σ_j ±M_j‖² = k·entries + k(k−1)·2/π``: the step grows like
    ``√k`` while ``k ≪ entries`` and like ``k`` beyond. ``c = 1/√(k + (2/π)·k(k−1)/entries)``.
    """
    return 1.0 / math.sqrt(k + (2.0 / math.pi) * k * (k - 1) / entries)


@dataclass(frozen=True)
class NolaConfig(AdapterConfig):
    """NOLA options: ``rank`` (of ``B A``), ``num_basis_a``/``num_basis_b`` (random bases
    per factor = trainable coefficients per factor), ``seed`` (of the bases),
    ``format_version`` (how saved coefficients are read; leave it at the default)."""

    num_basis_a: int = 1024
    num_basis_b: int = 1024
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        super().validate()
        for name in ("num_basis_a", "num_basis_b"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer (bases per factor), got {value!r}")
        if self.format_version not in KNOWN_VERSIONS:
            known = ", ".join(f"{v} ({what})" for v, what in KNOWN_VERSIONS.items())
            raise ConfigError(
                f"NOLA format_version={self.format_version!r} is not one this rankwise reads "
                f"(known: {known}); saved by a newer rankwise? upgrade rankwise to load it"
            )

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> NolaConfig:
        """As :meth:`AdapterConfig.from_saved`; a saved config without ``format_version``
        predates versions: version 1."""
        return super().from_saved({"format_version": 1, **values})


@register_method("nola")
class NolaAdapter(Adapter):
    """``ΔW = s · (c_b Σ α_i B_i)(c_a Σ β_j A_j)``, fixed shared random ``A_j``, ``B_i``; trains α, β."""

    summary = "NOLA: LoRA factors as learned mixes of fixed random bases (Koohpayegani et al. 2023)"
    config_class = NolaConfig

    def build(self) -> None:
        c, dev, dt = self.config, self.layer.device, self.param_dtype
        # (k, r, n) layouts: bases are prefixes along k (random_bases tiles dimension 0)
        self._basis_a = SharedBasis((c.num_basis_a, c.rank, self.layer.in_features),
                                    seed=c.seed, kind="nola_a")  # fmt: skip
        self._basis_b = SharedBasis((c.num_basis_b, c.rank, self.layer.out_features),
                                    seed=c.seed, kind="nola_b")  # fmt: skip
        self.nola_alpha = nn.Parameter(torch.empty(c.num_basis_b, device=dev, dtype=dt))
        self.nola_beta = nn.Parameter(torch.empty(c.num_basis_a, device=dev, dtype=dt))

    def mixture_scales(self) -> tuple[float, float]:
        """``(c_a, c_b)``: the scales of ``A``'s and ``B``'s mixtures (by format version)."""
        c, n_in, n_out = self.config, self.layer.in_features, self.layer.out_features
        if c.format_version == 1:
            return 1.0 / math.sqrt(n_in), 1.0 / math.sqrt(c.rank)
        return mixture_scale(c.num_basis_a, c.rank * n_in), mixture_scale(c.num_basis_b, c.rank * n_out)

    def reset_parameters(self) -> None:
        k_a, n_in = self.config.num_basis_a, self.layer.in_features
        c_a = self.mixture_scales()[0]
        with torch.no_grad():
            self.nola_alpha.zero_()
            # var(A) = c_a² · k_a · β² = 1/in
            self.nola_beta.fill_(1.0 / (c_a * math.sqrt(k_a * n_in)))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (out, r), A (r, in))`` mixed from the bases with the current coefficients."""
        p, r = self.nola_alpha, self.config.rank
        c_a, c_b = self.mixture_scales()
        basis_a = self._basis_a.get(p.device, p.dtype)  # (k_a, r, in), shared: read as a view
        basis_b = self._basis_b.get(p.device, p.dtype)  # (k_b, r, out)
        a = (self.nola_beta * c_a) @ basis_a.view(basis_a.shape[0], -1)
        b = (self.nola_alpha * c_b) @ basis_b.view(basis_b.shape[0], -1)
        return b.view(r, -1).t(), a.view(r, -1)

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        b, a = self.factors()
        return self.layer.project_out(self.layer.project_in(x, a), b) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        b, a = self.factors()
        return self.layer.add_projected(y, self.layer.project_in(x, a), b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        b, a = self.factors()
        return (b.float() @ a.float()) * self.scaling
