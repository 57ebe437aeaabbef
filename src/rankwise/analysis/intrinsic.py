"""Intrinsic dimension of an objective landscape ("Measuring the Intrinsic Dimension of
Objective Landscapes", Li, Farkhoor, Liu & Yosinski, 2018).

Train a model not in its native D parameters but in a random d-dimensional subspace through
its initialisation: ``θ = θ₀ + P z`` with ``P`` (D × d) a fixed Gaussian matrix with unit-norm
columns and only ``z`` (d, starting at 0) trained. Sweep d; the intrinsic dimension
``d_int90`` is the smallest d whose trained model reaches 90% of the performance of normal
training (``threshold`` sets the fraction). A small ``d_int`` says the task needs few degrees
of freedom — the observation behind low-rank fine-tuning.

``P`` is dense here (memory D·d), which suits the small models this is meant for; the paper
uses a Fastfood transform for large ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from rankwise.errors import ConfigError

MAX_PROJECTION_ENTRIES = 200_000_000  # D·d floats of the dense P (800 MB in float32)


class SubspaceModel(nn.Module):
    """``model`` with its parameters tied to ``θ₀ + P z``; only ``z`` (d,) is trainable."""

    def __init__(self, model: nn.Module, dim: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
        total = sum(p.numel() for p in params)
        if total * dim > MAX_PROJECTION_ENTRIES:
            raise ConfigError(
                f"a dense random projection of {total:,} parameters x {dim:,} dimensions is too large; "
                "use a smaller model or smaller dims"
            )
        object.__setattr__(self, "model", model)  # not a submodule: its parameters stay fixed
        self.names = names
        self.shapes = [p.shape for p in params]
        self.register_buffer("theta0", torch.cat([p.reshape(-1) for p in params]).clone())
        P = torch.randn(total, dim, generator=generator, dtype=self.theta0.dtype)
        self.register_buffer("P", P / P.norm(dim=0, keepdim=True))
        self.z = nn.Parameter(torch.zeros(dim, dtype=self.theta0.dtype))

    def parameters_now(self) -> dict[str, torch.Tensor]:
        flat = self.theta0 + self.P @ self.z
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.parameters_now(), args, kwargs)


@dataclass(frozen=True)
class IntrinsicDimensionResult:
    """The performance curve over subspace dimensions and the intrinsic dimension read off it."""

    dims: list[int]
    metrics: list[float]
    baseline: float  # the metric of normal training (all parameters)
    threshold: float
    parameters: int  # D
    intrinsic_dimension: int | None  # smallest d with metric >= threshold * baseline (None: none)

    def to_rows(self) -> list[dict]:
        return [
            {"dim": d, "metric": m, "fraction_of_baseline": m / self.baseline if self.baseline else float("nan")}
            for d, m in zip(self.dims, self.metrics, strict=True)
        ]


def _train(module: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], steps: int, lr: float) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(module)
        loss.backward()
        optimizer.step()


def intrinsic_dimension(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    metric_fn: Callable[[nn.Module], float],
    dims: Sequence[int],
    *,
    steps: int = 300,
    lr: float = 1e-2,
    threshold: float = 0.9,
    seed: int = 0,
) -> IntrinsicDimensionResult:
    """Measure the intrinsic dimension of the task ``loss_fn`` defines for ``model``.

    Args:
        model: the model at its initialisation θ₀ (not modified; training runs on copies).
        loss_fn: ``loss_fn(module) -> scalar tensor``, the training loss of a module that is
            called like ``model`` (a full copy, or a :class:`SubspaceModel`).
        metric_fn: ``metric_fn(module) -> float``, higher is better (accuracy, R², ...).
        dims: the subspace dimensions d to try (ascending order is reported).
        steps, lr: Adam steps and learning rate, the same for every run and the baseline.
        threshold: the fraction of the baseline metric that counts as solved (0.9: d_int90).
        seed: seed of the random projections.
    """
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise ConfigError(f"dims must be positive subspace dimensions, got {list(dims)!r}")
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be a fraction in (0, 1], got {threshold!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    full = copy.deepcopy(model)
    _train(full, loss_fn, steps, lr)
    with torch.no_grad():
        baseline = float(metric_fn(full))
    generator = torch.Generator().manual_seed(seed)
    metrics = []
    for d in dims:
        sub = SubspaceModel(model, d, generator=generator)
        _train(sub, loss_fn, steps, lr)
        with torch.no_grad():
            metrics.append(float(metric_fn(sub)))
    solved = next((d for d, m in zip(dims, metrics, strict=True) if m >= threshold * baseline), None)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return IntrinsicDimensionResult(dims, metrics, baseline, float(threshold), parameters, solved)


__all__ = ["IntrinsicDimensionResult", "SubspaceModel", "intrinsic_dimension"]
