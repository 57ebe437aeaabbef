"""``modegpt-svdllm``: MoDeGPT on the attention, SVD-LLM on the MLP — one recipe.

MoDeGPT (``modegpt.py``) shrinks attention head dimensions in whole module pairs (V/O by a
whitened SVD per KV group, Q/K in whole rotary pairs); SVD-LLM (``svdllm.py``) gives every other
layer a whitened low-rank factorisation with the rank the allocator chooses. This method applies
each where it is used: first ``modegpt`` with ``parts=("vo", "qk")`` on the attention, to a
budget of ``attention_keep`` of the attention weights (``0``: the fraction the whole target
keeps of the compressible layers), then ``svdllm`` on the layers it left dense (the MLPs) with
the rest of the budget, ranks by ``--allocate`` (``fisher`` by default) across those layers.

Both halves run through the methods' own public code (``MoDeGPT.compress_model``,
``SVDLLM.decompose`` / ``factorize``, :func:`~rankwise.compress.allocate.allocate_ranks`), on one
open-loop calibration; closed-loop calibration is not offered (the MLP ranks are allocated on
every layer's spectrum at once).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress.allocate import STRATEGIES, LayerSpectrum, allocate_ranks, minimum_parameters
from rankwise.compress.base import CompressionJob, CompressionMethod, register_method
from rankwise.compress.methods.modegpt import MoDeGPT
from rankwise.compress.methods.svdllm import SVDLLM
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError
from rankwise.modules import replace_module
from rankwise.progress import Bar


@register_method
@dataclass(frozen=True)
class ModegptSvdllm(CompressionMethod):
    """MoDeGPT's V/O + Q/K head-dimension compression on attention, SVD-LLM low rank on the rest."""

    attention_keep: float = 0.0
    damp: float = 1e-4

    name = "modegpt-svdllm"
    summary = "MoDeGPT on attention (head dims) + SVD-LLM low rank on the MLP, one budget"
    needs = frozenset({"gram"})
    allocations = tuple(s for s in STRATEGIES if s != "mfac")  # mfac needs per-direction statistics
    layer_tensors = ("U", "V", "weight", "index")

    def __post_init__(self) -> None:
        if not 0.0 <= self.attention_keep <= 1.0:
            raise ConfigError(
                "modegpt-svdllm attention_keep must be in [0, 1] (the fraction of attention "
                f"weights kept; 0 = the target's own fraction); got {self.attention_keep}"
            )
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"modegpt-svdllm damp must be in (0, 1); got {self.damp}")

    def compress_model(self, job: CompressionJob) -> list[LayerReport]:
        calibration = self.require(job.calibration)
        attention = {n for n in job.layers if ".self_attn." in f".{n}"}
        dense = {n: m.weight.numel() for n, m in job.layers.items()}
        keep = self.attention_keep or job.budget / sum(dense.values())
        attention_budget = math.floor(keep * sum(dense[n] for n in attention))
        others = sum(w for n, w in dense.items() if n not in attention)
        head_dims = MoDeGPT(parts=("vo", "qk"), damp=self.damp)
        rows = head_dims.compress_model(dataclasses.replace(job, budget=others + attention_budget))
        heads = {r.name: r for r in rows if r.name in attention}  # the MLP rows: untouched by it
        rest = {n: m for n, m in job.layers.items() if n not in attention}
        budget = job.budget - sum(r.parameters_after for r in heads.values())
        by_name = heads | {r.name: r for r in self._low_rank(job, calibration.stats, rest, budget)}
        return [by_name[n] for n in job.layers]  # in the model's layer order

    def _low_rank(self, job: CompressionJob, stats, layers: dict[str, nn.Linear], budget: int) -> list[LayerReport]:
        """SVD-LLM on ``layers`` with ``budget`` weight parameters, ranks by ``job.allocation``."""
        low_rank = SVDLLM(damp=self.damp)
        decompositions, spectra = {}, {}
        bar = Bar(len(layers), "modegpt-svdllm: decompose (svdllm)", show=job.progress)
        for name, layer in layers.items():
            dec = low_rank.decompose(layer.weight.detach().to(torch.float64), stats[name])
            decompositions[name] = dec
            spectra[name] = LayerSpectrum(layer.out_features, layer.in_features, dec.S, sensitivity=stats[name].sensitivity)
            bar.update(1)
        bar.close()
        if budget < minimum_parameters(spectra):
            raise ConfigError(
                f"modegpt-svdllm: after the attention, {budget:,} parameters are left for the other layers, "
                f"below their minimum ({minimum_parameters(spectra):,}); lower -o attention_keep or raise --ratio"
            )
        ranks = allocate_ranks(spectra, budget, strategy=job.allocation)
        rows = []
        for name, layer in layers.items():
            rank, new, error = ranks[name], layer, 0.0
            if rank is not None:
                dec = decompositions.pop(name)
                new = low_rank.factorize(layer, stats[name], rank, dec)
                replace_module(job.model, name, new, expect=nn.Linear)
                error = math.sqrt(dec.relative_error(rank))
            rows.append(LayerReport.of(name, layer, new, rank=rank, parameters_after=spectra[name].cost(rank), relative_error=error))
        return rows
