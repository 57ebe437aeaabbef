"""``lq``: low-rank plus quantized decomposition ``W ≈ Q + L1 L2`` with per-layer bits and ranks
chosen under a storage budget (LQ-LoRA, Guo et al. 2023, Sec. 3.1–3.3).

Per layer and per configuration ``(bits, rank)``, alternate (Alg. 1, initialised with
``Q = 0``, so the first ``L`` is the weight's own truncated SVD):

    L ← SVD_r(W − Q)          Q ← quant(W − L)

keeping the iterate with the smallest error ``‖F^½ (W − Q − L)‖_F`` (the error is not
monotone; the paper stops early for the same reason). ``quant`` is the group-wise quantizer
of ``quantize.py`` (float16 scales per ``group_size`` weights, packed codes). The default
``fmt="auto"`` picks, per bit width, the format a packed CPU kernel runs: 8 bits symmetric
int with one scale per row (``_weight_int8pack_mm``), 4 bits affine in groups of
``group_size`` (``_weight_int4pack_mm_for_cpu``); the paper's NF codebooks (``fmt="nf"``)
and 2/3 bits are available but dequantize in every forward, so the default ``bits`` are
``(4, 8)``. With ``fisher=True`` the error is weighted by the row Fisher information ``F = diag(f)``
from calibration gradients (the paper weights each entry; rankwise's calibration keeps row
sums, so the weighting is per output row), and ``L`` is the exact weighted best rank-``r``
term ``diag(f)^-½ SVD_r(diag(f)^½ (W − Q))``.

Allocation (the paper solves an integer linear program over quantization configurations):
a greedy multiple-choice knapsack (:func:`~rankwise.compress.allocate.choose_configurations`)
— every layer starts at its cheapest configuration, then repeatedly the (layer,
configuration) upgrade with the most error removed per extra bit that still fits is taken,
until none fits; the leftover buys more rank (:func:`grow_ranks`). Errors are absolute (``Σ``
over layers, as the ILP). This ``knapsack`` is the only ``--allocate`` it supports.

Storage and ``--ratio``: a layer at ``(b, r)`` costs ``b`` bits per weight, 16 bits per group
scale and ``r (out + in)`` parameters of the model's dtype for ``L1 (out, r)``, ``L2 (r, in)``;
the budget is ``ratio ×`` the dense model's bits (``size`` = bytes), i.e. in parameter
equivalents of the model's dtype. The layer is a
:class:`~rankwise.layers.QuantizedLowRankLinear` (its ``kernel`` says how ``Q`` runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rankwise.compress.allocate import breakeven_rank, choose_configurations, greedy_fill
from rankwise.compress.base import CompressionJob, CompressionMethod, register_method
from rankwise.compress.calibrate import Calibration
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError
from rankwise.layers import QuantizedLinear, QuantizedLowRankLinear
from rankwise.layers.quantize import (
    AUTO,
    FORMATS,
    Quantized,
    dequantize,
    quantize,
    resolve_format,
    storage_bits,
)
from rankwise.modules import replace_module
from rankwise.progress import Bar


class LQResult(NamedTuple):
    """``W ≈ deq(Q) + L1 L2``: ``Q`` quantized, ``L1 (out, r)``, ``L2 (r, in)``; ``error`` = weighted ‖·‖²."""

    Q: Quantized
    L1: torch.Tensor
    L2: torch.Tensor
    error: float


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(u, s, vh)`` of a float64 ``a (m, n)`` from the eigendecomposition of its smaller
    Gram (``aᵀa`` or ``a aᵀ``): a symmetric ``min(m, n)``-sized problem, several times faster
    than ``torch.linalg.svd`` on a busy CPU (LAPACK's SVD slows down badly when its threads
    share cores). Accurate for the leading singular triplets (all lq keeps); directions with
    ``σ ≈ 0`` get zero vectors on the long side."""
    tall = a.shape[0] >= a.shape[1]
    m = a if tall else a.T
    evals, vectors = torch.linalg.eigh(m.T @ m)  # ascending
    s = evals.flip(0).clamp(min=0).sqrt()
    v = vectors.flip(1)  # (n, n) right singular vectors of m
    u = (m @ v) / torch.where(s > 0, s, torch.ones_like(s))  # (m, n)
    u[:, s <= s[0] * 1e-12] = 0.0
    return (u, s, v.T) if tall else (v, s, u.T)


def lq_decompose(
    weight: torch.Tensor,
    *,
    bits: int,
    rank: int,
    fmt: str = AUTO,
    group_size: int = 64,
    iterations: int = 4,
    row_weights: torch.Tensor | None = None,
) -> LQResult:
    """Alternate ``L = SVD_r(W − Q)``, ``Q = quant(W − L)`` and return the best iterate.

    ``row_weights`` (``(out,)``, positive): weights ``f`` of the error ``Σ_i f_i ‖row_i‖²``.
    ``rank = 0`` is plain quantization. ``fmt="auto"``: see :func:`~rankwise.layers.quantize.resolve_format`.
    """
    fmt, group_size = resolve_format(fmt, bits, group_size, weight.shape[1])
    w = weight.detach().to(torch.float64)
    f = (
        torch.ones(w.shape[0], dtype=torch.float64)
        if row_weights is None
        else row_weights.to(torch.float64)
    )
    root = f.sqrt()[:, None]
    empty = (w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1]))
    if rank == 0:
        q = quantize(w, bits=bits, fmt=fmt, group_size=group_size)
        return LQResult(q, *empty, float((root * (w - dequantize(q).double())).pow(2).sum()))
    best = None
    residual_q = torch.zeros_like(w)
    for _ in range(max(1, iterations)):
        u, s, vh = _svd(root * (w - residual_q))
        l1 = (u[:, :rank] * s[:rank]) / root  # (out, r)
        l2 = vh[:rank]  # (r, in)
        q = quantize(w - l1 @ l2, bits=bits, fmt=fmt, group_size=group_size)
        residual_q = dequantize(q).double()
        err = float((root * (w - residual_q - l1 @ l2)).pow(2).sum())
        if best is None or err < best.error:
            best = LQResult(q, l1, l2, err)
    return best


def _config_bits(
    out_f: int, in_f: int, bits: int, rank: int, fmt: str, group_size: int, element_bits: int
) -> int:
    fmt, group_size = resolve_format(fmt, bits, group_size, in_f)
    return (
        storage_bits(out_f, in_f, bits=bits, group_size=group_size, fmt=fmt)
        + rank * (out_f + in_f) * element_bits
    )


def grow_ranks(
    layers: dict[str, nn.Linear],
    chosen: dict[str, LQResult | None],
    row_weights: dict[str, torch.Tensor | None],
    leftover: int,
) -> dict[str, LQResult]:
    """Spend ``leftover`` parameters on more rank for the chosen quantized layers.

    With ``Q`` fixed, ``L = SVD_r(W − Q)`` is optimal at every rank, so each extra rank is taken
    greedily where its squared singular value (weighted error removed) per ``out + in``
    parameters is largest. The knapsack's configurations are coarse (a bit more per weight
    is thousands of parameters); this fills the budget to within one rank step.
    """
    spectra, factors = {}, {}
    for name, res in chosen.items():
        if res is None:
            continue
        w = layers[name].weight.detach().to(torch.float64)
        f = row_weights[name]
        root = (
            torch.ones(w.shape[0], 1, dtype=w.dtype) if f is None else f.to(w.dtype).sqrt()[:, None]
        )
        u, s, vh = _svd(root * (w - dequantize(res.Q).double()))
        spectra[name], factors[name] = s, (u, vh, root)
    start = {n: chosen[n].L1.shape[1] for n in spectra}
    width = {n: layers[n].out_features + layers[n].in_features for n in spectra}
    ranks = greedy_fill(
        start,
        leftover,
        step=lambda n, r: width[n] if r < len(spectra[n]) else None,
        gain=lambda n, r: float(spectra[n][r]) ** 2 / width[n],
    )
    grown = {}
    for name, r in ranks.items():
        if r == chosen[name].L1.shape[1]:
            continue
        u, vh, root = factors[name]
        s = spectra[name]
        grown[name] = LQResult(
            chosen[name].Q, (u[:, :r] * s[:r]) / root, vh[:r], float(s[r:].pow(2).sum())
        )
    return grown


def _row_weights(calibration: Calibration | None, name: str) -> torch.Tensor:
    """Row Fisher weights ``(out,)``, zeros floored at 1e-3 of the smallest positive one."""
    if calibration is None or calibration.stats[name].fisher_rows is None:
        raise ConfigError(
            "lq fisher=True needs Fisher statistics (calibrate with 'fisher'); none were given"
        )
    fr = calibration.stats[name].fisher_rows.to(torch.float64)
    if not bool((fr > 0).any()):
        raise ConfigError(
            f"lq: every gradient of {name!r} is zero; the calibration loss did not reach it"
        )
    return fr.clamp(min=float(fr[fr > 0].min()) * 1e-3)


@register_method
@dataclass(frozen=True)
class LQLoRA(CompressionMethod):
    """``W ≈ Q + L1 L2`` per layer, bits and rank per layer chosen greedily under the budget."""

    bits: tuple[int, ...] = (4, 8)
    ranks: tuple[int, ...] = (0, 16, 64)
    fmt: str = AUTO
    group_size: int = 64
    iterations: int = 4
    fisher: bool = False
    allow_dense: bool = True

    name = "lq"
    summary = "LQ-LoRA: W = quantized + low-rank, bits/rank per layer under a storage budget (LQ-LoRA 2023)"
    needs = frozenset()
    allocations = ("knapsack",)
    layer_tensors = ("base.codes", "base.scales", "base.zeros", "A", "B")

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            raise ConfigError(
                f"lq bits must be a non-empty list of integers in [2, 8]; got {self.bits}"
            )
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ConfigError(
                f"lq ranks must be a non-empty list of integers >= 0; got {self.ranks}"
            )
        if self.fmt not in (AUTO, *FORMATS):
            raise ConfigError(
                f"lq fmt must be one of {', '.join((AUTO, *FORMATS))}; got {self.fmt!r}"
            )
        if self.group_size < 1 or self.iterations < 1:
            raise ConfigError(
                f"lq group_size and iterations must be >= 1; got {self.group_size}, {self.iterations}"
            )
        if self.fisher:
            object.__setattr__(self, "needs", frozenset({"fisher"}))

    def compress_model(self, job: CompressionJob) -> list[LayerReport]:
        model, layers, calibration, element_bits = job.model, job.layers, job.calibration, job.element_bits
        names = list(layers)
        configs = [(b, r) for b in self.bits for r in self.ranks]
        if self.allow_dense:
            configs.append((None, 0))  # the layer stays as it is (the budget allows full precision)
        costs = torch.full((len(names), len(configs)), float("inf"), dtype=torch.float64)
        errors = torch.full_like(costs, float("inf"))
        results: dict[tuple[str, int], LQResult] = {}
        bar = Bar(len(names) * len(configs), "lq: decompose", show=job.progress)
        for i, name in enumerate(names):
            layer = layers[name]
            m, n = layer.out_features, layer.in_features
            row_weights = _row_weights(calibration, name) if self.fisher else None
            for j, (bits, rank) in enumerate(configs):
                bar.update(1)
                if bits is None:
                    costs[i, j], errors[i, j] = m * n, 0.0
                    continue
                if rank >= breakeven_rank(m, n) // 2 and rank > 0:
                    continue  # a factor this large is no longer "low rank" for this layer
                res = lq_decompose(
                    layer.weight,
                    bits=bits,
                    rank=rank,
                    fmt=self.fmt,
                    group_size=self.group_size,
                    iterations=self.iterations,
                    row_weights=row_weights,
                )
                results[(name, j)] = res
                costs[i, j] = (
                    _config_bits(m, n, bits, rank, self.fmt, self.group_size, element_bits) / element_bits
                )
                errors[i, j] = res.error
        bar.close()
        choice = choose_configurations(costs, errors, float(job.budget))
        leftover = float(job.budget) - float(costs[torch.arange(len(names)), choice].sum())
        chosen = {name: results.get((name, int(choice[i]))) for i, name in enumerate(names)}
        weights = {n: _row_weights(calibration, n) if self.fisher else None for n in names}
        grown = grow_ranks(layers, chosen, weights, int(leftover))
        rows = []
        for i, name in enumerate(names):
            layer, j = layers[name], int(choice[i])
            bits, rank = configs[j]
            res = grown.get(name, chosen[name])
            if name in grown:
                rank = res.L1.shape[1]
                costs[i, j] += (rank - configs[j][1]) * (layer.in_features + layer.out_features)
                errors[i, j] = res.error
            module = layer
            if res is not None:
                dtype = layer.weight.dtype
                bias = None if layer.bias is None else layer.bias.detach()
                module = QuantizedLinear.from_quantized(res.Q, bias)
                if rank > 0:
                    module = QuantizedLowRankLinear.from_factors(module, res.L1.to(dtype), res.L2.to(dtype))
                replace_module(model, name, module, expect=nn.Linear)
            energy = layer.weight.detach().double().pow(2)
            if self.fisher:
                energy = _row_weights(calibration, name)[:, None] * energy
            scale = float(energy.sum())
            detail = {} if bits is None else {"bits": bits, "kernel": module.kernel}
            rows.append(
                LayerReport.of(
                    name, layer, module, rank=rank or None, parameters_after=int(-(-costs[i, j] // 1)),
                    relative_error=(float(errors[i, j]) / scale) ** 0.5 if scale > 0 else 0.0, **detail,
                )  # fmt: skip
            )
        return rows
