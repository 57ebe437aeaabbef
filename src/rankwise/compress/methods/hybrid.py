"""``hybrid``: MoDeGPT's Nyström on the MLP, SVD-LLM's whitened truncation on attention.

Not one paper's method but two of them, each on the module type where it lost least on
SmolLM2-135M. MoDeGPT's type-I step (:func:`~rankwise.compress.methods.modegpt.nystrom_mlp`)
keeps the MLP intermediate channels with the largest ridge leverage and rebuilds ``down_proj``
from them; its attention steps (CR selection of rotary pairs for QK, the stacked SVD for VO)
were where it lost most. SVD-LLM factorises each attention projection with the data-whitened
SVD instead (:class:`~rankwise.compress.methods.svdllm.SVDLLM`), ranks allocated across the
attention layers by the run's allocation (``fisher`` by default). Both read the same one
open-loop calibration (input Gram matrices; output gradients for the allocation).

Budget: the removed parameters (dense layers minus the budget) are split between the MLP
(MoDeGPT's one keep fraction plus its greedy fill) and attention. By default (``mlp_share=None``)
attention loses :data:`ATTENTION_EXCESS` times the fraction all the layers lose, but at most
:data:`ATTENTION_CAP` of its weights; the MLP loses the rest. That rule is fitted to a grid of
shares on SmolLM2-135M (docs/compress.md, "hybrid"): at 80% kept the best share had attention
lose 1.4x the layers' fraction, at 60% every share that took more than half of attention was
far worse. The fisher-weighted error estimate (what the ``fisher`` allocation compares within
one module type) was tried as the split criterion and rejected: it put 90% of the cut on the
MLP, measured worse than the rule. ``mlp_share`` in [0, 1] sets the MLP's share of the removed
parameters directly.
Decoder blocks must be Llama-style (``mlp.{gate,up,down}_proj``, ``self_attn.{q,k,v,o}_proj``):
a ModelError otherwise, as for ``modegpt``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rankwise.compress.allocate import STRATEGIES, layer_parameters
from rankwise.compress.base import CompressionJob, CompressionMethod, register_method
from rankwise.compress.methods.modegpt import MoDeGPT, block_parts
from rankwise.compress.methods.svdllm import SVDLLM
from rankwise.compress.per_layer import per_layer_svd
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_EXCESS = 1.4  # attention loses this times the fraction all the layers lose ...
ATTENTION_CAP = 0.5  # ... but at most this fraction of its weights


@register_method
@dataclass(frozen=True)
class Hybrid(CompressionMethod):
    """MoDeGPT's MLP Nyström + SVD-LLM on attention, ``mlp_share`` of the cut from the MLP."""

    mlp_share: float | None = None
    ridge: float = 1.0
    damp: float = 1e-4

    name = "hybrid"
    summary = "MoDeGPT's Nystrom on MLP channels + SVD-LLM on attention (both 2024)"
    needs = frozenset({"gram"})
    allocations = STRATEGIES  # how attention ranks are allocated (the MLP: one keep fraction)
    layer_tensors = ("weight", "index", "U", "V")

    def __post_init__(self) -> None:
        if self.mlp_share is not None and not (isinstance(self.mlp_share, int | float) and 0.0 <= self.mlp_share <= 1.0):
            raise ConfigError(
                f"hybrid mlp_share (the share of removed parameters taken from the MLP) must be in [0, 1], "
                f"or None for the default split (attention loses {ATTENTION_EXCESS}x the layers' fraction, at most "
                f"{ATTENTION_CAP:.0%}); got {self.mlp_share!r}"
            )
        self._mlp_method(), self._attention_method()  # their own checks of ridge / damp

    def _mlp_method(self) -> MoDeGPT:
        return MoDeGPT(parts=("mlp",), ridge=self.ridge, damp=self.damp)

    def _attention_method(self) -> SVDLLM:
        return SVDLLM(damp=self.damp)

    def compress_model(self, job: CompressionJob) -> list[LayerReport]:
        calibration = self.require(job.calibration)
        blocks = block_parts(job.model, job.layers)
        attention = {b["names"][p]: job.layers[b["names"][p]] for b in blocks for p in ATTENTION}
        dense = sum(m.weight.numel() for m in job.layers.values())
        removed = max(0, dense - job.budget)
        attention_dense = sum(m.weight.numel() for m in attention.values())
        attention_floor = sum(layer_parameters(m.out_features, m.in_features, 1) for m in attention.values())
        if self.mlp_share is None:
            fraction = min(ATTENTION_EXCESS * removed / dense, ATTENTION_CAP)
            attention_cut = min(round(fraction * attention_dense), removed)
        else:
            attention_cut = round((1.0 - self.mlp_share) * removed)
        attention_cut = min(attention_cut, attention_dense - attention_floor)
        rows = {r.name: r for r in self._mlp_method().compress_model(dataclasses.replace(job, budget=job.budget + attention_cut))}
        if attention_cut > 0:
            part = CompressionJob(job.model, attention, calibration, attention_dense - attention_cut, job.allocation, job.progress)
            svd_rows, _ = per_layer_svd(self._attention_method(), part, {})
            rows |= {r.name: r for r in svd_rows}
        return [rows[name] for name in job.layers if name in rows]
