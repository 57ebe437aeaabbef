"""Rank allocation: give every layer a rank so the layers together fit a parameter budget.

The budget counts weight parameters of the layers being compressed; a layer at rank ``r``
costs ``r (m + n)`` when that is below its dense size ``m n`` and stays dense (``None``)
otherwise (``r ≥ ⌈mn/(m+n)⌉``: factors would be no smaller). Strategies:

- ``uniform``: every layer keeps the same fraction ``t`` of its break-even rank.
- ``energy``: every layer keeps the smallest rank holding a fraction ``t`` of the energy
  ``Σ S²`` of the method's (weighted) spectrum.
- ``welore``: one threshold on the weight's normalised singular values ``s_i / s_0``
  (WeLore, Jaiswal et al. 2024): layers whose spectra decay fast (more low-rank) keep fewer ranks.
- ``global``: greedy over all layers at once: repeatedly add the singular direction that
  removes the most relative error per parameter it costs (``S_i² / Σ S²`` per ``m + n``). With
  whitened spectra (SVD-LLM) ``S_i²`` is exactly the calibrated output error that direction
  removes, so this spends parameters where they buy the most.
- ``fisher``: the same greedy, on the estimated *loss* increase instead: ``w_l S_i²`` per
  ``m + n``, where ``w_l`` is the layer's sensitivity (mean squared loss gradient of its
  outputs, calibration statistic ``out_grad``). With whitened spectra ``S_i²`` is the output
  error ``Σ_t ‖e_t‖²`` and ``½ w_l S_i²`` its second-order loss cost under a diagonal,
  per-layer-constant Fisher — so errors in different layers become comparable, which
  neither the relative (``global``) nor the absolute output error is. Measured on SmolLM2
  at 80% kept with ``svdllm``: perplexity 2.1x dense against 3.7x for ``uniform`` and
  17x for absolute output error (docs/compress.md).
- ``mfac``: the same greedy with a Fisher that is no longer isotropic: ``w_{l,i} S_i²`` per
  ``m + n``, with ``w_{l,i} = u_iᵀ F_l u_i`` the curvature of the loss along the direction's
  output vector ``u_i`` (calibration statistic ``out_fisher``). See below.

The ``mfac`` weight, step by step. SVD-LLM whitens the inputs: ``L Lᵀ = Σ_t x_t x_tᵀ`` and
``W L = U S Vᵀ``. Dropping direction ``i`` changes the output of token ``t`` by

    e_t = u_i S_i a_t,   a_t = v_iᵀ L⁻¹ x_t,   Σ_t a_t² = v_iᵀ L⁻¹ (Σ_t x_t x_tᵀ) L⁻ᵀ v_i = 1,

so ``Σ_t ‖e_t‖² = S_i²`` (what ``global`` and ``fisher`` read). To second order the loss
grows by ``½ Σ_t e_tᵀ F_t e_t``; with one Fisher per layer, ``F = (1/T) Σ_t g_t g_tᵀ`` of the
output gradients ``g_t = ∂L/∂y_t`` (in place of each token's own ``F_t``), that is

    ΔL_i ≈ ½ Σ_t a_t² S_i² u_iᵀ F u_i = ½ S_i² · u_iᵀ F u_i.

``fisher`` replaces ``u_iᵀ F u_i`` by ``tr(F) / out`` (its sensitivity: the mean diagonal,
the same for every direction of a layer); ``mfac`` keeps the direction. ``F`` (out × out for
every layer) is too large to keep, so calibration keeps a Gaussian sketch ``Z = Σ_t ω_t
g_tᵀ`` (``ω_t ~ N(0, I_m)``, ``m = 64``), an unbiased window of ``m`` gradients with ``F ≈
λI + (1/m) ZᵀZ / T``; :class:`~rankwise.linalg.MFAC` holds that window and
:meth:`~rankwise.linalg.MFAC.quadratic_form` gives ``u_iᵀ F u_i = λ + ‖Z u_i‖² / (m T)`` in
``O(out · m)``. ``u_i`` is normalised, so for an isotropic ``F = c I`` the weight is ``c``
for every direction and ``mfac`` is exactly ``fisher`` (``c = tr(F) / out``). The inverse
``F⁻¹`` (M-FAC's ifvp, an Optimal-Brain-Surgeon saliency ``1 / u_iᵀ F⁻¹ u_i``) is *not* the
cost here: it assumes the other output directions re-adjust to compensate, which the
truncated layer does not do. For methods other than SVD-LLM ``u_i`` is the method's output
factor, and ``S_i²`` its own (weighted) error.

The first three pick their knob ``t`` by bisection (largest ``t`` that fits); the leftover
budget — never more than a few ranks — is then filled greedily as in ``global``, so every
strategy ends within one rank step of the budget.

Budget fitting for every method lives here: :func:`bisect_knob` (the largest knob that
fits), :func:`greedy_fill` (spend a leftover one step at a time, best gain per cost first)
and :func:`choose_configurations` (one configuration per layer, a greedy multiple-choice
knapsack). Methods that size layers themselves (``modegpt``, ``cospadi``, ``lq``, quantized
``eora``) call these instead of writing their own loops.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch

from rankwise.errors import ConfigError
from rankwise.layers.welore import normalized_spectrum

STRATEGIES = ("fisher", "uniform", "energy", "welore", "global", "mfac")
STATISTIC_OF = {"fisher": "out_grad", "mfac": "out_fisher"}  # calibration statistic each needs
K = TypeVar("K", bound=Hashable)


def breakeven_rank(out_features: int, in_features: int) -> int:
    """Smallest rank at which factors are no smaller than the dense weight: ``⌈mn/(m+n)⌉``.

    A layer is factorised only at ranks strictly below this; otherwise it stays dense.
    """
    return math.ceil(out_features * in_features / (out_features + in_features))


def layer_parameters(out_features: int, in_features: int, rank: int | None) -> int:
    """Weight parameters of a layer at ``rank`` (``None``: dense), bias excluded."""
    if rank is None or rank >= breakeven_rank(out_features, in_features):
        return out_features * in_features
    return rank * (out_features + in_features)


# ----------------------------------------------------------------------------- generic fitting


def bisect_knob(cost_at: Callable[[float], int], budget: float, *, steps: int = 40) -> float:
    """The largest knob ``t ∈ [0, 1]`` with ``cost_at(t) <= budget`` (``cost_at`` non-decreasing).

    Returns 1.0 when everything fits; the caller checks ``cost_at(0.0)`` (the floor) first.
    """
    if cost_at(1.0) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_at(mid) <= budget else (lo, mid)
    return lo


def greedy_fill(
    sizes: dict[K, int],
    budget: float,
    *,
    step: Callable[[K, int], float | None],
    gain: Callable[[K, int], float],
) -> dict[K, int]:
    """Grow ``sizes`` one unit at a time within ``budget`` (what is left to spend).

    ``step(key, size)``: the cost of going from ``size`` to ``size + 1`` (``None``: cannot
    grow). ``gain(key, size)``: what that step buys; the largest gain per call is taken
    first, equal gains in turn (round robin). A step that no longer fits retires its key
    (smaller steps of other keys may still fit). Returns the new sizes.
    """
    sizes, left, order = dict(sizes), budget, 0
    heap = []
    for key, size in sizes.items():
        if step(key, size) is not None:
            heap.append((-gain(key, size), order, key))
            order += 1
    heapq.heapify(heap)
    while heap:
        _, _, key = heapq.heappop(heap)
        cost = step(key, sizes[key])
        if cost is None or cost > left:
            continue
        sizes[key] += 1
        left -= cost
        if step(key, sizes[key]) is not None:
            heapq.heappush(heap, (-gain(key, sizes[key]), order, key))
            order += 1
    return sizes


def choose_configurations(costs: torch.Tensor, errors: torch.Tensor, budget: float) -> torch.Tensor:
    """Greedy multiple-choice knapsack: one configuration per layer, ``Σ cost ≤ budget``.

    ``costs``, ``errors``: ``(layers, configs)``. Start at each layer's cheapest
    configuration; repeatedly take the upgrade (higher cost, lower error) with the largest
    error decrease per unit cost that fits. Returns the chosen index per layer.
    """
    choice = costs.argmin(1)
    rows = torch.arange(costs.shape[0])
    used = float(costs[rows, choice].sum())
    if used > budget:
        raise ConfigError(f"budget {budget:,.0f} is below the cheapest configuration ({used:,.0f})")
    while True:
        cur_cost = costs[rows, choice][:, None]
        cur_err = errors[rows, choice][:, None]
        extra = costs - cur_cost
        gain = (cur_err - errors) / extra.clamp(min=1e-12)
        ok = (extra > 0) & (errors < cur_err) & (used + extra <= budget)
        if not bool(ok.any()):
            return choice
        gain = torch.where(ok, gain, torch.full_like(gain, -1.0))
        layer, config = divmod(int(gain.argmax()), costs.shape[1])
        used += float(extra[layer, config])
        choice[layer] = config


# ----------------------------------------------------------------------------- rank allocation


@dataclass(frozen=True)
class LayerSpectrum:
    """What an allocator knows about one layer: its shape and singular values (descending)."""

    out_features: int
    in_features: int
    spectrum: torch.Tensor  # (k,) the method's weighted singular values
    weight_spectrum: torch.Tensor | None = None  # (k,) the raw weight's (for welore)
    sensitivity: float | None = None  # mean squared output gradient (for fisher)
    direction_sensitivity: torch.Tensor | None = None  # (k,) u_iᵀ F u_i per direction (for mfac)

    @property
    def breakeven(self) -> int:
        return breakeven_rank(self.out_features, self.in_features)

    def cost(self, rank: int | None) -> int:
        return layer_parameters(self.out_features, self.in_features, rank)


Ranks = dict[str, "int | None"]


def _normalise(ranks: dict[str, int], layers: dict[str, LayerSpectrum]) -> Ranks:
    return {n: (None if r >= layers[n].breakeven else max(1, r)) for n, r in ranks.items()}


def total_parameters(ranks: Ranks, layers: dict[str, LayerSpectrum]) -> int:
    """Weight parameters of ``layers`` at ``ranks`` (``None``: dense)."""
    return sum(layers[n].cost(r) for n, r in ranks.items())


def minimum_parameters(layers: dict[str, LayerSpectrum]) -> int:
    """The fewest weight parameters any allocation reaches: rank 1 everywhere."""
    return sum(layer.cost(1) for layer in layers.values())


def _fill(
    ranks: dict[str, int],
    layers: dict[str, LayerSpectrum],
    budget: int,
    *,
    relative: bool = True,
    weighted: bool = False,
) -> dict[str, int]:
    """Greedily add ranks (most error removed per parameter first) while they fit.

    ``weighted``: multiply each layer's errors by its ``sensitivity``, or, when given, by
    each direction's ``direction_sensitivity``."""
    energy = {n: layer.spectrum.double().pow(2) for n, layer in layers.items()}
    totals = {n: (float(e.sum()) or 1.0) if relative else 1.0 for n, e in energy.items()}
    if weighted:
        for n, layer in layers.items():
            w = layer.direction_sensitivity
            energy[n] = energy[n] * (layer.sensitivity if w is None else w.double())

    def step(name: str, rank: int) -> int | None:
        layer = layers[name]
        if rank >= layer.breakeven or rank >= len(layer.spectrum):
            return None
        return layer.cost(rank + 1) - layer.cost(rank)

    def gain(name: str, rank: int) -> float:
        layer = layers[name]
        return float(energy[name][rank]) / totals[name] / (layer.out_features + layer.in_features)

    left = budget - total_parameters(_normalise(ranks, layers), layers)
    return greedy_fill(ranks, left, step=step, gain=gain)


def _bisect(rank_at: Callable[[float], dict[str, int]], layers: dict[str, LayerSpectrum], budget: int) -> dict[str, int]:
    """Ranks at the largest knob ``t ∈ [0, 1]`` whose allocation fits the budget."""
    return rank_at(bisect_knob(lambda t: total_parameters(_normalise(rank_at(t), layers), layers), budget))


def _uniform(layers: dict[str, LayerSpectrum]) -> Callable[[float], dict[str, int]]:
    return lambda t: {n: max(1, int(t * layer.breakeven)) for n, layer in layers.items()}


def _energy(layers: dict[str, LayerSpectrum]) -> Callable[[float], dict[str, int]]:
    cumulative = {}
    for n, layer in layers.items():
        e = layer.spectrum.double().pow(2).cumsum(0)
        cumulative[n] = e / e[-1] if float(e[-1]) > 0 else torch.ones_like(e)

    def rank_at(t: float) -> dict[str, int]:
        # smallest r with cumulative[r - 1] >= t
        target = torch.tensor([t], dtype=torch.float64)
        return {n: max(1, int(torch.searchsorted(c, target)) + 1) for n, c in cumulative.items()}

    return rank_at


def _welore(layers: dict[str, LayerSpectrum]) -> Callable[[float], dict[str, int]]:
    normalised = {}
    for n, layer in layers.items():
        s = layer.weight_spectrum if layer.weight_spectrum is not None else layer.spectrum
        normalised[n] = normalized_spectrum(s)
    # threshold θ = 1 - t on s_i / s_0: t = 0 keeps one direction, t = 1 keeps all
    return lambda t: {n: max(1, int((s >= 1.0 - t).sum())) for n, s in normalised.items()}


def _has_directions(layer: LayerSpectrum) -> bool:
    w = layer.direction_sensitivity
    return (
        w is not None
        and w.shape == layer.spectrum.shape
        and bool(torch.isfinite(w).all())
        and bool((w > 0).all())
    )


def _without_directions(layer: LayerSpectrum) -> LayerSpectrum:
    return dataclasses.replace(layer, direction_sensitivity=None)


def statistics_for(strategy: str) -> frozenset[str]:
    """The calibration statistics allocation ``strategy`` reads (empty for most)."""
    return frozenset({STATISTIC_OF[strategy]}) if strategy in STATISTIC_OF else frozenset()


def allocate_ranks(
    layers: dict[str, LayerSpectrum], budget: int, *, strategy: str = "global", relative: bool = True
) -> Ranks:
    """Ranks (``None`` = stays dense) for ``layers`` using at most ``budget`` weight parameters.

    ``relative``: the greedy step compares each layer's error relative to its own energy
    (``S_i² / Σ S²``); ``False`` compares absolute errors ``S_i²`` (for whitened spectra: the
    calibrated output error itself).

    Raises :class:`~rankwise.errors.ConfigError` for an unknown strategy or a budget below
    :func:`minimum_parameters` (rank 1 everywhere).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"allocation {strategy!r} is unknown; valid: {', '.join(STRATEGIES)}")
    if not layers:
        raise ConfigError("no layers to allocate ranks to")
    floor = minimum_parameters(layers)
    if budget < floor:
        raise ConfigError(
            f"a budget of {budget:,} weight parameters is below the minimum {floor:,} "
            "(rank 1 in every layer); raise the ratio or size target"
        )
    if strategy == "fisher":
        missing = [n for n, layer in layers.items() if not (layer.sensitivity or 0.0) > 0.0]
        if missing:
            raise ConfigError(
                f"allocation 'fisher' needs every layer's sensitivity (calibration statistic "
                f"'out_grad'); missing or zero for {missing[:3]}"
            )
        layers = {n: _without_directions(layer) for n, layer in layers.items()}
    if strategy == "mfac":
        missing = [n for n, layer in layers.items() if not _has_directions(layer)]
        if missing:
            raise ConfigError(
                f"allocation 'mfac' needs every layer's direction_sensitivity, one positive "
                f"value per singular value (calibration statistic 'out_fisher'); missing or "
                f"invalid for {missing[:3]}"
            )
    if strategy in ("fisher", "mfac"):
        ranks = {n: 1 for n in layers}
        return _normalise(_fill(ranks, layers, budget, relative=False, weighted=True), layers)
    if strategy == "global":
        ranks = {n: 1 for n in layers}
    else:
        rank_at = {"uniform": _uniform, "energy": _energy, "welore": _welore}[strategy](layers)
        ranks = _bisect(rank_at, layers, budget)
    return _normalise(_fill(ranks, layers, budget, relative=relative), layers)


def allocate_with_overhead(
    layers: dict[str, LayerSpectrum], budget: int, overhead: dict[str, int], *, strategy: str, rounds: int = 4
) -> Ranks:
    """:func:`allocate_ranks` when every factorised layer also costs ``overhead[name]`` (e.g.
    a compensation term): reserve all overheads first, then give back those of layers left
    dense and allocate again, while the result still fits (at most ``rounds`` times)."""
    ranks = allocate_ranks(layers, budget - sum(overhead.values()), strategy=strategy)
    for _ in range(rounds):
        reserve = sum(overhead[n] for n, r in ranks.items() if r is not None)
        again = allocate_ranks(layers, budget - reserve, strategy=strategy)
        used = total_parameters(again, layers) + sum(overhead[n] for n, r in again.items() if r is not None)
        if again == ranks or used > budget:
            break
        ranks = again
    return ranks


__all__ = [
    "STRATEGIES",
    "STATISTIC_OF",
    "statistics_for",
    "LayerSpectrum",
    "allocate_ranks",
    "allocate_with_overhead",
    "total_parameters",
    "minimum_parameters",
    "breakeven_rank",
    "layer_parameters",
    "bisect_knob",
    "greedy_fill",
    "choose_configurations",
]
