"""``convert(model, name, rank=..., targets=...)``: swap the linear layers of any model for a
registered structured layer type.

Only plain ``nn.Linear`` modules are converted: not subclasses such as the ``out_proj`` of
``nn.MultiheadAttention`` (the attention reads its weight directly), nor the ``nn.Linear`` parts
of structured layers (the base of a ``CompensatedLinear``).
Targets are matched like adapter targets: ``None`` is every ``nn.Linear`` except the output
head (the LM head, tied to the embeddings or not, stays dense); a string is a module name
matched against the end of each path (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``)
or a glob (``"layers.*.mlp.*"``); a compiled ``re.Pattern`` must match a whole path; a list
combines them. Every pattern must match at least one ``nn.Linear``.

Nothing is changed on failure: the layer type, its options, every target and every new
layer are built and checked before the first swap.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Sequence

from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import TRAINABLE, StructuredLinear
from rankwise.layers.spec import is_registered
from rankwise.modules import replace_module

Targets = str | re.Pattern | Sequence[str | re.Pattern] | None


def _matches(pattern: str | re.Pattern, path: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(path) is not None
    parts = path.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(s, pattern) for s in suffixes)
    return pattern in suffixes


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return None if get is None else get()
    except (NotImplementedError, AttributeError):
        return None


def linear_targets(model: nn.Module, targets: Targets = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` that ``targets`` selects, by path.

    A pattern that matches nothing raises a :class:`~rankwise.errors.ConfigError` with close
    names and the linear module names the model has.
    """
    structured = [p for p, m in model.named_modules() if isinstance(m, StructuredLinear) or is_registered(m)]
    linears = {
        p: m
        for p, m in model.named_modules()
        if type(m) is nn.Linear and p and not any(p.startswith(s + ".") for s in structured)
    }
    if targets is None:
        head = _output_head(model)
        chosen = {p: m for p, m in linears.items() if m is not head}
        if not chosen:
            raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to convert (besides an output head)")
        return chosen
    patterns = [targets] if isinstance(targets, (str, re.Pattern)) else list(targets)
    if not patterns:
        raise ConfigError("targets is empty; give module names, globs or regexes, or None for every linear layer")
    chosen: dict[str, nn.Linear] = {}
    for pattern in patterns:
        if not isinstance(pattern, (str, re.Pattern)):
            raise ConfigError(f"target {pattern!r} must be a str or re.Pattern")
        hits = {p: m for p, m in linears.items() if _matches(pattern, p)}
        if not hits:
            shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
            leaves = sorted({p.rsplit(".", 1)[-1] for p in linears})
            close = difflib.get_close_matches(shown, leaves + list(linears), n=5, cutoff=0.5)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"target {shown!r} matched no nn.Linear module{hint} (linear module names: {leaves[:20]})")
        chosen.update(hits)
    return chosen


def layer_type(name: str) -> type[StructuredLinear]:
    """The registered layer type ``name``; a ConfigError listing the valid names if unknown."""
    if not isinstance(name, str):
        raise ConfigError(f"layer type must be a name (one of {', '.join(TRAINABLE.names())}); got {name!r}")
    return TRAINABLE.get(name)


def check_options(cls: type[StructuredLinear], options: dict) -> None:
    """A ConfigError naming the misspelled options of ``cls`` and listing its valid ones."""
    valid = cls.option_names()
    bad = sorted(set(options) - set(valid))
    if bad:
        close = {b: difflib.get_close_matches(b, valid, n=1) for b in bad}
        hint = "".join(f"; did you mean {c[0]!r} for {b!r}?" for b, c in close.items() if c)
        raise ConfigError(
            f"layer type {cls.method!r} has no option(s) {bad}{hint}; its options are: "
            f"{', '.join(valid) or 'none'}"
        )


def _layer_rank(rank: int | None, linear: nn.Linear, path: str, capped: list[str]) -> int | None:
    """``rank``, or the layer's full rank when ``rank`` exceeds it (noted in ``capped``)."""
    full = min(linear.in_features, linear.out_features)
    if isinstance(rank, int) and not isinstance(rank, bool) and rank > full:
        capped.append(f"{path} ({linear.out_features}x{linear.in_features}: {full})")
        return full
    return rank


def convert(
    model: nn.Module, name: str, *, rank: int | None = None, targets: Targets = None,
    **options: object,
) -> dict[str, StructuredLinear]:
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place by ``name`` layers
    (:func:`~rankwise.layers.names` lists them) built with ``from_linear(linear, rank=rank,
    **options)``; returns the new modules by path.

    ``rank``: the rank of each new layer (``None`` for types whose size is set otherwise,
    e.g. ``monarch``'s ``nblocks``, ``welore``'s threshold). A rank above what a layer allows,
    ``min(in, out)``, gives that layer full rank, with one warning listing such layers.
    ``targets``: see the module docstring (``None``: every linear layer but the output head).
    A layer type, option, target or rank that is invalid for any layer raises a
    :class:`~rankwise.errors.ConfigError` before the model is touched.
    """
    cls = layer_type(name)
    check_options(cls, options)
    chosen = linear_targets(model, targets)
    capped: list[str] = []
    new = {
        path: cls.from_linear(linear, rank=_layer_rank(rank, linear, path, capped), **options)
        for path, linear in chosen.items()
    }  # fmt: skip
    if capped:
        more = f" and {len(capped) - 3} more" if len(capped) > 3 else ""
        warnings.warn(
            f"rank={rank} is above the full rank of {len(capped)} layer(s), which get full rank "
            f"instead: {', '.join(capped[:3])}{more}",
            stacklevel=2,
        )
    for path, module in new.items():
        replace_module(model, path, module, expect=nn.Linear)
    return new


__all__ = ["convert", "layer_type", "linear_targets"]
