"""Layer-wise gradient spectra of a language model on one or more datasets.

"How Instruction and Reasoning Data shape Post-Training: Data Quality through the Lens of
Layer-wise Gradients" (Li et al., 2025) reads data quality from the gradients each training
example induces: per layer, the nuclear norm of the gradient matrix (how large the update
is) and its effective rank (how many directions it spreads over). High-quality reasoning
data give smaller nuclear norms and higher effective ranks. ``gradient_spectra`` computes,
for every text, the gradient of the next-token loss with respect to each linear layer's
weight, and reports both measures per layer averaged over the texts of each dataset, side by
side. Singular values come from the float64 Gram matrix (as in :func:`spectrum`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.analysis._layers import block_of, layer_kind, linear_modules, select
from rankwise.analysis.spectrum import _effective_rank, _gram_singular_values
from rankwise.errors import ConfigError, DataError, ModelError


@dataclass(frozen=True)
class GradientSpectra:
    """Mean gradient nuclear norm and effective rank per (dataset, layer)."""

    datasets: list[str]
    layers: list[str]
    nuclear_norm: dict[str, dict[str, float]]  # dataset -> layer -> mean over texts
    effective_rank: dict[str, dict[str, float]]
    texts: dict[str, int]
    loss: dict[str, float]  # mean next-token loss per dataset

    def to_rows(self) -> list[dict]:
        """One row per layer with ``<dataset>_nuclear_norm`` / ``<dataset>_effective_rank`` columns."""
        rows = []
        for name in self.layers:
            row: dict = {"name": name, "kind": layer_kind(name), "block": block_of(name)}
            for d in self.datasets:
                row[f"{d}_nuclear_norm"] = self.nuclear_norm[d][name]
                row[f"{d}_effective_rank"] = self.effective_rank[d][name]
            rows.append(row)
        return rows


def _weight(module: nn.Module) -> tuple[nn.Parameter, bool]:
    """The weight parameter of a linear layer (an adapted layer's frozen base weight) and
    whether it is stored transposed (transformers Conv1D)."""
    inner = getattr(module, "base_layer", module)
    transposed = type(inner).__name__ == "Conv1D" and type(inner).__module__.startswith("transformers")
    return inner.weight, transposed


@contextlib.contextmanager
def _grads_on(params: list[nn.Parameter]) -> Iterator[None]:
    """Make ``params`` require grad for the duration; restore flags and drop grads after."""
    flags = [p.requires_grad for p in params]
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for p, flag, g in zip(params, flags, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = g


def _datasets(datasets: Mapping[str, Sequence[str]] | Sequence[str]) -> dict[str, list[str]]:
    if isinstance(datasets, str):
        raise ConfigError("datasets must be a list of texts or a {name: texts} mapping, not one string")
    named = dict(datasets) if isinstance(datasets, Mapping) else {"data": list(datasets)}
    if not named:
        raise DataError("gradient_spectra needs at least one dataset")
    for name, texts in named.items():
        if isinstance(texts, str) or not list(texts):
            raise DataError(f"dataset {name!r} is empty (or a single string); give a list of texts")
    return {name: list(texts) for name, texts in named.items()}


def _forward_with_loss(model: nn.Module, ids: torch.Tensor):
    need = f"{type(model).__name__} computes no next-token loss; gradient_spectra needs a causal language model"
    try:
        out = model(input_ids=ids, labels=ids)
    except TypeError as e:  # a model whose forward takes no labels (an encoder)
        raise ModelError(f"{need} ({e})") from e
    if getattr(out, "loss", None) is None:
        raise ModelError(need)
    return out


def gradient_spectra(
    model: nn.Module,
    tokenizer,
    datasets: Mapping[str, Sequence[str]] | Sequence[str],
    *,
    layers: str | Sequence[str] | None = None,
    max_tokens: int = 256,
) -> GradientSpectra:
    """Per-layer gradient nuclear norm and effective rank, averaged over each dataset's texts.

    Args:
        model: a causal language model (it must return ``loss`` when given ``labels``).
        tokenizer: its tokenizer.
        datasets: ``{name: [texts]}`` (e.g. ``{"instruction": [...], "reasoning": [...]}``)
            or one list of texts (named ``"data"``).
        layers: glob pattern(s) on layer paths or kinds; None: every linear layer.
        max_tokens: tokens per text (longer texts are cut).

    The model's parameters, ``requires_grad`` flags and ``.grad`` are left as they were.

    Raises:
        DataError: an empty dataset, or a text with fewer than 2 tokens (names it).
        ModelError: the model returns no loss. ConfigError: a bad argument.
    """
    named = _datasets(datasets)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens must be an integer >= 2 (a next-token loss needs two tokens), got {max_tokens!r}")
    modules = linear_modules(model)
    names = select(list(modules), layers)
    weights = {n: _weight(modules[n]) for n in names}
    device = next(model.parameters()).device
    nuc = {d: dict.fromkeys(names, 0.0) for d in named}
    eff = {d: dict.fromkeys(names, 0.0) for d in named}
    losses = {}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        with _grads_on([w for w, _ in weights.values()]):
            for dataset, texts in named.items():
                total = 0.0
                for i, text in enumerate(texts):
                    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(device)
                    if ids.shape[-1] < 2:
                        raise DataError(f"dataset {dataset!r}: text {i} has {ids.shape[-1]} token(s); a next-token loss needs 2 or more")
                    out = _forward_with_loss(model, ids)
                    for w, _ in weights.values():
                        w.grad = None
                    out.loss.backward()
                    total += float(out.loss.detach())
                    _accumulate(weights, nuc[dataset], eff[dataset], len(texts))
                losses[dataset] = total / len(texts)
    finally:
        model.train(was_training)
    return GradientSpectra(
        datasets=list(named),
        layers=names,
        nuclear_norm=nuc,
        effective_rank=eff,
        texts={d: len(t) for d, t in named.items()},
        loss=losses,
    )


@torch.no_grad()
def _accumulate(weights: dict, nuc: dict[str, float], eff: dict[str, float], count: int) -> None:
    """Add this text's per-layer measures (divided by ``count``) into the running means."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    grads = {}
    for name, (w, transposed) in weights.items():
        g = torch.zeros_like(w) if w.grad is None else w.grad
        grads[name] = (g.T if transposed else g).double()
        by_shape.setdefault(tuple(grads[name].shape), []).append(name)
    for names in by_shape.values():
        S = _gram_singular_values(torch.stack([grads[n] for n in names]))
        for name, s, e in zip(names, S.sum(-1).tolist(), _effective_rank(S).tolist(), strict=True):
            nuc[name] += s / count
            eff[name] += e / count


__all__ = ["GradientSpectra", "gradient_spectra"]
