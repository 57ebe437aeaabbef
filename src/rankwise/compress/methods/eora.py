"""``eora``: training-free low-rank compensation of a compressed layer in the activation
eigenspace (EoRA, Liu et al. 2024, Sec. 3, Eq. 4–7).

A compressed layer ``W'`` (quantized, factorised, ...) leaves an error ``ΔW = W − W'``. What
matters is the output error ``‖ΔW X‖_F`` on real inputs, so EoRA eigendecomposes the input
Gram ``G = X Xᵀ = Q Λ Qᵀ``, projects the error into that eigenspace,
``ΔW' = ΔW Q Λ^½`` (so ``‖ΔW'‖_F = ‖ΔW X‖_F``), truncates ``ΔW' ≈ U_r Σ_r V_rᵀ`` and maps back:
``B = U_r Σ_r (out, r)``, ``A = V_rᵀ Λ^-½ Qᵀ (r, in)``. Then ``W' + B A`` is the best rank-``r``
correction for the calibration inputs (Eckart–Young in the projected space); ``Λ`` is
floored at ``damp · mean(Λ)`` so near-null directions do not blow ``A`` up. The layer becomes
a :class:`~rankwise.layers.CompensatedLinear` (``y = W' x + B (A x)``).

Two ways to use it:

- ``--method eora`` (``base="quantize"``, the default): quantize every layer group-wise
  (``bits``, ``fmt``, ``group_size``; ``quantize.py``; the default ``fmt="auto"`` is 4-bit
  ``"affine"`` in groups of 64, which decodes on PyTorch's packed int4 CPU kernel), then
  spend what is left of the budget on compensation ranks, greedily by output error removed per parameter (the ``Σ_i²`` of
  ``ΔW'`` relative to the layer's output energy ``‖W X‖²``, per ``out + in`` parameters:
  the ``global`` allocation, the only one this path supports).
  ``--ratio`` counts storage: a ``bits``-bit weight costs ``bits/32`` of a float32 parameter
  (plus 16 bits per group scale), so ``ratio`` must exceed what the quantized model takes.
- ``base=<any other method>`` (e.g. ``"svdllm"``): reserve ``rank (out + in)`` parameters per
  layer, let that method compress to the rest of the budget, then compensate each layer at
  ``rank``; the base method's ``--allocate`` choices apply. For models compressed elsewhere,
  :func:`eora_compensate` does the post-step on a model given the original weights and
  calibration statistics.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rankwise.compress.allocate import LayerSpectrum, allocate_with_overhead, greedy_fill
from rankwise.compress.base import CompressionJob, CompressionMethod, get_method, register_method
from rankwise.compress.calibrate import Calibration, LayerStats
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError, ShapeError
from rankwise.layers import (
    CompensatedLinear,
    QuantizedLinear,
    dense_weight,
    module_storage_bits,
)
from rankwise.layers.quantize import AUTO, FORMATS, quantize, resolve_format
from rankwise.modules import replace_module
from rankwise.progress import Bar


class Eigenspace(NamedTuple):
    """``G ≈ Q diag(λ) Qᵀ`` with ``λ`` floored (float64): ``Q (in, in)``, ``root = √λ``."""

    Q: torch.Tensor
    root: torch.Tensor


def activation_eigenspace(gram: torch.Tensor, *, damp: float = 1e-6) -> Eigenspace:
    """Eigendecomposition of the input Gram, eigenvalues floored at ``damp · mean(λ)``."""
    g = gram.to(torch.float64)
    if not torch.isfinite(g).all():
        raise ShapeError("input Gram matrix contains NaN/Inf")
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    floor = damp * max(float(evals.clamp(min=0).mean()), 1e-30)
    return Eigenspace(evecs, evals.clamp(min=floor).sqrt())


class Compensation(NamedTuple):
    """``B (out, r)``, ``A (r, in)`` and the projected error's singular values ``S (k,)``."""

    B: torch.Tensor
    A: torch.Tensor
    S: torch.Tensor


def eigenspace_compensation(delta: torch.Tensor, space: Eigenspace, rank: int) -> Compensation:
    """EoRA's rank-``rank`` correction of the error ``delta = W − W' (out, in)``.

    ``‖(delta − B A) X‖_F² = Σ S[rank:]²`` (up to the eigenvalue floor).
    """
    if delta.ndim != 2 or delta.shape[1] != space.Q.shape[0]:
        raise ShapeError(
            f"error matrix {tuple(delta.shape)} does not fit a Gram of size {space.Q.shape[0]}"
        )
    if not 0 <= rank <= min(delta.shape):
        raise ConfigError(f"compensation rank must be in [0, {min(delta.shape)}]; got {rank}")
    projected = delta.to(torch.float64) @ (space.Q * space.root)  # ΔW Q Λ^½, (out, in)
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    up = u[:, :rank] * s[:rank]  # (out, r)
    down = (vh[:rank] / space.root) @ space.Q.T  # V_rᵀ Λ^-½ Qᵀ, (r, in)
    return Compensation(up, down, s)


def _eigenspaces(names, stats: dict[str, LayerStats], damp: float) -> dict[str, Eigenspace]:
    """One eigendecomposition per distinct Gram (``q/k/v`` and ``gate/up`` share theirs)."""
    cache: dict[int, Eigenspace] = {}
    out = {}
    for name in names:
        gram = stats[name].gram
        if gram is None:
            raise ConfigError(f"eora needs the input Gram of {name!r}; calibrate with 'gram'")
        if id(gram) not in cache:
            cache[id(gram)] = activation_eigenspace(gram, damp=damp)
        out[name] = cache[id(gram)]
    return out


def eora_compensate(
    model: nn.Module,
    originals: dict[str, torch.Tensor],
    calibration: Calibration | dict[str, LayerStats],
    rank: int | dict[str, int],
    *,
    damp: float = 1e-6,
) -> dict[str, float]:
    """Add EoRA compensation to already-compressed layers of ``model`` (in place).

    ``originals``: the dense ``(out, in)`` weights before compression, by module name (the
    modules under those names are now compressed: anything with ``to_dense()`` or an
    ``nn.Linear``). ``calibration``: statistics gathered on the *dense* model (its input
    Grams). ``rank``: one rank for every layer or a rank per name (0 skips a layer). Each
    module becomes a :class:`CompensatedLinear`. Returns, per layer, the relative output
    error ``‖ΔW X‖ / ‖W X‖`` after compensation.
    """
    stats = calibration.stats if isinstance(calibration, Calibration) else calibration
    missing = sorted(set(originals) - set(stats))
    if missing:
        raise ConfigError(
            f"no calibration statistics for {missing[:5]}; calibrate the dense model first"
        )
    ranks = rank if isinstance(rank, dict) else {n: rank for n in originals}
    spaces = _eigenspaces([n for n in originals if ranks.get(n, 0) > 0], stats, damp)
    errors = {}
    for name, weight in originals.items():
        r = ranks.get(name, 0)
        if r <= 0:
            continue
        module = model.get_submodule(name)
        w = weight.to(torch.float64)
        comp = eigenspace_compensation(w - dense_weight(module).to(torch.float64), spaces[name], r)
        dtype = weight.dtype
        replace_module(
            model, name, CompensatedLinear.from_factors(module, comp.B.to(dtype), comp.A.to(dtype))
        )
        energy = float((w @ (spaces[name].Q * spaces[name].root)).pow(2).sum()) or 1.0
        errors[name] = math.sqrt(float(comp.S[r:].pow(2).sum()) / energy)
    return errors


@register_method
@dataclass(frozen=True)
class EoRA(CompressionMethod):
    """Compress (quantize, or any method ``base``), then add eigenspace low-rank compensation."""

    base: str = "quantize"
    bits: int = 4
    fmt: str = AUTO
    group_size: int = 64
    rank: int = 16
    damp: float = 1e-6
    base_options: dict = dataclasses.field(default_factory=dict)

    name = "eora"
    summary = "EoRA: quantize (or compress) then add low-rank compensation in the activation eigenspace (EoRA 2024)"
    needs = frozenset({"gram"})
    layer_tensors = ("base.codes", "base.scales", "base.zeros", "A", "B")  # base.U/V are shorter

    def __post_init__(self) -> None:
        if self.fmt not in (AUTO, *FORMATS):
            raise ConfigError(
                f"eora fmt must be one of {', '.join((AUTO, *FORMATS))}; got {self.fmt!r}"
            )
        if not 2 <= self.bits <= 8 or self.group_size < 1:
            raise ConfigError(
                f"eora needs bits in [2, 8] and group_size >= 1; got {self.bits}, {self.group_size}"
            )
        if self.rank < 1:
            raise ConfigError(f"eora rank must be >= 1; got {self.rank}")
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"eora damp must be in (0, 1); got {self.damp}")
        if self.base == self.name:
            raise ConfigError("eora cannot use itself as its base method")
        if self.base != "quantize":
            inner = get_method(self.base, **self.base_options)
            if type(inner).compress_model is not CompressionMethod.compress_model:
                raise ConfigError(
                    f"eora base {self.base!r} is a whole-model method; use a per-layer SVD method"
                )
            object.__setattr__(self, "needs", frozenset(inner.needs | {"gram"}))

    def supported_allocations(self) -> tuple[str, ...]:
        if self.base == "quantize":
            return ("global",)  # greedy on compensation ranks, relative output error
        return get_method(self.base, **self.base_options).supported_allocations()

    def compress_model(self, job: CompressionJob) -> list[LayerReport]:
        calibration = self.require(job.calibration)
        if self.base == "quantize":
            return self._on_quantized(job, calibration)
        return self._on_method(job, calibration)

    def _on_quantized(self, job: CompressionJob, calibration: Calibration) -> list[LayerReport]:
        model, layers, budget, element_bits = job.model, job.layers, job.budget, job.element_bits
        spaces = _eigenspaces(layers, calibration.stats, self.damp)
        quantized, spectra, energy, used = {}, {}, {}, 0
        bar = Bar(len(layers), "eora: quantize", show=job.progress)
        for name, layer in layers.items():
            fmt, group_size = resolve_format(self.fmt, self.bits, self.group_size, layer.in_features)
            q = QuantizedLinear.from_quantized(
                quantize(layer.weight.detach(), bits=self.bits, fmt=fmt, group_size=group_size),
                None if layer.bias is None else layer.bias.detach(),
            )
            w = layer.weight.detach().to(torch.float64)
            root = spaces[name].Q * spaces[name].root
            projected = (w - q.dequantize().to(torch.float64)) @ root
            spectra[name] = torch.linalg.svdvals(projected)
            energy[name] = float((w @ root).pow(2).sum()) or 1.0
            quantized[name] = q
            used += -(-q.storage_bits() // element_bits)
            bar.update(1)
        bar.close()
        if used > budget:
            raise ConfigError(
                f"eora: the {self.bits}-bit quantized layers alone take {used:,} parameter-equivalents, "
                f"more than the budget of {budget:,}; raise --ratio or lower bits"
            )
        width = {n: m.in_features + m.out_features for n, m in layers.items()}
        ranks = greedy_fill(
            {n: 0 for n in layers},
            budget - used,
            step=lambda n, r: width[n] if r < len(spectra[n]) else None,
            gain=lambda n, r: float(spectra[n][r]) ** 2 / energy[n] / width[n],
        )
        originals = {n: m.weight.detach().clone() for n, m in layers.items()}
        for name, q in quantized.items():
            replace_module(model, name, q, expect=nn.Linear)
        errors = eora_compensate(
            model,
            {n: originals[n] for n in layers if ranks[n] > 0},
            calibration,
            ranks,
            damp=self.damp,
        )
        rows = []
        for name, layer in layers.items():
            module = model.get_submodule(name)
            err = errors.get(name, math.sqrt(float(spectra[name].pow(2).sum()) / energy[name]))
            after = -(-module_storage_bits(module) // element_bits)
            rows.append(
                LayerReport.of(
                    name, layer, module, rank=ranks[name] or None, parameters_after=after,
                    relative_error=err, base="quantize", bits=self.bits, kernel=module.kernel,
                )  # fmt: skip
            )
        return rows

    def _on_method(self, job: CompressionJob, calibration: Calibration) -> list[LayerReport]:
        model, layers, budget, allocation = job.model, job.layers, job.budget, job.allocation
        inner = get_method(self.base, **self.base_options)
        comp_rank = {
            n: min(self.rank, min(m.in_features, m.out_features)) for n, m in layers.items()
        }
        decs, spectra = {}, {}
        bar = Bar(len(layers), f"eora: decompose ({inner.name})", show=job.progress)
        for name, layer in layers.items():
            stats = calibration.stats[name]
            dec = inner.decompose(layer.weight.detach().to(torch.float64), stats)
            decs[name] = dec
            spectra[name] = LayerSpectrum(
                layer.out_features, layer.in_features, dec.S, sensitivity=stats.sensitivity
            )
            bar.update(1)
        bar.close()
        overhead = {n: comp_rank[n] * (m.in_features + m.out_features) for n, m in layers.items()}
        ranks = allocate_with_overhead(spectra, budget, overhead, strategy=allocation)
        originals, rows = {}, []
        for name, layer in layers.items():
            if ranks[name] is not None:
                originals[name] = layer.weight.detach().clone()
                new = inner.factorize(layer, calibration.stats[name], ranks[name], decs.pop(name))
                replace_module(model, name, new, expect=nn.Linear)
        errors = eora_compensate(
            model, originals, calibration, {n: comp_rank[n] for n in originals}, damp=self.damp
        )
        for name, layer in layers.items():
            module = model.get_submodule(name)
            after = module_storage_bits(module) // (layer.weight.element_size() * 8)
            compensated = ranks[name] is not None
            detail = {"base": self.base, "base_rank": ranks[name]} if compensated else {}
            rows.append(
                LayerReport.of(
                    name, layer, module, rank=comp_rank[name] if compensated else None,
                    parameters_after=after, relative_error=errors.get(name, 0.0), **detail,
                )  # fmt: skip
            )
        return rows
