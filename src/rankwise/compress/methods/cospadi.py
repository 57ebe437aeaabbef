"""``cospadi``: calibration-guided sparse dictionary learning (CoSpaDi, 2025, Sec. 3).

Low rank puts every row of ``W (out, in)`` in one shared ``r``-dimensional subspace. CoSpaDi
instead writes ``W ≈ S D``: a dense dictionary ``D (k, in)`` of ``k`` atoms and codes
``S (out, k)`` with ``s`` non-zeros per row, so each output row lives in its own
``s``-dimensional span of atoms (a union of subspaces).

Data-aware objective: ``min ‖(W − S D) X‖_F`` over the calibration inputs. With the damped
Cholesky factor ``G = X Xᵀ ≈ L Lᵀ`` this is ``‖W L − S (D L)‖_F``; multiplying from the right
keeps the row-sparsity of ``S``, so the dictionary is learned on ``W̃ = W L`` and mapped back
by ``D = D̃ L⁻¹`` (a triangular solve, as SVD-LLM 2024 does for its factors).

Learning (K-SVD-style alternation; the update is MOD, Engan et al. 1999):

1. start from the top ``k`` right singular vectors of ``W̃`` (random unit rows beyond its rank);
2. sparse coding: generalised OMP per row (``s`` atoms chosen in 4 rounds of the largest
   residual correlations, least squares on the support after each round, all rows batched);
3. dictionary update: ``D̃ = (SᵀS)⁻¹ Sᵀ W̃``; unused atoms are reset to the worst-fitted rows;
   atoms renormalised;
4. repeat ``iterations`` times, keeping the best ``(D̃, S)``.

Storage counted honestly: ``k·in`` dictionary entries, ``out·s`` values (model dtype) and
``out·s`` int16 indices (int32 when ``k ≥ 2^15``), i.e. a 16-bit index costs half a float32
parameter. Sizes: ``k = ⌈atom_ratio · s⌉`` (≤ ``in``); one keep-fraction ``t`` of each layer's
break-even ``s`` is found by bisection so all layers fit the budget, then the leftover is
filled one ``s`` at a time, largest layers first (``allocate.py``; the only allocation
supported is this ``uniform`` one). A layer whose cost would reach ``out · in`` stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rankwise.compress.allocate import bisect_knob, greedy_fill
from rankwise.compress.base import (
    CompressionJob,
    CompressionMethod,
    damped_cholesky,
    register_method,
)
from rankwise.compress.layers import SparseDictLinear
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError, ShapeError
from rankwise.modules import replace_module
from rankwise.progress import Bar


class SparseDictionary(NamedTuple):
    """``W ≈ codes @ D``: ``D (k, in)``, ``values``/``indices (out, s)``; ``error`` = relative ‖·‖²."""

    D: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    error: float


def _dense_codes(values: torch.Tensor, indices: torch.Tensor, atoms: int) -> torch.Tensor:
    return values.new_zeros(values.shape[0], atoms).scatter(1, indices, values)


def sparse_code(target: torch.Tensor, dictionary: torch.Tensor, nonzeros: int, *, rounds: int = 4):
    """Generalised OMP: ``(values, indices) (out, s)`` approximating each row of ``target (out, in)``
    by ``s`` rows of ``dictionary (k, in)``, chosen in ``rounds`` batches of largest correlations."""
    gram = dictionary @ dictionary.T  # (k, k)
    ridge = 1e-10 * float(gram.diagonal().mean()) + 1e-300
    corr = target @ dictionary.T  # (out, k)
    out, k = corr.shape
    chosen = torch.zeros(out, 0, dtype=torch.long)
    coef = corr.new_zeros(out, 0)
    per_round = math.ceil(nonzeros / rounds)
    while chosen.shape[1] < nonzeros:
        residual = corr - _dense_codes(coef, chosen, k) @ gram  # correlations with the residual
        residual.scatter_(1, chosen, 0.0)
        new = residual.abs().topk(min(per_round, nonzeros - chosen.shape[1]), dim=1).indices
        chosen = torch.cat([chosen, new], 1)  # (out, t)
        sub = gram[chosen[:, :, None], chosen[:, None, :]]  # (out, t, t)
        sub = sub + ridge * torch.eye(chosen.shape[1], dtype=sub.dtype)
        rhs = corr.gather(1, chosen)[:, :, None]  # (out, t, 1)
        chol, info = torch.linalg.cholesky_ex(sub)
        if bool((info != 0).any()):
            coef = torch.linalg.lstsq(sub, rhs).solution[:, :, 0]
        else:
            coef = torch.cholesky_solve(rhs, chol)[:, :, 0]
    return coef, chosen


def learn_sparse_dictionary(
    target: torch.Tensor,
    atoms: int,
    nonzeros: int,
    *,
    iterations: int = 4,
    generator: torch.Generator | None = None,
) -> SparseDictionary:
    """Learn ``target (out, in) ≈ S D`` with ``D (atoms, in)`` and ``nonzeros`` per row of ``S``.

    Float64 inside; returns the best iterate found (the error never exceeds the SVD start's).
    """
    if target.ndim != 2:
        raise ShapeError(f"target must be (out, in); got {tuple(target.shape)}")
    if not 1 <= nonzeros <= atoms:
        raise ConfigError(f"need 1 <= nonzeros <= atoms; got nonzeros={nonzeros}, atoms={atoms}")
    w = target.to(torch.float64)
    total = float(w.pow(2).sum()) or 1.0
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    d = vh[:atoms]
    if d.shape[0] < atoms:
        extra = torch.randn(atoms - d.shape[0], w.shape[1], dtype=w.dtype, generator=generator)
        d = torch.cat([d, extra / extra.norm(dim=1, keepdim=True)])
    best = None
    for step in range(iterations + 1):
        values, indices = sparse_code(w, d, nonzeros)
        codes = _dense_codes(values, indices, atoms)  # (out, k)
        residual = w - codes @ d
        err = float(residual.pow(2).sum()) / total
        if best is None or err < best.error:
            best = SparseDictionary(d.clone(), values, indices, err)
        if step == iterations:
            break
        # MOD update: least-squares dictionary for these codes
        sts = codes.T @ codes
        sts = sts + (1e-10 * float(sts.diagonal().mean()) + 1e-300) * torch.eye(
            atoms, dtype=w.dtype
        )
        d = torch.linalg.solve(sts, codes.T @ w)
        unused = codes.abs().sum(0) == 0
        if bool(unused.any()):  # reset dead atoms to the worst-fitted rows
            worst = residual.norm(dim=1).topk(int(unused.sum())).indices
            d[unused] = residual[worst]
        norms = d.norm(dim=1, keepdim=True)
        d = d / norms.clamp(min=1e-300)
    return best


def sparse_dict_parameters(
    out_f: int, in_f: int, nonzeros: int, atom_ratio: float, element_bits: int
) -> tuple[int, int]:
    """``(atoms, parameter-equivalents)`` of a layer at ``nonzeros`` per row."""
    atoms = min(in_f, max(nonzeros, math.ceil(atom_ratio * nonzeros)))
    index_bits = 16 if atoms < 2**15 else 32
    cost = atoms * in_f + out_f * nonzeros + math.ceil(out_f * nonzeros * index_bits / element_bits)
    return atoms, cost


@register_method
@dataclass(frozen=True)
class CoSpaDi(CompressionMethod):
    """``W ≈ S D`` learned on the Cholesky-whitened weight; ``s`` per layer fits the budget."""

    atom_ratio: float = 2.0
    iterations: int = 4
    damp: float = 1e-4
    seed: int = 0

    name = "cospadi"
    summary = "CoSpaDi: calibrated sparse dictionary W = S D, s non-zeros per row (CoSpaDi 2025)"
    needs = frozenset({"gram"})
    allocations = ("uniform",)
    layer_tensors = ("D", "values", "indices")

    def __post_init__(self) -> None:
        if not 1.0 <= self.atom_ratio <= 64.0:
            raise ConfigError(f"cospadi atom_ratio must be in [1, 64]; got {self.atom_ratio}")
        if self.iterations < 0:
            raise ConfigError(f"cospadi iterations must be >= 0; got {self.iterations}")
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"cospadi damp must be in (0, 1); got {self.damp}")

    def allocate(
        self, shapes: dict[str, tuple[int, int]], budget: int, element_bits: int
    ) -> dict[str, int | None]:
        """Non-zeros per row for every layer (``None``: stays dense) within ``budget``."""

        def cost(name: str, s: int | None) -> int:
            m, n = shapes[name]
            return (
                m * n
                if s is None
                else sparse_dict_parameters(m, n, s, self.atom_ratio, element_bits)[1]
            )

        limit = {}  # largest s still cheaper than dense
        for name, (m, n) in shapes.items():
            s = 1
            while s + 1 <= n and cost(name, s + 1) < m * n:
                s += 1
            limit[name] = s if cost(name, s) < m * n else None

        def at(t: float) -> dict[str, int | None]:
            return {
                nm: (None if lim is None else max(1, int(t * lim))) for nm, lim in limit.items()
            }

        def total(sizes: dict[str, int | None]) -> int:
            return sum(cost(nm, s) for nm, s in sizes.items())

        if total(at(0.0)) > budget:
            raise ConfigError(
                f"cospadi: a budget of {budget:,} is below the smallest dictionary model ({total(at(0.0)):,})"
            )
        sizes = at(bisect_knob(lambda t: total(at(t)), budget))
        grow = {nm: s for nm, s in sizes.items() if s is not None}  # dense layers stay dense

        def step(nm: str, s: int) -> int | None:
            return cost(nm, s + 1) - cost(nm, s) if s < limit[nm] else None

        grown = greedy_fill(
            grow, budget - total(sizes), step=step, gain=lambda nm, s: shapes[nm][0] * shapes[nm][1]
        )
        return sizes | grown

    def compress_model(self, job: CompressionJob) -> list[LayerReport]:
        stats = self.require(job.calibration).stats
        model, layers, element_bits = job.model, job.layers, job.element_bits
        shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
        sizes = self.allocate(shapes, job.budget, element_bits)
        generator = torch.Generator().manual_seed(self.seed)
        rows = []
        chol_cache: dict[int, torch.Tensor] = {}
        bar = Bar(len(layers), "cospadi: learn dictionaries", show=job.progress)
        for name, layer in layers.items():
            s = sizes[name]
            m, n = shapes[name]
            if s is None:
                rows.append(LayerReport.of(name, layer, layer, rank=None, parameters_after=m * n, relative_error=0.0))
                bar.update(1)
                continue
            gram = stats[name].gram
            if id(gram) not in chol_cache:
                chol_cache[id(gram)] = damped_cholesky(gram, damp=self.damp)
            chol = chol_cache[id(gram)]
            atoms, after = sparse_dict_parameters(m, n, s, self.atom_ratio, element_bits)
            w = layer.weight.detach().to(torch.float64)
            learned = learn_sparse_dictionary(
                w @ chol, atoms, s, iterations=self.iterations, generator=generator
            )
            d = torch.linalg.solve_triangular(chol, learned.D, upper=False, left=False)  # D̃ L⁻¹
            dtype = layer.weight.dtype
            bias = None if layer.bias is None else layer.bias.detach()
            module = SparseDictLinear.from_parts(
                d.to(dtype), learned.values.to(dtype), learned.indices, bias
            )
            replace_module(model, name, module, expect=nn.Linear)
            rows.append(
                LayerReport.of(
                    name, layer, module, rank=None, parameters_after=after,
                    relative_error=math.sqrt(learned.error), atoms=atoms, nonzeros=s,
                )  # fmt: skip
            )
            bar.update(1)
        bar.close()
        return rows
