"""``compress(...)``: the whole pipeline in one call (what ``rankwise compress`` runs).

load → check the target and the output folder → measure the dense model → calibrate →
decompose every linear layer → allocate ranks to the budget → factorise → measure again →
save (safetensors + config + marker + ``report.json`` + ``report.html``).

The target counts **all distinct model parameters** (embeddings included, tied weights
once; quantized and indexed layers as their storage, :func:`rankwise.models.count_parameters`):
``ratio=0.8`` means the compressed model has 80% of the dense model's parameters, or
``size="200MB"`` means the weights file, safetensors header included, holds at most that many
bytes. Only linear layers outside the embeddings are compressed, so the rest is a fixed cost
inside the target.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.compress.allocate import (
    LayerSpectrum,
    allocate_ranks,
    minimum_parameters,
)
from rankwise.compress.base import CompressionJob, CompressionMethod, Decomposition, get_method
from rankwise.compress.calibrate import Calibration, calibrate, calibration_blocks, linear_layers
from rankwise.compress.checkpoint import save_compressed, weights_header_bound
from rankwise.compress.report import LayerReport
from rankwise.errors import ConfigError, DataError, ModelError
from rankwise.fileio import check_output_dir
from rankwise.models import check_seq_len, count_parameters
from rankwise.modules import replace_module
from rankwise.progress import Bar, stage

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes in ``"200MB"``, ``"1.5GB"``, ``"300MiB"`` or a plain integer (decimal units: MB = 10⁶)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?i?[bB]?)\s*", str(size))
        unit = m.group(2).upper() if m else ""
        if unit and not unit.endswith("B"):
            unit += "B"
        if not m or unit not in _UNITS:
            raise ConfigError(f"size {size!r} is not a size; write e.g. 200MB, 1.5GB or 300MiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size must be positive; got {size!r}")
    return value


@dataclass
class CompressionResult:
    """The compressed model (low-rank modules in place), its tokenizer, the report, the folder."""

    model: nn.Module
    tokenizer: object
    report: dict
    path: Path | None


@torch.no_grad()
def decode_speed(model: nn.Module, tokenizer, *, new_tokens: int = 64, repeats: int = 3, prompt: str | None = None) -> float:
    """Greedy-decoding speed (new tokens per second, KV cache on, batch 1), median of ``repeats``."""
    text = prompt or "The Python standard library provides"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True, "pad_token_id": pad}
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def check_causal_lm(model: nn.Module, name: str) -> None:
    """Refuse a model that is not a causal language model (compress calibrates and scores
    with the next-token loss), naming what it is."""
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise ModelError(
            f"compress needs a causal language model (e.g. smollm2, tiny-llama or a *ForCausalLM "
            f"folder); {name!r} is a {type(model).__name__}"
        )


def _target_parameters(
    total: int, ratio: float | None, size: str | int | None, bytes_per_param: int, header_bytes: int = 0
) -> tuple[int, dict]:
    """Parameters the compressed model may hold; ``size`` caps the file, so the safetensors
    header (``header_bytes``, a bound) comes off it first."""
    if ratio is not None and size is not None:
        raise ConfigError("give either ratio (--ratio) or size (--size), not both")
    if size is not None:
        size_bytes = parse_size(size)
        info = {"size_bytes": size_bytes, "bytes_per_parameter": bytes_per_param, "header_bytes_bound": header_bytes}
        return max(0, size_bytes - header_bytes) // bytes_per_param, info
    ratio = 0.8 if ratio is None else ratio
    if not (isinstance(ratio, int | float) and 0.0 < ratio <= 1.0):
        raise ConfigError(f"ratio must be in (0, 1] (the fraction of parameters kept); got {ratio!r}")
    return math.floor(ratio * total), {"ratio": ratio}


def _per_layer_svd(
    method: CompressionMethod, job: CompressionJob, timing: dict[str, float]
) -> tuple[list[LayerReport], dict[str, LayerSpectrum]]:
    """The SVD path: decompose every layer, allocate ranks to the budget, factorise.

    Replaces layers of ``job.model`` by :class:`LowRankLinear` where that is smaller; records
    the time of each stage in ``timing``. Returns the report rows and the spectra (for the
    HTML report's plots)."""
    t0 = time.perf_counter()
    stats = job.calibration.stats if job.calibration is not None else {}
    decompositions: dict[str, Decomposition] = {}
    spectra: dict[str, LayerSpectrum] = {}
    bar = Bar(len(job.layers), f"decompose ({method.name})", show=job.progress)
    try:
        for name, layer in job.layers.items():
            bar.set(layer=name)
            weight = layer.weight.detach().to(torch.float64)
            dec = method.decompose(weight, stats.get(name))
            decompositions[name] = Decomposition(dec.U.float(), dec.S, dec.Vh.float())
            weight_s = torch.linalg.svdvals(weight) if job.allocation == "welore" else None
            sensitivity = stats[name].sensitivity if name in stats else None
            directional = stats[name].direction_sensitivity(dec.U) if job.allocation == "mfac" else None
            spectra[name] = LayerSpectrum(layer.out_features, layer.in_features, dec.S, weight_s, sensitivity, directional)
            bar.update(1)
    finally:
        bar.close()
    timing["decompose_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ranks = allocate_ranks(spectra, job.budget, strategy=job.allocation)
    timing["allocate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = []
    bar = Bar(len(job.layers), "factorise", show=job.progress)
    try:
        for name, layer in job.layers.items():
            rank, dec, new = ranks[name], decompositions.pop(name), layer
            if rank is not None:
                new = method.factorize(layer, stats.get(name), rank, dec)
                replace_module(job.model, name, new, expect=nn.Linear)
            error = 0.0 if rank is None else math.sqrt(dec.relative_error(rank))
            after = spectra[name].cost(rank)
            rows.append(LayerReport.of(name, layer, new, rank=rank, parameters_after=after, relative_error=error))
            bar.update(1)
    finally:
        bar.close()
    timing["factorise_s"] = time.perf_counter() - t0
    return rows, spectra


def compress(
    model: str | os.PathLike | nn.Module = "smollm2",
    *,
    tokenizer=None,
    method: str = "svdllm",
    method_options: dict | None = None,
    ratio: float | None = None,
    size: str | int | None = None,
    allocation: str = "auto",
    data: str | os.PathLike | Sequence[str] = "builtin",
    calib_tokens: int = 16384,
    seq_len: int = 512,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    evaluate: bool = True,
    eval_tokens: int = 8192,
    measure_speed: bool = True,
    decode_tokens: int = 64,
    calibration: Calibration | None = None,
    report_html: bool = True,
    progress: bool = False,
) -> CompressionResult:
    """Compress ``model`` to ``ratio`` of its parameters (or ``size`` bytes) with ``method``.

    ``model``: a name or folder for :func:`rankwise.load_model`, or a module (modified in
    place; pass ``tokenizer`` too). ``data``: ``"builtin"``, a text file/folder (its
    calibration split calibrates, its validation split evaluates) or a list of strings
    (used for both). ``allocation``: ``"auto"`` (the method's own default: ``fisher`` for the
    per-layer SVD methods), or one of the allocations the method supports — ``fisher``,
    ``uniform``, ``energy``, ``welore``, ``global`` for SVD methods (see
    :mod:`rankwise.compress.allocate`); a method that cannot honour it raises ConfigError.
    ``model`` must be a causal LM (ModelError otherwise, before any calibration); ``out`` is
    checked (:func:`rankwise.fileio.check_output_dir`) before anything is loaded.
    ``calibration``: statistics from :func:`~rankwise.compress.calibrate.calibrate` on this
    model, reused instead of calibrating again (benchmarks comparing methods).
    Returns a :class:`CompressionResult`; with ``out`` the folder is written atomically.
    """
    from rankwise.data import load_corpus, perplexity

    t_start = time.perf_counter()
    chosen = get_method(method, **(method_options or {}))
    allocation = chosen.resolve_allocation(allocation)
    if min(calib_tokens, eval_tokens, decode_tokens) < 1:
        raise ConfigError(
            f"calib_tokens, eval_tokens and decode_tokens must be positive; got {calib_tokens}, {eval_tokens}, {decode_tokens}"
        )
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    _target_parameters(1, ratio, size, 4)  # validates ratio / size before anything is loaded
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ConfigError("pass tokenizer= together with a model object")
        net, model_name = model, type(model).__name__
    else:
        from rankwise.models import load_model

        with stage(f"load {model}", show=progress):
            net, tokenizer = load_model(model)
        model_name = str(model)
    check_causal_lm(net, model_name)
    check_seq_len(net, seq_len)
    layers = linear_layers(net)
    total = count_parameters(net)
    bytes_per_param = next(net.parameters()).element_size()
    header = weights_header_bound(net, layers, parse_size(size), chosen.layer_tensors) if size is not None else 0
    target, target_info = _target_parameters(total, ratio, size, bytes_per_param, header)
    dense_weights = sum(m.weight.numel() for m in layers.values())
    fixed = total - dense_weights
    shapes = {n: LayerSpectrum(m.out_features, m.in_features, torch.ones(1)) for n, m in layers.items()}
    floor = fixed + minimum_parameters(shapes)
    if target < floor:
        what = f"size={size!r}" if size is not None else f"ratio={target_info['ratio']}"
        raise ConfigError(
            f"{what} asks for {target:,} parameters, below the smallest this model allows "
            f"({floor:,}: {fixed:,} embedding/norm/other parameters stay, every linear layer at rank 1); "
            "raise --ratio or --size"
        )

    if isinstance(data, str | os.PathLike):
        corpus = load_corpus(data)
        calib_texts, eval_texts, fingerprint = corpus.calibration, corpus.validation, corpus.fingerprint()
    else:
        calib_texts = eval_texts = [t for t in data if t.strip()]
        fingerprint = None
        if not calib_texts:
            raise DataError("data is an empty list of texts; pass some text to calibrate on")
    needs = sorted(chosen.statistics(allocation))
    if needs and calibration is None:
        calibration_blocks(tokenizer, calib_texts, calib_tokens, seq_len)  # fail before the slow part

    report: dict = {
        "model": model_name,
        "method": chosen.name,
        "method_options": chosen.options(),
        "allocation": allocation,
        "target": {
            **target_info,
            "parameters": target,
            "counts": "all distinct model parameters (embeddings included, tied weights once)",
        },
    }
    eval_kwargs = {"seq_len": seq_len, "max_tokens": eval_tokens}
    if evaluate:
        before = perplexity(net, tokenizer, eval_texts, **eval_kwargs, progress=progress)
    speed_before = decode_speed(net, tokenizer, new_tokens=decode_tokens) if measure_speed else None

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if calibration is not None:
        missing = sorted(set(needs) - set(calibration.collected))
        if missing or set(calibration.stats) != set(layers):
            raise ConfigError(
                f"the given calibration lacks {missing or 'some of these layers'}; "
                f"calibrate with statistics={needs} on this model"
            )
    elif needs:
        calibration = calibrate(
            net,
            tokenizer,
            calib_texts,
            tokens=calib_tokens,
            seq_len=seq_len,
            statistics=needs,
            layers=layers,
            progress=progress,
        )
    timing["calibrate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    job = CompressionJob(net, layers, calibration, target - fixed, allocation, progress)
    rows, spectra = chosen.compress_model(job), {}
    if rows is not None:  # a whole-model method (layers.py types) did everything itself
        timing["factorise_s"] = time.perf_counter() - t0
    else:
        rows, spectra = _per_layer_svd(chosen, job, timing)
    timing["compress_s"] = sum(timing.values())
    calibration_info = None
    if calibration is not None:
        calibration_info = calibration.recipe() | {"split": "calibration", "corpus_fingerprint": fingerprint}
    del calibration

    after_total = count_parameters(net)
    report["parameters"] = {
        "before": total,
        "after": after_total,
        "kept_fraction": after_total / total,
        "removed": total - after_total,
        "removed_fraction": 1 - after_total / total,
        "never_compressed": fixed,
        "bytes_per_parameter": bytes_per_param,
        "counts": "storage: nn.Parameter elements, quantized/indexed layers as their bits (rankwise.models.count_parameters)",
        "compressed_layers": sum(not r.dense for r in rows),
        "dense_layers": sum(r.dense for r in rows),
    }
    if evaluate:
        after = perplexity(net, tokenizer, eval_texts, **eval_kwargs, progress=progress)
        report["perplexity"] = {
            "before": before.perplexity,
            "after": after.perplexity,
            "recipe": before.recipe() | {"max_tokens": eval_tokens, "split": "validation", "batch_size": 4},
            "corpus_fingerprint": fingerprint,
        }
    if measure_speed:
        speed_after = decode_speed(net, tokenizer, new_tokens=decode_tokens)
        report["decode"] = {
            "new_tokens": decode_tokens,
            "batch": 1,
            "greedy_kv_cache": True,
            "before_tokens_per_s": speed_before,
            "after_tokens_per_s": speed_after,
            "speedup": speed_after / speed_before,
        }
    report["calibration"] = calibration_info
    report["timing"] = {k: round(v, 3) for k, v in timing.items()}
    report["layers"] = [r.to_dict() for r in rows]

    path = None
    if out is not None:
        t0 = time.perf_counter()

        def write_reports(folder: Path) -> None:
            from rankwise.compress.report import write_report

            report["file_bytes"] = (folder / "model.safetensors").stat().st_size
            report["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)
            write_report(report, folder, spectra=spectra if report_html else None, html=report_html)

        with stage(f"save {out}", show=progress):
            path = save_compressed(
                net, tokenizer, out, method=chosen.name, method_options=chosen.options(), overwrite=overwrite, extra=write_reports
            )
    else:
        report["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)
    return CompressionResult(model=net, tokenizer=tokenizer, report=report, path=path)


__all__ = ["compress", "CompressionResult", "check_causal_lm", "decode_speed", "parse_size"]
