"""The per-layer SVD path of :func:`rankwise.compress.compress`: decompose every layer, allocate
ranks to a budget, factorise. Whole-model methods that compress some layers per layer (``hybrid``)
run the same path on those layers."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankwise.compress.allocate import LayerSpectrum, allocate_ranks, breakeven_rank
from rankwise.compress.base import CompressionJob, CompressionMethod, Decomposition
from rankwise.compress.calibrate import Calibration, ClosedLoopStats, LayerStats
from rankwise.compress.report import LayerReport
from rankwise.modules import replace_module
from rankwise.progress import Bar


def with_weight(layer: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A stand-in for ``layer`` with ``weight`` (same bias, dtype and device)."""
    if weight is layer.weight:
        return layer
    proxy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    proxy.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=False)
    proxy.bias = layer.bias
    return proxy


class DecompositionStore:
    """The per-layer decompositions kept for factorising, in a temporary folder: written as each
    layer is decomposed, read back (and deleted) one at a time when it is factorised. Each holds
    the factors up to the layer's break-even rank, together about the size of the dense layers
    (0.42 GB in float32 for SmolLM2) — held in memory beside every layer's Gram matrix they were
    the largest part of ``rankwise compress``'s peak. Values are written and read exactly."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="rankwise-decompositions-")
        self._files: dict[str, Path] = {}
        self._stats: dict[str, Path] = {}

    def put(self, name: str, dec: Decomposition) -> None:
        from safetensors.torch import save_file

        path = Path(self._folder.name) / f"{len(self._files)}-factors.safetensors"
        save_file({"U": dec.U.contiguous(), "S": dec.S.contiguous(), "Vh": dec.Vh.contiguous()}, str(path))
        self._files[name] = path

    def pop(self, name: str) -> Decomposition:
        from safetensors.torch import load_file

        path = self._files.pop(name)
        tensors = load_file(str(path))
        path.unlink()
        return Decomposition(tensors["U"], tensors["S"], tensors["Vh"])

    def put_stats(self, name: str, stats: LayerStats) -> None:
        """Park a layer's statistics too (an open-loop walk has moved past its block)."""
        path = Path(self._folder.name) / f"{len(self._files)}-stats.pt"
        torch.save({f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}, path)
        self._stats[name] = path

    def pop_stats(self, name: str) -> LayerStats:
        path = self._stats.pop(name)
        fields = torch.load(path, weights_only=True)
        path.unlink()
        return LayerStats(**fields)

    def close(self) -> None:
        self._folder.cleanup()


def per_layer_svd(
    method: CompressionMethod,
    job: CompressionJob,
    timing: dict[str, float],
    closed: Callable[[], Calibration] | None = None,
    *,
    release: bool = False,
) -> tuple[list[LayerReport], dict[str, LayerSpectrum]]:
    """The SVD path: decompose every layer, allocate ranks to the budget, factorise.

    Replaces layers of ``job.model`` by :class:`LowRankLinear` where that is smaller; records
    the time of each stage in ``timing``. Ranks are always allocated on the spectra of
    ``job.calibration`` (open-loop, or a walk over the dense model: every layer's spectrum is
    needed before any is cut). With ``closed`` (making a
    :func:`~rankwise.compress.calibrate.closed_loop_calibration` walk) each layer is then
    decomposed again on the statistics of the inputs it gets after the blocks before it were
    compressed, and factorised at its allocated rank — with the weight that maps those inputs
    to the dense model's outputs (:meth:`~rankwise.compress.calibrate.LayerStats.target_weight`),
    so each layer also corrects the error of the blocks before it. Returns the report rows and
    the spectra (for the HTML report's plots).

    Memory: open-loop decompositions wait for factorising on disk (:class:`DecompositionStore`);
    with ``release`` (the statistics are this run's own) each layer's statistics are dropped from
    ``job.calibration`` once it is factorised, so the Gram matrices shrink as the factors grow."""
    stats = job.calibration.stats if job.calibration is not None else {}
    decompositions = DecompositionStore() if closed is None else None
    spectra: dict[str, LayerSpectrum] = {}
    try:
        rows = _decompose_allocate_factorise(method, job, timing, closed, stats, decompositions, spectra, release)
    finally:
        if decompositions is not None:
            decompositions.close()
    return rows, spectra


def _decompose_allocate_factorise(
    method: CompressionMethod,
    job: CompressionJob,
    timing: dict[str, float],
    closed: Callable[[], Calibration] | None,
    stats,
    decompositions: DecompositionStore | None,
    spectra: dict[str, LayerSpectrum],
    release: bool,
) -> list[LayerReport]:
    """The three stages of :func:`per_layer_svd` (which owns the decomposition store)."""
    t0 = time.perf_counter()
    spill = closed is None and isinstance(stats, ClosedLoopStats)  # an open-loop walk: read once, in order
    bar = Bar(len(job.layers), f"decompose ({method.name})", show=job.progress)
    try:
        for name, layer in job.layers.items():
            bar.set(layer=name)
            weight = layer.weight.detach().to(torch.float64)
            dec = method.decompose(weight, stats.get(name))
            if closed is None:  # kept for factorising (closed loop decomposes again); a rank at or
                # above break-even leaves the layer dense, so the factors beyond it are never used
                keep = breakeven_rank(layer.out_features, layer.in_features)
                decompositions.put(name, Decomposition(dec.U[:, :keep].float(), dec.S, dec.Vh[:keep].float()))
                if spill:
                    decompositions.put_stats(name, stats[name])
            weight_s = torch.linalg.svdvals(weight) if job.allocation == "welore" else None
            sensitivity = stats[name].sensitivity if name in stats else None
            directional = stats[name].direction_sensitivity(dec.U) if job.allocation == "mfac" else None
            spectra[name] = LayerSpectrum(layer.out_features, layer.in_features, dec.S, weight_s, sensitivity, directional)
            bar.update(1)
    finally:
        bar.close()
    if isinstance(stats, ClosedLoopStats):
        stats.finish()  # frees the walk's activations
    timing["decompose_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ranks = allocate_ranks(spectra, job.budget, strategy=job.allocation)
    timing["allocate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    walk = closed() if closed is not None else None
    rows = []
    bar = Bar(len(job.layers), "factorise" if closed is None else "factorise (closed loop)", show=job.progress)
    try:
        for name, layer in job.layers.items():
            rank, new, error = ranks[name], layer, 0.0
            if rank is not None:
                if walk is None:
                    layer_stats = decompositions.pop_stats(name) if spill else stats.get(name)
                    dec = decompositions.pop(name)
                    new = method.factorize(layer, layer_stats, rank, dec)
                else:
                    layer_stats = walk.stats[name]
                    target = layer_stats.target_weight(layer.weight.detach().to(torch.float64))
                    dec = method.decompose(target, layer_stats)
                    new = method.factorize(with_weight(layer, target), layer_stats, rank, dec)
                replace_module(job.model, name, new, expect=nn.Linear)
                error = math.sqrt(dec.relative_error(rank))
            if release and isinstance(stats, dict):
                stats.pop(name, None)  # its Gram matrix goes once every layer sharing it is done
            after = spectra[name].cost(rank)
            rows.append(LayerReport.of(name, layer, new, rank=rank, parameters_after=after, relative_error=error))
            bar.update(1)
    finally:
        bar.close()
    timing["factorise_s"] = time.perf_counter() - t0
    return rows
