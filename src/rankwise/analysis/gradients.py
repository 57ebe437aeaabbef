"""Layer-wise gradient spectra of a language model on one or more datasets.

"How Instruction and Reasoning Data shape Post-Training: Data Quality through the Lens of
Layer-wise Gradients" (Li et al., 2025) reads data quality from the gradients each training
example induces: per layer, the nuclear norm of the gradient matrix (how large the update
is) and its effective rank (how many directions it spreads over). High-quality reasoning
data give smaller nuclear norms and higher effective ranks. ``gradient_spectra`` computes,
for every text, the gradient of the next-token loss with respect to each linear layer's
weight, and reports both measures per layer averaged over the texts of each dataset, side by
side. Singular values come from the float64 Gram matrix (as in :func:`spectrum`).

Both measures grow with the number of tokens behind a gradient (a linear layer's gradient is a
sum of one outer product per token, so its rank is at most the token count): compare datasets
at equal length. :func:`gradient_datasets` cuts each source into blocks of exactly ``tokens``
tokens for that; ``"licenses"`` names a second kind of text present on every Debian system
(``/usr/share/common-licenses``, from the essential ``base-files`` package): legal English
prose, against the built-in corpus's Python documentation and docstrings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    tokens: dict[str, float] = field(default_factory=dict)  # mean tokens per text, per dataset

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


Texts = Sequence[str] | torch.Tensor  # texts, or a (n, T) tensor of token-id blocks


def _datasets(datasets: Mapping[str, Texts] | Texts) -> dict[str, list]:
    if isinstance(datasets, str):
        raise ConfigError("datasets must be a list of texts or a {name: texts} mapping, not one string")
    if isinstance(datasets, Mapping):
        named = dict(datasets)
    else:
        named = {"data": datasets}
    if not named:
        raise DataError("gradient_spectra needs at least one dataset")
    out = {}
    for name, texts in named.items():
        if isinstance(texts, torch.Tensor):
            if texts.dim() != 2 or texts.dtype != torch.long:
                raise ConfigError(f"dataset {name!r}: token blocks must be a 2-D long tensor (n, T), got {tuple(texts.shape)} {texts.dtype}")
            texts = list(texts)
        elif isinstance(texts, str):
            texts = []
        else:
            texts = list(texts)
        if not texts:
            raise DataError(f"dataset {name!r} is empty (or a single string); give a list of texts")
        out[name] = texts
    return out


def _ids(tokenizer, text, max_tokens: int) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text[:max_tokens].unsqueeze(0)
    return tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]


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
    datasets: Mapping[str, Texts] | Texts,
    *,
    layers: str | Sequence[str] | None = None,
    max_tokens: int = 256,
) -> GradientSpectra:
    """Per-layer gradient nuclear norm and effective rank, averaged over each dataset's texts.

    Args:
        model: a causal language model (it must return ``loss`` when given ``labels``).
        tokenizer: its tokenizer.
        datasets: ``{name: [texts]}`` (e.g. ``{"instruction": [...], "reasoning": [...]}``)
            or one list of texts (named ``"data"``); instead of texts, a ``(n, T)`` long tensor
            of token blocks (see :func:`gradient_datasets`: equal lengths make datasets comparable).
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
    losses, lengths = {}, {}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        with _grads_on([w for w, _ in weights.values()]):
            for dataset, texts in named.items():
                total, count = 0.0, 0
                for i, text in enumerate(texts):
                    ids = _ids(tokenizer, text, max_tokens).to(device)
                    if ids.shape[-1] < 2:
                        raise DataError(f"dataset {dataset!r}: text {i} has {ids.shape[-1]} token(s); a next-token loss needs 2 or more")
                    out = _forward_with_loss(model, ids)
                    for w, _ in weights.values():
                        w.grad = None
                    out.loss.backward()
                    total += float(out.loss.detach())
                    count += ids.shape[-1]
                    _accumulate(weights, nuc[dataset], eff[dataset], len(texts))
                losses[dataset] = total / len(texts)
                lengths[dataset] = count / len(texts)
    finally:
        model.train(was_training)
    return GradientSpectra(
        datasets=list(named),
        layers=names,
        nuclear_norm=nuc,
        effective_rank=eff,
        texts={d: len(t) for d, t in named.items()},
        loss=losses,
        tokens=lengths,
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


LICENSES = Path("/usr/share/common-licenses")
GRADIENT_SOURCES = ("builtin", "licenses")  # the report's default pair


def check_sources(sources: Sequence[str]) -> list[str]:
    """Validate gradient sources cheaply (before any slow work): a list of distinct names that
    are ``"builtin"``, ``"licenses"`` (present) or existing paths."""
    if isinstance(sources, str) or not sources:
        raise ConfigError(f"sources must be a list of data sources (e.g. {list(GRADIENT_SOURCES)}), got {sources!r}")
    sources = [str(s) for s in sources]
    if len(set(sources)) != len(sources):
        raise ConfigError(f"sources repeat a dataset: {sources!r}; give different sources")
    for source in sources:
        if source == "licenses" and not LICENSES.is_dir():
            raise DataError(
                f"{LICENSES} does not exist (it comes with Debian's base-files package); "
                "give a text file or folder of .txt files as the second dataset instead"
            )
        if source not in ("builtin", "licenses") and not Path(source).expanduser().exists():
            raise DataError(f"data {source!r} does not exist; pass 'builtin', 'licenses', a text file or a folder of .txt files")
    return sources


def source_documents(source: str) -> list[str]:
    """The documents of a gradient source: ``"builtin"`` (the built-in corpus's validation
    split), ``"licenses"`` (every license text under /usr/share/common-licenses), or a text
    file / folder of .txt files (each file whole, see :func:`rankwise.data.read_texts`)."""
    from rankwise.data import BUILTIN, load_corpus, read_text_file, read_texts

    if source == BUILTIN:
        return load_corpus(BUILTIN).validation
    if source == "licenses":
        check_sources([source])
        files = sorted({f.resolve() for f in LICENSES.iterdir() if f.is_file()})
        return [read_text_file(f) for f in files]
    return read_texts(source)


def gradient_datasets(sources: Sequence[str], tokenizer, *, count: int = 4, tokens: int = 128) -> dict[str, torch.Tensor]:
    """``{source: (count, tokens) token blocks}``: each source's documents concatenated (EOS
    between them) and cut into blocks of exactly ``tokens`` tokens, of which ``count`` evenly
    spaced ones are kept — the same length everywhere, so the datasets compare fairly."""
    from rankwise.data import tokenize_stream

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be a positive number of texts per dataset, got {count!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ConfigError(f"tokens must be an integer >= 2 (a next-token loss needs two tokens), got {tokens!r}")
    sources = check_sources(sources)
    out = {}
    for source in sources:
        docs = [d for d in source_documents(source) if d.strip()]
        if not docs:
            raise DataError(f"data {source!r} holds no text; give a file with some text")
        ids = tokenize_stream(tokenizer, docs, max_tokens=tokens * count * 64)
        blocks = ids[: len(ids) // tokens * tokens].view(-1, tokens)
        if len(blocks) < count:
            raise DataError(f"data {source!r} has only {len(blocks)} block(s) of {tokens} tokens; {count} are needed (fewer texts or tokens)")
        pick = torch.linspace(0, len(blocks) - 1, count).round().long()
        out[source] = blocks[pick]
    return out


__all__ = ["GRADIENT_SOURCES", "GradientSpectra", "check_sources", "gradient_datasets", "gradient_spectra", "source_documents"]
