"""Intrinsic dimension of an objective landscape ("Measuring the Intrinsic Dimension of
Objective Landscapes", Li, Farkhoor, Liu & Yosinski, 2018).

Train a model not in its native D parameters but in a random d-dimensional subspace through
its initialisation: ``θ = θ₀ + P z`` with ``P`` (D × d) a fixed random matrix with unit-norm
columns and only ``z`` (d, starting at 0) trained. Sweep d; the intrinsic dimension
``d_int90`` is the smallest d whose trained model reaches 90% of the performance of normal
training (``threshold`` sets the fraction). A small ``d_int`` says the task needs few degrees
of freedom — the observation behind low-rank fine-tuning.

``P`` is dense (Gaussian) while D·d stays below ``DENSE_ENTRIES``; above that it is the
paper's sparse alternative (a very sparse random projection: about √D random ±1 entries per
column), which keeps memory at O(d·√D) for a language model's millions of parameters.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from rankwise.errors import ConfigError

DENSE_ENTRIES = 50_000_000  # D·d up to which P is dense (200 MB in float32)
MAX_PROJECTION_ENTRIES = 200_000_000  # a dense P beyond this is refused (800 MB)
PROJECTIONS = ("auto", "dense", "sparse")


def _selected(model: nn.Module, parameters: str | Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose names match a glob in ``parameters`` (None: all)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if parameters is None:
        return named
    patterns = [parameters] if isinstance(parameters, str) else list(parameters)
    chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        example = named[0][0] if named else "(none)"
        raise ConfigError(
            f"parameters {patterns!r} match no trainable parameter; names look like {example!r} "
            "(glob patterns, e.g. '*.mlp.*.weight')"
        )
    return chosen


def _sparse_projection(total: int, dim: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """A (total, dim) sparse matrix: per column ~√total random rows of ±1/√k (unit norm)."""
    k = max(1, min(total, round(math.sqrt(total))))
    rows = torch.randint(total, (dim, k), generator=generator)
    signs = torch.randint(2, (dim, k), generator=generator, dtype=dtype) * 2 - 1
    cols = torch.arange(dim).repeat_interleave(k)
    P = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), cols]), signs.reshape(-1), (total, dim), check_invariants=True).coalesce()
    norms = torch.zeros(dim, dtype=dtype).index_add_(0, P.indices()[1], P.values() ** 2).sqrt()
    return torch.sparse_coo_tensor(P.indices(), P.values() / norms[P.indices()[1]], (total, dim), check_invariants=True).coalesce()


class SubspaceModel(nn.Module):
    """``model`` with its (selected) parameters tied to ``θ₀ + P z``; only ``z`` (d,) trains.

    ``parameters``: glob pattern(s) on parameter names (None: every trainable parameter);
    the others keep their values. ``projection``: ``"dense"``, ``"sparse"`` or ``"auto"``
    (dense while D·d <= ``DENSE_ENTRIES``).
    """

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        *,
        generator: torch.Generator | None = None,
        parameters: str | Sequence[str] | None = None,
        projection: str = "auto",
    ) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        chosen = _selected(model, parameters)
        params = [p.detach() for _, p in chosen]
        total = sum(p.numel() for p in params)
        sparse = projection == "sparse" or (projection == "auto" and total * dim > DENSE_ENTRIES)
        if not sparse and total * dim > MAX_PROJECTION_ENTRIES:
            raise ConfigError(
                f"a dense random projection of {total:,} parameters x {dim:,} dimensions is too large; "
                "use projection='sparse' (or 'auto'), a smaller model or smaller dims"
            )
        object.__setattr__(self, "model", model)  # not a submodule: its parameters stay fixed
        self.names = [n for n, _ in chosen]
        self.fixed = [n for n, _ in model.named_parameters() if n not in set(self.names)]
        self.shapes = [p.shape for p in params]
        self.sparse = sparse
        self.register_buffer("theta0", torch.cat([p.reshape(-1) for p in params]).clone())
        if sparse:
            self.P = _sparse_projection(total, dim, generator, self.theta0.dtype)
        else:
            P = torch.randn(total, dim, generator=generator, dtype=self.theta0.dtype)
            self.register_buffer("P", P / P.norm(dim=0, keepdim=True))
        self.z = nn.Parameter(torch.zeros(dim, dtype=self.theta0.dtype))

    def parameters_now(self) -> dict[str, torch.Tensor]:
        step = torch.sparse.mm(self.P, self.z.unsqueeze(1)).squeeze(1) if self.sparse else self.P @ self.z
        flat = self.theta0 + step
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        if self.fixed:  # detached: no gradient flows into (or accumulates on) the model itself
            params = dict(self.model.named_parameters())
            out.update({name: params[name].detach() for name in self.fixed})
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.parameters_now(), args, kwargs, strict=False)


@dataclass(frozen=True)
class IntrinsicDimensionResult:
    """The performance curve over subspace dimensions and the intrinsic dimension read off it."""

    dims: list[int]
    metrics: list[float]
    baseline: float  # the metric of normal training (all selected parameters)
    threshold: float
    parameters: int  # D
    intrinsic_dimension: int | None  # smallest d with metric >= threshold * baseline (None: none)

    def to_rows(self) -> list[dict]:
        return [
            {"dim": d, "metric": m, "fraction_of_baseline": m / self.baseline if self.baseline else float("nan")}
            for d, m in zip(self.dims, self.metrics, strict=True)
        ]

    def to_dict(self) -> dict:
        return {
            "dims": self.dims, "metrics": self.metrics, "baseline": self.baseline, "threshold": self.threshold,
            "parameters": self.parameters, "intrinsic_dimension": self.intrinsic_dimension,
        }


def _train(module: nn.Module, params: list[nn.Parameter], loss_fn: Callable[[nn.Module], torch.Tensor], steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(module)
        loss.backward()
        optimizer.step()


def _check(dims: Sequence[int], threshold: float, steps: int) -> list[int]:
    try:
        dims = sorted({int(d) for d in dims})
    except (TypeError, ValueError):
        raise ConfigError(f"dims must be positive integers (subspace dimensions), got {dims!r}") from None
    if not dims or dims[0] < 1:
        raise ConfigError(f"dims must be positive subspace dimensions, got {list(dims)!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be a fraction in (0, 1], got {threshold!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    return dims


def intrinsic_dimension(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    metric_fn: Callable[[nn.Module], float],
    dims: Sequence[int],
    *,
    steps: int = 300,
    lr: float = 1e-2,
    baseline_lr: float | None = None,
    threshold: float = 0.9,
    seed: int = 0,
    parameters: str | Sequence[str] | None = None,
    projection: str = "auto",
) -> IntrinsicDimensionResult:
    """Measure the intrinsic dimension of the task ``loss_fn`` defines for ``model``.

    Args:
        model: the model at its initialisation θ₀ (not modified; training runs on copies).
        loss_fn: ``loss_fn(module) -> scalar tensor``, the training loss of a module that is
            called like ``model`` (a full copy, or a :class:`SubspaceModel`).
        metric_fn: ``metric_fn(module) -> float``, higher is better (accuracy, R², loss
            reduction, ...).
        dims: the subspace dimensions d to try (ascending order is reported).
        steps, lr: Adam steps and learning rate of ``z``, the same for every d.
        baseline_lr: Adam learning rate of normal training (default ``lr``).
        threshold: the fraction of the baseline metric that counts as solved (0.9: d_int90).
        seed: seed of the random projections.
        parameters: glob pattern(s) on parameter names: only these move (in the subspace and
            in the baseline); None: every trainable parameter.
        projection: ``"auto"``, ``"dense"`` or ``"sparse"`` (see :class:`SubspaceModel`).
    """
    dims = _check(dims, threshold, steps)
    names = {n for n, _ in _selected(model, parameters)}
    full = copy.deepcopy(model)
    for n, p in full.named_parameters():
        p.requires_grad_(n in names)
    _train(full, [p for n, p in full.named_parameters() if n in names], loss_fn, steps, lr if baseline_lr is None else baseline_lr)
    with torch.no_grad():
        baseline = float(metric_fn(full))
    del full
    generator = torch.Generator().manual_seed(seed)
    metrics = []
    for d in dims:
        sub = SubspaceModel(model, d, generator=generator, parameters=parameters, projection=projection)
        _train(sub, [sub.z], loss_fn, steps, lr)
        with torch.no_grad():
            metrics.append(float(metric_fn(sub)))
    solved = next((d for d, m in zip(dims, metrics, strict=True) if m >= threshold * baseline), None)
    parameters_count = sum(p.numel() for n, p in model.named_parameters() if n in names)
    return IntrinsicDimensionResult(dims, metrics, baseline, float(threshold), parameters_count, solved)


__all__ = ["IntrinsicDimensionResult", "SubspaceModel", "intrinsic_dimension"]
