"""LoLDU: the first r terms of the weight's LDU decomposition, training only the diagonal and a scale.

Gaussian elimination with partial pivoting writes ``W = P L D U`` (``L`` unit lower,
``D`` diagonal, ``U`` unit upper). The first ``r`` pivots give ``W_r = (P L_r) D_r U_r``
with ``P L_r`` (out, r) and ``U_r`` (r, in) orthogonal-ish triangular factors. LoLDU keeps
them frozen and trains a diagonal ``z`` (r,) and a scalar ``σ`` that replace ``D_r``::

    W' = W - W_r + (P L_r) diag(σ z) U_r,  i.e.  ΔW = s · (P L_r) diag(σ z - D_r) U_r

``z`` starts at ``D_r`` and ``σ`` at 1, so the model starts unchanged, and the base weight
is never rewritten (the paper's ``W_res + P L diag(σz) U``, without touching ``W``).
``r + 1`` trainable parameters per layer. "LoLDU: Low-Rank Adaptation via
Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning", Shi et al. 2024.

``P L_r``, ``D_r`` and ``U_r`` are buffers saved with the adapter (loading does not
depend on re-running the decomposition).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, LayerView, register_method
from rankwise.adapters.init import float_weight
from rankwise.errors import ModelError


def ldu_head(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P L_r (out, r), D_r (r,), U_r (r, in))`` of ``w = P L D U`` (partial pivoting).

    ModelError if one of the first ``r`` pivots is zero (``w`` has rank below ``r`` there).
    """
    p, lower, upper = torch.linalg.lu(w)  # w = p @ lower @ upper; lower (out, k), upper (k, in)
    d = torch.diagonal(upper)[:rank]
    if bool((d.abs() <= torch.finfo(w.dtype).tiny).any()):
        raise ModelError(f"the weight's first {rank} LU pivots include a zero (rank below {rank})")
    return p @ lower[:, :rank], d, upper[:rank] / d[:, None]


@dataclass(frozen=True)
class LolduConfig(AdapterConfig):
    """LoLDU options: ``rank`` (LDU terms kept), alpha, dropout."""


@register_method("loldu")
class LolduAdapter(Adapter):
    """``ΔW = s · L diag(σ z - D) U``, frozen LDU factors; trains ``z`` (r,) and ``σ`` (1,)."""

    summary = "LoLDU: train the diagonal (and a scale) of the weight's LDU factors (Shi et al. 2024)"
    config_class = LolduConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: Any) -> str | None:
        if layer.is_quantized:
            return f"loldu needs the base weight's LDU decomposition, but it is {layer.weight.dtype}"
        return super().check_layer(layer, config)

    def build(self) -> None:
        r, out, inp = self.config.rank, self.layer.out_features, self.layer.in_features
        dev, dt = self.layer.device, self.param_dtype
        self.register_buffer("loldu_L", torch.zeros(out, r, device=dev, dtype=dt))
        self.register_buffer("loldu_U", torch.zeros(r, inp, device=dev, dtype=dt))
        self.register_buffer("loldu_D", torch.zeros(r, device=dev, dtype=dt))
        self.loldu_diag = nn.Parameter(torch.zeros(r, device=dev, dtype=dt))
        self.loldu_scale = nn.Parameter(torch.ones(1, device=dev, dtype=dt))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.loldu_scale.fill_(1.0)
            if self.loldu_L.is_meta:  # a shape-only probe (dry run, load validation)
                return
            lower, d, upper = ldu_head(float_weight(self, "loldu"), self.config.rank)
            self.loldu_L.copy_(lower)
            self.loldu_D.copy_(d)
            self.loldu_U.copy_(upper)
            self.loldu_diag.copy_(d)

    def inner(self) -> torch.Tensor:
        """``diag(σ z - D) U`` (r, in)."""
        return (self.loldu_scale * self.loldu_diag - self.loldu_D)[:, None] * self.loldu_U

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        h = self.layer.project_in(x, self.inner())
        return self.layer.project_out(h, self.loldu_L) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        h = self.layer.project_in(x, self.inner())
        return self.layer.add_projected(y, h, self.loldu_L, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.loldu_L.float() @ self.inner().float()) * self.scaling
