"""WeLore: find the weights that are low-rank and train only those ("From GaLore to WeLore: How
Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients", Jaiswal et al., 2024).

Singular values of trained weights are heavy-tailed, and how fast they decay differs from
layer to layer. WeLore keeps, in every weight, the singular values that are at least
``threshold`` times its largest (:func:`welore_rank`, on :func:`normalized_spectrum`), one
threshold for the whole model; :func:`welore_threshold` picks it for a target reduction of the
weight parameters. That sorts the weights into

- **low-rank components** (LRCs): the kept rank ``k`` makes factors smaller than the weight,
  ``k (in + out) < in · out``. They become trainable rank-``k`` factors (the truncated SVD),
- **non-low-rank components** (N-LRCs): everything else stays dense and frozen,

and fine-tuning only the LRCs follows full fine-tuning closely at a fraction of the memory
(the paper's finding: the weights whose gradients are low-rank become low-rank).

:class:`WeLoreLinear` is one converted layer (``convert(model, "welore", rank=None,
threshold=θ)``; ``rank`` caps ``k``); :func:`welore` is the whole recipe on a model: pick the
threshold, convert every target, freeze everything but the LRC factors.

The rank rule lives here (``rankwise.compress.allocate``'s ``welore`` allocation is the same
rule on a parameter budget and can import :func:`normalized_spectrum` / :func:`welore_rank`).
Parameters of a layer: LRC ``k (in + out)`` trainable (+ ``out`` bias, trainable), N-LRC
``in · out`` frozen (+ bias, frozen).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import ConfigError, ShapeError
from rankwise.layers.base import StructuredLinear, check_fraction, register_trainable
from rankwise.layers.convert import Targets, convert, linear_targets
from rankwise.layers.lowrank import balanced_factors


def normalized_spectrum(S: torch.Tensor) -> torch.Tensor:
    """``S / S[0]`` in float64 for singular values ``S (k,)`` in descending order (zeros if
    ``S[0] == 0``): each singular value relative to the largest."""
    if S.ndim != 1 or S.numel() == 0:
        raise ShapeError(f"normalized_spectrum: S must be a non-empty vector of singular values; got shape {tuple(S.shape)}")
    s = S.detach().double()
    return s / s[0] if float(s[0]) > 0 else torch.zeros_like(s)


def welore_rank(S: torch.Tensor, threshold: float) -> int:
    """WeLore's rank: how many singular values are at least ``threshold`` times the largest
    (at least 1). ``S (k,)`` descending; ``threshold`` in ``[0, 1]``."""
    threshold = check_fraction("welore_rank", "threshold", threshold, low_open=False)
    return max(1, int((normalized_spectrum(S) >= threshold).sum()))


def is_low_rank(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank-``rank`` factors are smaller than the ``out x in`` weight (an LRC)."""
    return rank * (in_features + out_features) < in_features * out_features


def _spectrum(weight: torch.Tensor) -> torch.Tensor:
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return torch.linalg.svdvals(work)


@register_trainable("welore")
class WeLoreLinear(StructuredLinear):
    """A WeLore layer: trainable rank-``k`` factors ``y = U (V x) + b`` (an LRC), or the frozen
    dense weight ``y = W x + b`` (an N-LRC). :attr:`low_rank` says which."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}
        self.low_rank = rank is not None
        if self.low_rank:
            self.rank = self.check_rank(rank, in_features, out_features)
            self.U = nn.Parameter(torch.zeros(out_features, rank, **kw))
            self.V = nn.Parameter(torch.zeros(rank, in_features, **kw))
        else:
            self.rank = min(in_features, out_features)
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=self.low_rank) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None, threshold: float = 0.1) -> WeLoreLinear:
        """The WeLore layer for ``linear``: ``k = welore_rank(σ, threshold)`` (at most ``rank``);
        trainable factors if they are smaller than the weight, else the frozen weight."""
        m, n = linear.out_features, linear.in_features
        if rank is not None:
            cls.check_rank(rank, n, m)
        threshold = check_fraction(cls.__name__, "threshold", threshold, low_open=False)
        k = welore_rank(_spectrum(linear.weight), threshold)
        k = k if rank is None else min(k, rank)
        weight = linear.weight
        layer = cls.shaped_like(linear, k if is_low_rank(n, m, k) else None)
        with torch.no_grad():
            if layer.low_rank:
                up, down = balanced_factors(weight, k)
                layer.U.copy_(up)
                layer.V.copy_(down)
            else:
                layer.weight.copy_(weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank:
            return F.linear(F.linear(x, self.V), self.U, self.bias)
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V if self.low_rank else self.weight

    def extra_repr(self) -> str:
        kind = "LRC" if self.low_rank else "N-LRC (frozen)"
        return f"{super().extra_repr()}, {kind}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------- the model recipe


def _cost(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features) if is_low_rank(in_features, out_features, rank) else in_features * out_features


def welore_threshold(
    spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], reduction: float
) -> float:
    """The smallest threshold whose WeLore ranks remove at least ``reduction`` of the weight
    parameters of ``shapes`` (``(out, in)`` per name; ``spectra``: their singular values).

    The cost ``Σ k (in + out)`` (LRCs) ``+ Σ in · out`` (N-LRCs) only falls as the threshold
    rises, and changes only at the normalised singular values themselves, so the answer is one
    of them: a binary search over the sorted candidates.
    """
    reduction = check_fraction("welore", "reduction", reduction, low_open=False)
    normalised = {n: normalized_spectrum(s) for n, s in spectra.items()}
    dense = sum(m * n for m, n in shapes.values())
    budget = (1.0 - reduction) * dense

    def cost(threshold: float) -> int:
        total = 0
        for name, s in normalised.items():
            m, n = shapes[name]
            total += _cost(n, m, max(1, int((s >= threshold).sum())))
        return total

    candidates = torch.unique(torch.cat([s for s in normalised.values()] + [torch.ones(1, dtype=torch.float64)]))
    if cost(1.0) > budget:
        best = 1 - cost(1.0) / dense
        raise ConfigError(
            f"welore: a reduction of {reduction:.0%} is out of reach: even keeping only the largest "
            f"singular value of each weight removes {best:.1%}; ask for at most that"
        )
    lo, hi = 0, len(candidates) - 1  # cost(candidates[hi]) fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost(float(candidates[mid])) <= budget else (mid + 1, hi)
    return float(candidates[hi])


def welore(
    model: nn.Module,
    *,
    threshold: float | None = None,
    reduction: float | None = None,
    rank: int | None = None,
    targets: Targets = None,
    freeze_rest: bool = True,
) -> dict[str, WeLoreLinear]:
    """WeLore on ``model``: convert every target to a :class:`WeLoreLinear` and leave only the
    LRC factors (and their biases) trainable.

    Give either ``threshold`` (on ``σ_i / σ_max``) or ``reduction`` (the fraction of the
    targets' weight parameters to remove; the threshold is then :func:`welore_threshold`).
    ``rank`` caps every kept rank; ``freeze_rest=False`` leaves parameters outside the targets
    (embeddings, norms, head) as they were. Returns the new layers by path.
    """
    if (threshold is None) == (reduction is None):
        raise ConfigError("welore: give exactly one of threshold (on σ_i / σ_max, in [0, 1]) or reduction (in [0, 1])")
    chosen = linear_targets(model, targets)
    if reduction is not None:
        spectra = {path: _spectrum(m.weight) for path, m in chosen.items()}
        shapes = {path: (m.out_features, m.in_features) for path, m in chosen.items()}
        threshold = welore_threshold(spectra, shapes, reduction)
    exact = [re.compile(re.escape(path)) for path in chosen]
    new = convert(model, "welore", rank=rank, targets=exact, threshold=threshold)
    if freeze_rest:
        keep = {id(p) for layer in new.values() if layer.low_rank for p in layer.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return new


def low_rank_components(model: nn.Module) -> list[str]:
    """The paths of the WeLore layers of ``model`` that are LRCs (trainable factors)."""
    return [path for path, m in model.named_modules() if isinstance(m, WeLoreLinear) and m.low_rank]


__all__ = [
    "WeLoreLinear",
    "is_low_rank",
    "low_rank_components",
    "normalized_spectrum",
    "welore",
    "welore_rank",
    "welore_threshold",
]
