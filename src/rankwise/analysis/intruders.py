"""Intruder dimensions: new high-ranking singular vectors that fine-tuning put into a weight.

"LoRA vs Full Fine-tuning: An Illusion of Equivalence" (Shuttleworth et al., 2024): a left
singular vector ``y_j`` among the top ``top_k`` of a fine-tuned weight is an *intruder
dimension* when no singular vector ``x_i`` of the pre-trained weight resembles it,
``max_i |cos(x_i, y_j)| < threshold``. LoRA-tuned models show such dimensions; fully
fine-tuned ones barely do — their top singular vectors stay close to the base ones.

Both bases are exact: all ``min(M, N)`` singular vectors with non-zero singular value (left
vectors; the base's span of the output space), from the eigen-decomposition of the float64
Gram matrix of the layer's smaller side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rankwise.analysis._layers import block_of, layer_kind, matched_weights
from rankwise.errors import ConfigError


@dataclass(frozen=True)
class LayerIntruders:
    """One layer: the tuned weight's top singular vectors and their best match in the base."""

    name: str
    kind: str
    block: int | None
    shape: tuple[int, int]
    count: int  # intruder dimensions among the top_k
    indices: list[int]  # their positions (0 = largest singular value of the tuned weight)
    max_cosine: list[float]  # per tuned top vector: max |cos| with any base singular vector
    singular_values: list[float]  # the tuned weight's top_k singular values

    def row(self) -> dict:
        d = asdict(self)
        d["shape"] = f"{self.shape[0]}x{self.shape[1]}"
        d["indices"] = " ".join(map(str, self.indices))
        d["min_max_cosine"] = min(self.max_cosine) if self.max_cosine else 1.0
        del d["max_cosine"], d["singular_values"]
        return d


@dataclass(frozen=True)
class IntruderResult:
    """Intruder dimensions of every compared layer."""

    layers: list[LayerIntruders]
    threshold: float
    top_k: int

    @property
    def total(self) -> int:
        return sum(layer.count for layer in self.layers)

    def counts(self) -> dict[str, int]:
        return {layer.name: layer.count for layer in self.layers}

    def to_rows(self) -> list[dict]:
        """One flat dict per layer (CSV-friendly)."""
        return [layer.row() for layer in self.layers]

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "top_k": self.top_k,
            "total": self.total,
            "layers": [asdict(layer) | {"shape": list(layer.shape)} for layer in self.layers],
        }


def left_singular_vectors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, S)``: all ``r = min(M, N)`` left singular vectors (..., M, r) and values (..., r),
    descending, in float64, from the eigen-decomposition of the smaller Gram matrix."""
    W = W.double()
    m, n = W.shape[-2:]
    if m <= n:
        evals, U = torch.linalg.eigh(W @ W.mT)
        return U.flip(-1), evals.flip(-1).clamp_min(0).sqrt()
    evals, V = torch.linalg.eigh(W.mT @ W)
    V, S = V.flip(-1), evals.flip(-1).clamp_min(0).sqrt()
    U = (W @ V) / S.clamp_min(torch.finfo(S.dtype).tiny).unsqueeze(-2)
    return U, S


def _check(threshold: float, top_k: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"threshold must be a cosine similarity in (0, 1], got {threshold!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")


@torch.no_grad()
def intruder_dimensions(
    base: nn.Module,
    tuned: nn.Module | None = None,
    *,
    threshold: float = 0.5,
    top_k: int = 10,
    layers: str | Sequence[str] | None = None,
) -> IntruderResult:
    """Count intruder dimensions of ``tuned`` relative to ``base``, per linear layer.

    Args:
        base: the pre-trained model (adapted layers are read without their adapters).
        tuned: the fine-tuned model: a second model of the same architecture, or ``base``
            itself with a rankwise adapter attached (read merged). None: ``base``.
        threshold: a tuned singular vector whose largest ``|cos|`` with every base singular
            vector is below this is an intruder (the paper sweeps 0.1-0.9; 0.5 by default).
        top_k: how many of the tuned weight's leading singular vectors are examined.
        layers: glob pattern(s) on layer paths or kinds; None: every linear layer.

    Raises:
        ShapeError: the models differ in architecture (names the first mismatching layer).
        ModelError: no linear layers. ConfigError: bad ``threshold``/``top_k``/``layers``.
    """
    _check(threshold, top_k)
    before, after = matched_weights(base, base if tuned is None else tuned, layers)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, w in before.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    found: dict[str, LayerIntruders] = {}
    for shape, names in by_shape.items():
        k = min(top_k, *shape)
        U0, S0 = left_singular_vectors(torch.stack([before[n] for n in names]))
        U1, S1 = left_singular_vectors(torch.stack([after[n] for n in names]))
        U0 = U0[..., : int((S0 > 0).sum(-1).max())]  # a zero singular value has no direction
        best = (U1[..., :k].mT @ U0).abs().amax(-1)  # (B, k)
        for i, name in enumerate(names):
            idx = [j for j in range(k) if float(best[i, j]) < threshold and float(S1[i, j]) > 0]
            found[name] = LayerIntruders(
                name=name,
                kind=layer_kind(name),
                block=block_of(name),
                shape=shape,
                count=len(idx),
                indices=idx,
                max_cosine=[float(c) for c in best[i]],
                singular_values=[float(s) for s in S1[i, :k]],
            )
    return IntruderResult(layers=[found[n] for n in before], threshold=float(threshold), top_k=top_k)


def _lora_adapters(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``{layer path: adapter}`` of LoRA adapter ``name``, validated before anything changes."""
    from rankwise.adapters import adapted_layers

    found = {p: layer.adapters[name] for p, layer in adapted_layers(model).items() if name in layer.adapters}
    if not found:
        raise ConfigError(f"no adapter named {name!r} is attached to the model")
    for path, adapter in found.items():
        if adapter.method != "lora" or adapter.merged:
            what = "is merged" if adapter.merged else f"is a {adapter.method!r} adapter"
            raise ConfigError(f"{path}: adapter {name!r} {what}; intruder mitigation handles unmerged LoRA adapters")
    return found


@torch.no_grad()
def reduce_intruder_dimensions(
    model: nn.Module,
    name: str = "default",
    *,
    keep: float = 0.75,
    threshold: float = 0.5,
    top_k: int = 10,
) -> IntruderResult:
    """Shrink the intruder dimensions of LoRA adapter ``name`` in place (the paper's mitigation).

    Per layer, the intruder components ``Σ_{j ∈ intruders} σ_j u_j v_jᵀ`` of the merged weight
    ``W + ΔW`` are scaled by ``keep`` (PEFT's ``mitigation_lambda``; 1 changes nothing), and
    the new ``ΔW`` is refactored into the adapter's rank by SVD, the scale split evenly between
    ``B`` and ``A`` — the same computation as PEFT 0.21's ``reduce_intruder_dimension``. Layers
    without intruders are left untouched. Returns the intruders found before mitigation.
    """
    _check(threshold, top_k)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 <= keep <= 1:
        raise ConfigError(f"keep must be a fraction in [0, 1], got {keep!r}")
    adapters = _lora_adapters(model, name)
    found = []
    for path, adapter in adapters.items():
        W = adapter.layer.weight_matrix().double()
        merged = W + adapter.delta_weight().double()
        U0, _ = left_singular_vectors(W)
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        k = min(top_k, S.shape[0])
        best = (U[:, :k].T @ U0).abs().amax(-1)
        idx = [j for j in range(k) if float(best[j]) < threshold]
        m, n = W.shape
        found.append(LayerIntruders(path, layer_kind(path), block_of(path), (m, n), len(idx), idx, best.tolist(), S[:k].tolist()))
        if not idx:
            continue
        part = (U[:, idx] * S[idx]) @ Vh[idx]
        delta = (merged + (keep - 1) * part - W) / adapter.scaling
        Ud, Sd, Vhd = torch.linalg.svd(delta, full_matrices=False)
        r = adapter.lora_A.shape[0]
        root = Sd[:r].sqrt()
        adapter.lora_B.copy_((Ud[:, :r] * root).to(adapter.lora_B.dtype))
        adapter.lora_A.copy_((root[:, None] * Vhd[:r]).to(adapter.lora_A.dtype))
    return IntruderResult(layers=found, threshold=float(threshold), top_k=top_k)


__all__ = [
    "IntruderResult",
    "LayerIntruders",
    "intruder_dimensions",
    "left_singular_vectors",
    "reduce_intruder_dimensions",
]
