"""Matrix Nuclear-Norm evaluation of a language model ("Large Language Model Evaluation via
Matrix Nuclear-Norm", Li et al., 2024).

For a text of ``L`` tokens the model's next-token distributions form a probability matrix
``A`` (L × V, rows sum to 1). Its nuclear norm ``‖A‖_*`` (a convex surrogate of rank)
measures predictive discriminability and diversity; the paper scores a model by
``‖A‖_* / L`` averaged over texts. Because the SVD costs ``O(L² V)``, the paper approximates
the nuclear norm by the sum of the ``D = min(L, V)`` largest column L2 norms of ``A`` (its
L1,2-norm restricted to the top D columns), which needs no SVD:

    ‖A‖_* ≈ Σ_{j=1}^{D} top_j(‖A_{:,j}‖₂)

The paper states the norm relations ``‖A‖_F ≤ ‖A‖_* ≤ √D ‖A‖_F``; the approximation obeys
the upper one always (Cauchy–Schwarz) and equals ``‖A‖_*`` when rows are one-hot (columns
orthogonal), i.e. it is tight for confident predictions and looser for flat ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rankwise.errors import ConfigError, DataError, ModelError
from rankwise.linalg import nuclear_norm


def l12_nuclear_norm(A: torch.Tensor) -> torch.Tensor:
    """The paper's fast approximation of ``‖A‖_*``: the sum of the ``min(L, V)`` largest column
    L2 norms of ``A`` (..., L, V) -> (...). ``O(L V)``, no SVD."""
    L, V = A.shape[-2:]
    norms = torch.linalg.vector_norm(A, dim=-2)  # (..., V), in A's precision (no copy)
    return norms.topk(min(L, V), dim=-1).values.double().sum(-1)


@dataclass(frozen=True)
class TextScore:
    """One text: its token count and ``‖A‖_* / L`` (approximate, and exact when computed)."""

    index: int
    tokens: int
    approx: float
    exact: float | None
    frobenius: float  # ‖A‖_F / L: with √D · this, the paper's bounds on the nuclear norm / L


@dataclass(frozen=True)
class NuclearNormResult:
    """Matrix Nuclear-Norm score of a model on a set of texts (mean of per-text scores)."""

    score: float  # mean approximate score (the paper's Matrix Nuclear-Norm)
    exact_score: float | None  # mean exact ‖A‖_* / L (None unless exact=True)
    texts: list[TextScore]
    seconds_approx: float  # time of the approximation alone (forward passes excluded)
    seconds_exact: float | None  # time of the exact SVD-based norms alone

    def to_rows(self) -> list[dict]:
        return [asdict(t) for t in self.texts]

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ModelError(
            f"nuclear_norm_score needs a language model with an output head (logits); "
            f"{type(model).__name__} returned {type(out).__name__} without logits"
        )
    return logits[0].float()  # (L, V)


@torch.no_grad()
def nuclear_norm_score(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_tokens: int = 512,
    exact: bool = False,
) -> NuclearNormResult:
    """Matrix Nuclear-Norm of ``model`` on ``texts`` (see the module docstring).

    Each text is tokenized on its own (at most ``max_tokens`` tokens) and scored as
    ``approx(‖A‖_*) / L``; ``exact=True`` also computes ``‖A‖_* / L`` by SVD and times both.

    Raises:
        DataError: no texts, or a text with no tokens (its index is named).
        ConfigError: ``max_tokens`` < 1 or longer than the model's context.
        ModelError: the model produces no logits.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise DataError("nuclear_norm_score needs at least one text; got an empty list")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    from rankwise.models import check_seq_len

    check_seq_len(model, max_tokens, option="max_tokens")
    device = next(model.parameters()).device
    rows, t_approx, t_exact = [], 0.0, 0.0
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
        if not isinstance(text, str) or ids.shape[-1] == 0:
            raise DataError(f"text {i} is empty (no tokens); remove it or give it some text")
        A = torch.softmax(_logits(model, ids.to(device)), dim=-1)
        L = A.shape[0]
        t0 = time.perf_counter()
        approx = float(l12_nuclear_norm(A)) / L
        t_approx += time.perf_counter() - t0
        value = None
        if exact:
            t0 = time.perf_counter()
            value = float(nuclear_norm(A)) / L
            t_exact += time.perf_counter() - t0
        fro = float(torch.linalg.matrix_norm(A.double())) / L
        rows.append(TextScore(index=i, tokens=L, approx=approx, exact=value, frobenius=fro))
    mean = sum(r.approx for r in rows) / len(rows)
    exact_mean = sum(r.exact for r in rows) / len(rows) if exact else None
    return NuclearNormResult(
        score=mean,
        exact_score=exact_mean,
        texts=rows,
        seconds_approx=t_approx,
        seconds_exact=t_exact if exact else None,
    )


__all__ = ["NuclearNormResult", "TextScore", "l12_nuclear_norm", "nuclear_norm_score"]
