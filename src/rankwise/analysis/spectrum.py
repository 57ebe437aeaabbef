"""Singular value spectra and rank measures of every linear layer of a model.

``spectrum(model)`` returns, per layer, the ``top_k`` largest singular values and four
measures of how low-rank the weight is:

- stable rank ``‖W‖_F² / σ₁²`` (Rudelson & Vershynin 2007) — always exact (``‖W‖_F`` is read
  from the weight, ``σ₁`` is the top singular value);
- effective rank ``exp(H(σ / Σσ))`` (Roy & Vetterli 2007), nuclear norm ``Σσ`` and energy
  rank (the smallest k keeping a fraction ``energy`` of ``‖W‖_F²``) — these need the whole
  spectrum.

Layers with ``min(M, N) <= exact_below`` (and every layer with ``method="exact"``) get the
whole spectrum as the square roots of the eigenvalues of the float64 Gram matrix of their
smaller side (``W Wᵀ`` or ``Wᵀ W``, ``torch.linalg.eigvalsh``): every measure is exact (values
below ~1e-7 σ₁ lose relative accuracy, which no measure here can see), and on 2 cores it is
about 10x faster than ``torch.linalg.svdvals``. Larger layers get their top ``top_k`` values
from :func:`rankwise.linalg.rsvd` (randomized block Krylov, batched over layers of one shape);
the unknown tail is completed with its exact total energy ``‖W‖_F² − Σ_{i<=k} σᵢ²`` spread
evenly over the remaining ``min(M, N) − k`` values. A decreasing tail front-loads its energy,
so on such layers the energy rank and nuclear norm are upper bounds and the effective rank
an estimate (above the exact value in our tests); their rows say ``exact: false``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rankwise.analysis._layers import block_of, layer_kind, linear_weights
from rankwise.errors import ConfigError
from rankwise.linalg import energy_rank, rsvd

METHODS = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's top singular values (descending) and rank measures."""

    name: str
    kind: str
    block: int | None
    shape: tuple[int, int]  # (out_features, in_features)
    singular_values: list[float]
    exact: bool
    frobenius_norm: float
    nuclear_norm: float
    stable_rank: float
    effective_rank: float
    energy_rank: int

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    def row(self) -> dict:
        """The scalar fields as one flat row (CSV-friendly); ``sigma_max`` is σ₁."""
        d = asdict(self)
        del d["singular_values"]
        d["shape"] = f"{self.shape[0]}x{self.shape[1]}"
        d["sigma_max"] = self.singular_values[0] if self.singular_values else 0.0
        d["full_rank"] = self.full_rank
        d["values_kept"] = len(self.singular_values)
        return d


@dataclass(frozen=True)
class SpectrumResult:
    """Spectra of a model's linear layers plus how they were computed."""

    layers: list[LayerSpectrum]
    top_k: int
    energy: float
    method: str
    exact_below: int
    recipe: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerSpectrum:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_rows(self) -> list[dict]:
        """One flat dict per layer (no lists): for tables, CSV and JSON."""
        return [layer.row() for layer in self.layers]

    def to_dict(self) -> dict:
        """Everything, singular values included, as JSON-serialisable data."""
        return {
            "top_k": self.top_k,
            "energy": self.energy,
            "method": self.method,
            "exact_below": self.exact_below,
            "recipe": self.recipe,
            "layers": [{**layer.row(), "singular_values": layer.singular_values} for layer in self.layers],
        }

    def to_csv(self) -> str:
        """The rows of :meth:`to_rows` as CSV text (header first)."""
        rows = self.to_rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_csv` atomically to ``path``."""
        from rankwise.fileio import atomic_write

        text = self.to_csv()
        atomic_write(path, lambda tmp: open(tmp, "w", newline="").write(text))


VALUE_RTOL = 1e-4  # relative accuracy of the randomized top-k singular values

def _effective_rank(S: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))``, ``p = S / ΣS``, over the last axis (the definition of
    :func:`rankwise.linalg.effective_rank`, applied to singular values already computed)."""
    S = S.double()
    total = S.sum(-1, keepdim=True)
    p = S / total.clamp_min(torch.finfo(S.dtype).tiny)
    h = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))


def _complete_tail(top: torch.Tensor, fro2: torch.Tensor, full: int) -> torch.Tensor:
    """Append ``full - k`` equal values carrying the remaining energy ``fro2 - Σ top²``."""
    k = top.shape[-1]
    if k >= full:
        return top
    rest = (fro2 - top.double().square().sum(-1)).clamp_min(0)
    flat = (rest / (full - k)).sqrt().unsqueeze(-1).expand(*top.shape[:-1], full - k)
    return torch.cat([top.double(), flat], -1)


def _gram_singular_values(stack: torch.Tensor) -> torch.Tensor:
    """All singular values (B, min(M, N)), descending, from the float64 Gram of the small side."""
    W = stack.double()
    G = W @ W.mT if W.shape[-2] <= W.shape[-1] else W.mT @ W
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt()


def _spectra(stack: torch.Tensor, k: int, exact: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k values (B, k), completed full spectrum (B, min(M, N))) of a stack (B, M, N)."""
    full = min(stack.shape[-2:])
    fro2 = stack.double().square().sum((-2, -1))
    if exact:
        S = _gram_singular_values(stack)
        return S[:, :k], S
    # a report's singular values are read as numbers: ask rsvd for 1e-4, not its default 1%
    S = rsvd(stack, k, generator=generator, rtol=VALUE_RTOL).S.double()
    return S, _complete_tail(S, fro2, full)


def _check_args(top_k: int, energy: float, method: str, exact_below: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    if not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(exact_below, bool) or not isinstance(exact_below, int) or exact_below < 0:
        raise ConfigError(f"exact_below must be a non-negative integer, got {exact_below!r}")


@torch.no_grad()
def spectrum(
    model: nn.Module,
    *,
    top_k: int = 64,
    layers: str | Sequence[str] | None = None,
    energy: float = 0.9,
    method: str = "auto",
    exact_below: int = 1024,
    merged: bool = True,
    seed: int = 0,
) -> SpectrumResult:
    """Singular values and rank measures of each linear layer of ``model``.

    Args:
        model: any ``nn.Module``; adapted layers are read merged (``merged=False``: base).
        top_k: singular values kept per layer (all of them for layers smaller than that).
        layers: glob pattern(s) on layer paths or kinds (``"*.mlp.*"``, ``"q_proj"``); None: all.
        energy: the fraction of ``‖W‖_F²`` the energy rank keeps.
        method: ``"auto"`` (exact below ``exact_below``, randomized above), ``"exact"`` or
            ``"randomized"``.
        exact_below: size ``min(M, N)`` up to which ``"auto"`` computes the whole spectrum
            exactly (default 1024; above it the randomized top ``top_k``).
        seed: seed of the randomized SVD's test matrices (same seed, same numbers).

    Returns:
        :class:`SpectrumResult`; ``result.to_rows()`` is the per-layer table.

    Raises:
        ModelError: the model has no linear layers. ConfigError: a bad argument or a
        ``layers`` pattern that matches nothing. ShapeError: a weight holds NaN/Inf.
    """
    _check_args(top_k, energy, method, exact_below)
    weights = linear_weights(model, layers, merged=merged)
    generator = torch.Generator().manual_seed(seed)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    found: dict[str, LayerSpectrum] = {}
    for shape, names in by_shape.items():
        full = min(shape)
        k = min(top_k, full)
        exact = method == "exact" or k == full or (method == "auto" and full <= exact_below)
        stack = torch.stack([weights[n] for n in names])
        top, spectra = _spectra(stack, k, exact, generator)
        fro2 = stack.double().square().sum((-2, -1))
        er = energy_rank(spectra, energy=energy)
        eff = _effective_rank(spectra)
        for i, name in enumerate(names):
            s1 = float(top[i, 0])
            found[name] = LayerSpectrum(
                name=name,
                kind=layer_kind(name),
                block=block_of(name),
                shape=shape,
                singular_values=[float(v) for v in top[i]],
                exact=exact,
                frobenius_norm=math.sqrt(float(fro2[i])),
                nuclear_norm=float(spectra[i].sum()),
                stable_rank=float(fro2[i]) / s1**2 if s1 > 0 else 0.0,
                effective_rank=float(eff[i]),
                energy_rank=int(er[i]),
            )
    recipe = {
        "seed": seed,
        "merged": merged,
        "exact": "eigvalsh of the float64 Gram matrix",
        "randomized": "rankwise.linalg.rsvd (auto depth), tail completed with the remaining energy",
    }
    return SpectrumResult(
        layers=[found[n] for n in weights],
        top_k=top_k,
        energy=float(energy),
        method=method,
        exact_below=exact_below,
        recipe=recipe,
    )


__all__ = ["LayerSpectrum", "SpectrumResult", "spectrum"]
