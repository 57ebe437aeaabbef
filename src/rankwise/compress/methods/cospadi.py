"""``cospadi``: calibration-guided sparse dictionary learning (CoSpaDi, 2025, Sec. 3).

Low rank puts every row of ``W (out, in)`` in one shared ``r``-dimensional subspace. CoSpaDi
instead writes ``W ≈ S D``: a dense dictionary ``D (k, in)`` of ``k`` atoms and codes
``S (out, k)`` with ``s`` non-zeros per row, so each output row lives in its own
``s``-dimensional span of atoms (a union of subspaces).

Data-aware objective: ``min ‖(W − S D) X‖_F`` over the calibration inputs. With the damped
Cholesky factor ``G = X Xᵀ ≈ L Lᵀ`` this is ``‖W L − S (D L)‖_F``; multiplying from the right
keeps the row-sparsity of ``S``, so the dictionary is learned on ``W̃ = W L`` and mapped back
by ``D = D̃ L⁻¹`` (a triangular solve, as SVD-LLM 2024 does for its factors).

Learning (K-SVD-style alternation; the update is MOD, Engan et al. 1999), in float32:

1. start from the top ``k`` right singular vectors of ``W̃`` (eigenvectors of ``W̃ᵀW̃``; random
   unit rows beyond its rank);
2. sparse coding: generalised OMP per row (``s`` atoms chosen in 4 rounds of the largest
   residual correlations); the least squares on each row's support is solved for all rows
   at once by conjugate gradients on dense masked codes (one ``(out, k) @ (k, k)`` product per
   step, a handful of steps, warm-started from the previous round) instead of a batch of
   ``s × s`` Cholesky factorisations (measured >10× faster on SmolLM2's layers, same error);
3. dictionary update: ``D̃ = (SᵀS)⁻¹ Sᵀ W̃`` (Cholesky); unused atoms are reset to the
   worst-fitted rows; atoms renormalised;
4. repeat ``iterations`` times, keeping the best ``(D̃, S)``. ``search_every=2`` re-searches
   the supports only every other time and refits the codes on the previous supports in
   between (faster, slightly worse: not the default).

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
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError, ShapeError
from rankwise.layers import SparseDictLinear
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


def _ridge(gram: torch.Tensor) -> float:
    """A diagonal shift that keeps a Gram positive definite in its own precision."""
    scale = float(gram.diagonal().mean())
    return 10 * torch.finfo(gram.dtype).eps * scale + torch.finfo(gram.dtype).tiny


def _masked_cg(
    gram: torch.Tensor, corr: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, *, tol: float, max_iter: int
) -> torch.Tensor:
    """Every row's least squares on its support at once, by conjugate gradients.

    Row ``i`` solves ``G[S_i, S_i] c = corr[i, S_i]`` (``S_i`` = where ``mask[i]`` is 1); all rows
    are kept dense ``(out, k)`` and zero off their support, so one CG step is one
    ``(out, k) @ (k, k)`` product — no ``(out, s, s)`` per-row Grams. ``start (out, k)``: the
    initial guess (the previous round's codes). Stops when every row's residual is below
    ``tol ×`` the largest right-hand side (a few steps: atoms are near-orthonormal).
    """
    tiny = torch.finfo(corr.dtype).tiny
    x = start * mask
    b = corr * mask
    r = b - (x @ gram) * mask
    p, rs = r.clone(), (r * r).sum(1)
    bound = tol**2 * float((b * b).sum(1).max())
    for _ in range(max_iter):
        if float(rs.max()) <= bound:
            break
        ap = (p @ gram) * mask
        alpha = rs / (p * ap).sum(1).clamp(min=tiny)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rs_next = (r * r).sum(1)
        p = r + (rs_next / rs.clamp(min=tiny))[:, None] * p
        rs = rs_next
    return x


def sparse_code(
    target: torch.Tensor,
    dictionary: torch.Tensor,
    nonzeros: int,
    *,
    rounds: int = 4,
    support: torch.Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
):
    """Generalised OMP: ``(values, indices) (out, s)`` approximating each row of ``target (out, in)``
    by ``s`` rows of ``dictionary (k, in)``, chosen in ``rounds`` batches of largest residual
    correlations; after each batch the coefficients on the support are refit by
    :func:`_masked_cg`, warm-started from the previous batch's. ``support (out, s)`` given (a
    warm start across dictionary updates): no search, only the refit on those atoms.
    """
    gram = dictionary @ dictionary.T  # (k, k)
    corr = target @ dictionary.T  # (out, k)
    out, k = corr.shape
    mask = torch.zeros_like(corr)
    codes = torch.zeros_like(corr)
    if support is not None:
        mask.scatter_(1, support, 1.0)
        codes = _masked_cg(gram, corr, mask, codes, tol=tol, max_iter=max_iter)
        return codes.gather(1, support), support
    chosen = torch.zeros(out, 0, dtype=torch.long)
    per_round = math.ceil(nonzeros / rounds)
    while chosen.shape[1] < nonzeros:
        residual = corr - codes @ gram  # correlations of the atoms with each row's residual
        residual.masked_fill_(mask.bool(), 0.0)
        new = residual.abs().topk(min(per_round, nonzeros - chosen.shape[1]), dim=1).indices
        chosen = torch.cat([chosen, new], 1)  # (out, t)
        mask.scatter_(1, new, 1.0)
        codes = _masked_cg(gram, corr, mask, codes, tol=tol, max_iter=max_iter)
    return codes.gather(1, chosen), chosen


def _top_right_singular_vectors(w: torch.Tensor, count: int) -> torch.Tensor:
    """The top ``count`` right singular vectors of ``w (out, in)`` as rows ``(count, in)``, from the
    eigenvectors of the smaller float64 Gram (``wᵀw`` or ``w wᵀ``: a symmetric eigenproblem, far
    cheaper than ``svd(w)`` on a busy CPU, and only a starting dictionary)."""
    w64 = w.to(torch.float64)
    if w64.shape[0] >= w64.shape[1]:
        _, vectors = torch.linalg.eigh(w64.T @ w64)  # ascending eigenvalues
        return vectors.flip(1)[:, :count].T
    evals, left = torch.linalg.eigh(w64 @ w64.T)  # wide: the smaller (out, out) Gram
    evals, left = evals.flip(0)[:count], left.flip(1)[:, :count]
    rows = left.T @ w64  # σ_i v_iᵀ
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)


def _mod_update(codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """MOD: the least-squares dictionary ``(SᵀS)⁻¹ Sᵀ W`` for codes ``S (out, k)`` (Cholesky; LU
    if ``SᵀS`` is numerically singular)."""
    sts = codes.T @ codes
    sts = sts + _ridge(sts) * torch.eye(sts.shape[0], dtype=sts.dtype)
    rhs = codes.T @ w
    chol, info = torch.linalg.cholesky_ex(sts)
    if int(info) != 0:
        return torch.linalg.solve(sts, rhs)
    return torch.cholesky_solve(rhs, chol)


def learn_sparse_dictionary(
    target: torch.Tensor,
    atoms: int,
    nonzeros: int,
    *,
    iterations: int = 4,
    search_every: int = 1,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> SparseDictionary:
    """Learn ``target (out, in) ≈ S D`` with ``D (atoms, in)`` and ``nonzeros`` per row of ``S``.

    Computes in ``dtype`` (float32 by default: the same error as float64 to ~1e-5 on SmolLM2's
    layers, twice as fast); returns ``D`` and the values in ``target``'s dtype.
    ``search_every``: run the gOMP support search on every ``search_every``-th coding and, in
    between, refit the codes on the previous supports (warm start, one solve). Returns the best
    iterate found (the error never exceeds the start's).
    """
    if search_every < 1:
        raise ConfigError(f"search_every must be >= 1; got {search_every}")
    if target.ndim != 2:
        raise ShapeError(f"target must be (out, in); got {tuple(target.shape)}")
    if not 1 <= nonzeros <= atoms:
        raise ConfigError(f"need 1 <= nonzeros <= atoms; got nonzeros={nonzeros}, atoms={atoms}")
    w = target.to(dtype)
    total = float(w.pow(2).sum()) or 1.0
    d = _top_right_singular_vectors(target, min(atoms, *w.shape)).to(dtype)
    if d.shape[0] < atoms:
        extra = torch.randn(atoms - d.shape[0], w.shape[1], generator=generator).to(dtype)
        d = torch.cat([d, extra / extra.norm(dim=1, keepdim=True)])
    best, support = None, None
    for step in range(iterations + 1):
        warm = support if step % search_every else None
        values, indices = sparse_code(w, d, nonzeros, support=warm)
        support = indices
        codes = _dense_codes(values, indices, atoms)  # (out, k)
        residual = w - codes @ d
        err = float(residual.pow(2).sum()) / total
        if best is None or err < best.error:
            best = SparseDictionary(d.to(target.dtype), values.to(target.dtype), indices, err)
        if step == iterations:
            break
        d = _mod_update(codes, w)
        unused = codes.abs().sum(0) == 0
        if bool(unused.any()):  # reset dead atoms to the worst-fitted rows
            worst = residual.norm(dim=1).topk(int(unused.sum())).indices
            d[unused] = residual[worst]
            support = None  # the reset atoms are in no support yet: search again
        norms = d.norm(dim=1, keepdim=True)
        d = d / norms.clamp(min=torch.finfo(dtype).tiny)
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
