"""Greenformers' Low-Rank Transformer ("Greenformers: Improving Computation and Memory
Efficiency in Transformer Models via Low-Rank Approximation", Winata, 2021).

The Low-Rank Transformer (LRT) factorises the linear layers of every transformer block — the
attention projections (low-rank multi-head attention) and the feed-forward layers (low-rank
feed-forward) — into a linear encoder-decoder ``W ≈ E D`` (``E (out, r)``, ``D (r, in)``),
trained as such. :class:`LowRankTransformerLinear` is that layer (``convert(model,
"greenformers", rank=r)``); :func:`low_rank_transformer` converts the attention and/or
feed-forward layers of a Hugging Face transformer in one call (the output head and the
embeddings stay dense).

Initialisation (``init``): ``"svd"`` (default) starts from the best rank-``r`` approximation of
the pretrained weight (equal to it at full rank ``min(in, out)``); ``"random"`` trains from
scratch as the LRT does, with ``Var((E D)_ij) = 1 / (3 in)``, the variance of ``nn.Linear``'s
default init. Parameters: ``r (in + out)`` (+ ``out`` bias), fewer than ``in · out`` when
``r < in · out / (in + out)``.

Not here: Linformer, which the thesis compares LRT with (low-rank projection of the keys and
values along the sequence, for long inputs), changes the attention computation itself rather
than a linear layer.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.layers.base import register_trainable
from rankwise.layers.convert import convert, linear_targets
from rankwise.layers.lowrank import LowRankLinear, balanced_factors

INITS = ("svd", "random")
PARTS = ("attention", "feed_forward")
ATTENTION_WORDS = ("attn", "attention")  # path components naming an attention block


@register_trainable("greenformers")
class LowRankTransformerLinear(LowRankLinear):
    """LRT's linear encoder-decoder ``y = E (D x) + b`` (``E = U``, ``D = V``)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, init: str = "svd") -> LowRankTransformerLinear:
        """``linear`` factorised at ``rank``: its truncated SVD (``"svd"``) or random (``"random"``)."""
        if init not in INITS:
            raise ConfigError(f"{cls.__name__}: init must be one of {', '.join(INITS)}; got {init!r}")
        cls.check_rank(rank, linear.in_features, linear.out_features)
        layer = cls.shaped_like(linear, rank)
        with torch.no_grad():
            if init == "svd":
                up, down = balanced_factors(linear.weight, rank)
                layer.U.copy_(up)
                layer.V.copy_(down)
            else:
                layer.reset_parameters()
        return layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random ``E ~ U(±√(3/r))`` (variance ``1/r``) and ``D ~ U(±1/√in)`` (variance
        ``1/(3 in)``), so ``Var((E D)_ij) = r · (1/r) · 1/(3 in) = 1/(3 in)``."""
        self.U.uniform_(-math.sqrt(3 / self.rank), math.sqrt(3 / self.rank))
        self.V.uniform_(-1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))


def block_part(path: str) -> str:
    """``"attention"`` when a component of ``path`` names an attention block, else
    ``"feed_forward"``."""
    words = path.lower().split(".")
    return "attention" if any(w in part for part in words for w in ATTENTION_WORDS) else "feed_forward"


def low_rank_transformer(
    model: nn.Module, rank: int, *, parts: tuple[str, ...] = PARTS, init: str = "svd"
) -> dict[str, LowRankTransformerLinear]:
    """Convert the linear layers of ``parts`` (``"attention"``, ``"feed_forward"``) of every
    block of ``model`` to :class:`LowRankTransformerLinear` at ``rank``; returns them by path.

    A linear layer belongs to ``"attention"`` when its path has a component containing
    ``attn`` or ``attention`` (``self_attn.q_proj``, ``attention.self.query``), otherwise to
    ``"feed_forward"``; the output head is never converted.
    """
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"low_rank_transformer: parts must be some of {', '.join(PARTS)}; got {list(parts)}")
    chosen = [path for path in linear_targets(model) if block_part(path) in parts]
    if not chosen:
        raise ConfigError(f"low_rank_transformer: {type(model).__name__} has no linear layer in {list(parts)}")
    exact = [re.compile(re.escape(path)) for path in chosen]
    return convert(model, "greenformers", rank=rank, targets=exact, init=init)


__all__ = ["INITS", "PARTS", "LowRankTransformerLinear", "block_part", "low_rank_transformer"]
