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

import dataclasses
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.compress.allocate import (
    LayerSpectrum,
    minimum_parameters,
)
from rankwise.compress.base import CompressionJob, CompressionMethod, get_method
from rankwise.compress.calibrate import (
    CALIBRATION_MODES,
    INPUT_STATISTICS,
    Calibration,
    blocks_hold_every_layer,
    calibrate,
    calibration_blocks,
    closed_loop_calibration,
    decoder_blocks,
    linear_layers,
    release_memory,
)
from rankwise.compress.checkpoint import map_weights, save_compressed, weights_header_bound
from rankwise.compress.heal import (
    DEFAULT_LOSS,
    DEFAULT_LR,
    HealResult,
    TeacherTargets,
    check_heal_loss,
    check_heal_precision,
    check_heal_steps,
    heal,
    heal_blocks,
    healable_parameters,
    teacher_targets,
)
from rankwise.compress.per_layer import per_layer_svd
from rankwise.data import HELDOUT, texts_fingerprint
from rankwise.errors import ConfigError, DataError, ModelError
from rankwise.fileio import check_output_dir
from rankwise.models import check_seq_len, count_parameters
from rankwise.modules import replace_module
from rankwise.progress import stage

DECODE_PROMPT = "The Python standard library provides"
DEFAULT_CALIBRATION = "open-loop"  # what "auto" means: closed loop did not win on SmolLM2 (docs/compress.md)
# Gradient statistics (the fisher allocation's one number per layer) on this many of the
# calibration tokens: the backward pass was the slowest part of `rankwise compress` (docs/compress.md).
GRADIENT_TOKENS = 4096
HEAL_SEQ_LEN, HEAL_BATCH = 256, 4  # healing sequences: shorter than evaluation's, as in heal.py
CORRECT_OUTPUTS = False  # fit the dense outputs from the actual inputs: 5.7x vs 1.8x dense on SmolLM2, off
EVAL_BATCH = 1  # sequences per perplexity batch: (batch, seq_len, vocab) logits are the peak
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


def _decode_run(model: nn.Module, tokenizer, new_tokens: int, prompt: str | None = None):
    """A zero-argument function that greedily decodes ``new_tokens`` (KV cache on, batch 1)."""
    ids = tokenizer(prompt or DECODE_PROMPT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True, "pad_token_id": pad}

    @torch.no_grad()
    def run() -> None:
        model.generate(ids, **kwargs)

    return run


def decode_speed(model: nn.Module, tokenizer, *, new_tokens: int = 64, repeats: int = 3, prompt: str | None = None) -> float:
    """Greedy-decoding speed (new tokens per second, KV cache on, batch 1), median of ``repeats``."""
    run = _decode_run(model, tokenizer, new_tokens, prompt)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def decode_speeds_interleaved(
    model: nn.Module,
    tokenizer,
    dense: dict[str, nn.Module],
    *,
    new_tokens: int = 64,
    repeats: int = 3,
) -> tuple[float, float]:
    """``(dense, compressed)`` greedy-decoding speeds in new tokens/s, timed interleaved.

    ``model`` is the compressed model; ``dense`` maps the path of every replaced module to the
    dense module it replaced. The dense modules are swapped in and out around each timing
    (a pointer swap, no copy), one warm-up each, then ``repeats`` rounds of dense, compressed;
    the median of each — so load from other processes hits both alike (a shared machine made
    one before/after pair minutes apart print a 12x speed-up).
    """
    compressed = {name: model.get_submodule(name) for name in dense}

    def put(modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            replace_module(model, name, module)

    run = _decode_run(model, tokenizer, new_tokens)
    times: dict[str, list[float]] = {"dense": [], "compressed": []}
    try:
        for round_ in range(repeats + 1):
            for kind, modules in (("dense", dense), ("compressed", compressed)):
                put(modules)
                t0 = time.perf_counter()
                run()
                if round_:  # round 0 warms both up
                    times[kind].append(time.perf_counter() - t0)
    finally:
        put(compressed)
    return new_tokens / statistics.median(times["dense"]), new_tokens / statistics.median(times["compressed"])


def peak_memory_bytes() -> int:
    """This process's resident-memory high-water mark (``ru_maxrss``), in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


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


def _check_device(device: str) -> torch.device:
    """``device`` as a torch.device this machine has; ConfigError naming the option otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device!r}: this machine has no such CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


def _resolve_mode(mode: str, method: CompressionMethod) -> str:
    """``"auto"`` → closed-loop where the method supports it (:data:`DEFAULT_CALIBRATION`), else
    open-loop; an explicit ``"closed-loop"`` the method cannot honour is a ConfigError."""
    if mode not in ("auto", *CALIBRATION_MODES):
        raise ConfigError(f"calibration must be auto, open-loop or closed-loop; got {mode!r}")
    supported = method.supports_closed_loop()
    if mode == "auto":
        return DEFAULT_CALIBRATION if supported else "open-loop"
    if mode == "closed-loop" and not supported:
        raise ConfigError(
            f"method {method.name!r} cannot calibrate closed-loop (it has no input statistics to refresh, "
            "or it reads every layer's statistics at once); use --calibration open-loop"
        )
    return mode


def _corpus(data, corpus_loader):
    """``data`` as a :class:`~rankwise.data.Corpus`, or ``(texts, None)`` for a list of strings
    (used for every split)."""
    from rankwise.data import Corpus

    if isinstance(data, Corpus):
        return data
    if isinstance(data, str | os.PathLike):
        return corpus_loader(data)
    texts = [t for t in data if t.strip()]
    if not texts:
        raise DataError("data is an empty list of texts; pass some text to calibrate on")
    return Corpus(name="texts", train=texts, validation=texts, calibration=texts)


def _heal(model: nn.Module, blocks: torch.Tensor, steps: int, lr: float, progress: bool, out,
          teacher: TeacherTargets | None, precision: str) -> HealResult:
    """Heal ``model`` in place; if interrupted, put the compressed factors back as they were
    before healing, so the caller (or the user) still has the compressed model intact."""
    params = healable_parameters(model)
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        return heal(model, blocks, steps=steps, lr=lr, batch_size=HEAL_BATCH, progress=progress, teacher=teacher,
                    precision=precision)
    except KeyboardInterrupt:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        where = f" (nothing was written to {out})" if out is not None else ""
        raise KeyboardInterrupt(
            f"healing interrupted; the compressed model in memory is restored to its state before healing{where}. "
            "Run again with fewer --heal-steps, or with --heal-steps 0 and then `rankwise heal --model OUT --out OUT --overwrite`"
        ) from None


def _replaced(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, nn.Module]:
    """``{path: dense module}`` for every layer of ``layers`` no longer in ``model``."""
    return {n: m for n, m in layers.items() if model.get_submodule(n) is not m}


def compress(
    model: str | os.PathLike | nn.Module = "smollm2",
    *,
    tokenizer=None,
    method: str = "svdllm",
    method_options: dict | None = None,
    ratio: float | None = None,
    size: str | int | None = None,
    allocation: str = "auto",
    calibration: str = "auto",
    data: str | os.PathLike | Sequence[str] = "builtin",
    calib_tokens: int = 16384,
    gradient_tokens: int | None = GRADIENT_TOKENS,
    seq_len: int = 512,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    evaluate: bool = True,
    heldout: bool = True,
    eval_tokens: int = 8192,
    measure_speed: bool = True,
    decode_tokens: int = 64,
    heal_steps: int = 0,
    heal_lr: float = DEFAULT_LR,
    heal_loss: str = DEFAULT_LOSS,
    heal_precision: str = "auto",
    memory_map: bool = True,
    device: str | None = None,
    statistics: Calibration | None = None,
    report_html: bool = True,
    progress: bool = False,
) -> CompressionResult:
    """Compress ``model`` to ``ratio`` of its parameters (or ``size`` bytes) with ``method``.

    ``model``: a name or folder for :func:`rankwise.load_model`, or a module (modified in
    place; pass ``tokenizer`` too). ``data``: ``"builtin"``, a text file/folder, a
    :class:`~rankwise.data.Corpus` (e.g. ``load_corpus(["builtin", "notes/"])``, a mix) — its
    calibration split calibrates, its validation split evaluates — or a list of strings (used
    for both). ``allocation``: ``"auto"`` (the method's own default: ``fisher`` for the
    per-layer SVD methods), or one of the allocations the method supports — ``fisher``,
    ``uniform``, ``energy``, ``welore``, ``global`` for SVD methods (see
    :mod:`rankwise.compress.allocate`); a method that cannot honour it raises ConfigError.
    ``calibration``: ``"closed-loop"`` calibrates block by block on the outputs of the blocks
    already compressed (:func:`~rankwise.compress.calibrate.closed_loop_calibration`),
    ``"open-loop"`` every layer on the dense model's activations, ``"auto"``
    :data:`DEFAULT_CALIBRATION` where the method supports it (open-loop: measured better). ``evaluate``: perplexity before/after on the validation split and,
    with ``heldout``, on the held-out corpus (:func:`rankwise.data.heldout_texts`, never
    calibrated on); ``measure_speed``: dense and compressed decoding timed interleaved.
    ``heal_steps``: after compressing, train the compressed factors that many AdamW steps
    (learning rate ``heal_lr``) on ``data``'s train split (:func:`~rankwise.compress.heal.heal`;
    size unchanged); perplexities are then reported before / after / healed. ``heal_loss``:
    ``"distill"`` (default) trains towards the dense model's next-token distribution on those
    tokens (its top-64 probabilities, taken before compressing), ``"ce"`` on the tokens
    themselves; distillation recovers more off the healing text's domain (docs/compress.md).
    ``heal_precision``: ``"auto"`` (bfloat16 matmuls where the hardware has them natively),
    ``"float32"`` or ``"bfloat16"`` (:func:`~rankwise.compress.heal.resolve_precision`).
    ``memory_map``: a model loaded by name from a safetensors folder has its weights
    memory-mapped from the file (:func:`~rankwise.compress.checkpoint.map_weights`: pages read
    when used, droppable by the kernel). ``device``: where the model runs (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``; default: where it is); ConfigError for a device this machine lacks.
    ``model`` must be a causal LM (ModelError otherwise, before any calibration); ``out`` is
    checked (:func:`rankwise.fileio.check_output_dir`) before anything is loaded.
    ``gradient_tokens``: how many of the ``calib_tokens`` (evenly spaced sequences) the gradient
    statistics of the allocation are taken on (``None``: all); input statistics use all of them.
    ``statistics``: an open-loop :func:`~rankwise.compress.calibrate.calibrate` run on this
    model, reused instead of calibrating again (benchmarks comparing methods; closed-loop runs
    still walk the blocks themselves).
    Returns a :class:`CompressionResult`; with ``out`` the folder is written atomically.
    """
    from rankwise.data import heldout_texts, load_corpus, perplexity

    t_start = time.perf_counter()
    own_statistics = statistics is None  # this run's own: freed as soon as they are used
    chosen = get_method(method, **(method_options or {}))
    allocation = chosen.resolve_allocation(allocation)
    mode = _resolve_mode(calibration, chosen)
    if min(calib_tokens, eval_tokens, decode_tokens, 1 if gradient_tokens is None else gradient_tokens) < 1:
        raise ConfigError(
            f"calib_tokens, gradient_tokens, eval_tokens and decode_tokens must be positive; got {calib_tokens}, "
            f"{gradient_tokens}, {eval_tokens}, {decode_tokens}"
        )
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    _target_parameters(1, ratio, size, 4)  # validates ratio / size before anything is loaded
    if device is not None:
        _check_device(device)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ConfigError("pass tokenizer= together with a model object")
        net, model_name = model, type(model).__name__
    else:
        from rankwise.models import load_model

        with stage(f"load {model}", show=progress):
            net, tokenizer = load_model(model)
            weights = Path(str(getattr(net, "name_or_path", "") or "")) / "model.safetensors"
            if memory_map and weights.is_file():
                map_weights(net, weights)
        model_name = str(model)
    if device is not None:
        net.to(_check_device(device))
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

    corpus = _corpus(data, load_corpus)
    calib_texts, eval_texts, corpus_name = corpus.calibration, corpus.validation, corpus.name
    fingerprint = None if corpus_name == "texts" else corpus.fingerprint()
    heal_steps = check_heal_steps(heal_steps, option="heal_steps")
    heal_loss = check_heal_loss(heal_loss, option="heal_loss")
    heal_precision = check_heal_precision(heal_precision, option="heal_precision")
    if heal_steps:  # the healing text is checked before any slow work
        heal_data = heal_blocks(tokenizer, corpus.train, seq_len=min(seq_len, HEAL_SEQ_LEN), batch_size=HEAL_BATCH,
                                max_tokens=heal_steps * HEAL_BATCH * min(seq_len, HEAL_SEQ_LEN))  # fmt: skip
    heldout_set = list(heldout_texts()) if evaluate and heldout else None
    needs = sorted(chosen.statistics(allocation))
    if needs and statistics is None:
        calibration_blocks(tokenizer, calib_texts, calib_tokens, seq_len)  # fail before the slow part
    if mode == "closed-loop":
        decoder_blocks(net, layers)  # a model without blocks fails before the slow part

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
    eval_kwargs = {"seq_len": seq_len, "max_tokens": eval_tokens, "batch_size": EVAL_BATCH}
    if evaluate:
        before = perplexity(net, tokenizer, eval_texts, **eval_kwargs, progress=progress)
        before_heldout = perplexity(net, tokenizer, heldout_set, **eval_kwargs) if heldout_set else None

    teacher = None
    if heal_steps and heal_loss == "distill":  # the dense model's targets, before anything is cut
        t0 = time.perf_counter()
        teacher = teacher_targets(net, heal_data.to(next(net.parameters()).device), progress=progress)
        teacher_seconds = time.perf_counter() - t0

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    # Open-loop statistics: all of them for an open-loop run. Closed loop takes gradients (for the
    # allocation) from an open-loop backward pass and input statistics from block-by-block walks:
    # one on the dense model for the per-layer path's spectra (allocation needs every layer's
    # before any is cut), one on the model being compressed — one block's statistics at a time.
    per_layer = type(chosen).compress_model is CompressionMethod.compress_model
    gradient_needs = sorted(set(needs) - set(INPUT_STATISTICS))
    # an open-loop per-layer run on its own statistics walks the dense model block by block too:
    # the same numbers, one block's Gram matrices held at a time (parked on disk until factorising)
    block_walk = (mode == "open-loop" and per_layer and statistics is None and bool(set(needs) & set(INPUT_STATISTICS))
                  and blocks_hold_every_layer(net, layers))  # fmt: skip
    open_needs = needs if mode == "open-loop" or (per_layer and statistics is not None) else gradient_needs
    open_needs = gradient_needs if block_walk else open_needs
    if statistics is not None:
        missing = sorted(set(open_needs) - set(statistics.collected))
        if missing or set(statistics.stats) != set(layers):
            raise ConfigError(
                f"the given statistics lack {missing or 'some of these layers'}; "
                f"calibrate with statistics={open_needs} on this model"
            )
    elif open_needs:
        backward = bool(gradient_needs)  # batch 1 keeps the backward pass's activations small
        statistics = calibrate(
            net, tokenizer, calib_texts, tokens=calib_tokens, seq_len=seq_len, statistics=open_needs, layers=layers,
            batch_size=1 if backward else 4, progress=progress,
            gradient_tokens=min(gradient_tokens, calib_tokens) if gradient_tokens else None,
        )  # fmt: skip
    walk_kwargs = {"tokens": calib_tokens, "seq_len": seq_len, "statistics": needs, "layers": layers, "progress": progress}
    spectra_from = statistics
    if block_walk:
        walk_batch = 1 if gradient_needs else 4  # the batches of the one-pass calibration: identical sums
        dense_walk = closed_loop_calibration(
            net, tokenizer, calib_texts, base=statistics, batch_size=walk_batch,
            label="block statistics (open-loop)", **walk_kwargs,
        )  # fmt: skip
        spectra_from = dataclasses.replace(dense_walk, mode="open-loop")
    elif mode == "closed-loop" and per_layer and (statistics is None or not set(needs) <= set(statistics.collected)):
        spectra_from = closed_loop_calibration(net, tokenizer, calib_texts, base=statistics, **walk_kwargs)
    walks: list[Calibration] = []  # the closed-loop walk, once made (after the spectra's walk is done)

    def closed_walk(base: Calibration | None = statistics) -> Calibration:
        walk = closed_loop_calibration(net, tokenizer, calib_texts, base=base, cross=per_layer and CORRECT_OUTPUTS, **walk_kwargs)
        walks.append(walk)
        return walks[0]

    timing["calibrate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows, spectra = None, {}
    if per_layer:
        job = CompressionJob(net, layers, spectra_from, target - fixed, allocation, progress)
        rows, spectra = per_layer_svd(chosen, job, timing, closed_walk if mode == "closed-loop" else None, release=own_statistics)
    else:
        job = CompressionJob(net, layers, closed_walk() if mode == "closed-loop" else statistics, target - fixed, allocation, progress)
        rows = chosen.compress_model(job)
        timing["factorise_s"] = time.perf_counter() - t0
    used = walks[0] if walks else (spectra_from if block_walk else statistics)
    calibration_info = None
    if used is not None:
        calibration_info = used.recipe() | {"split": "calibration", "corpus": corpus_name, "corpus_fingerprint": fingerprint}
    if block_walk:
        gradient_seconds = statistics.seconds if statistics is not None else 0.0
        calibration_info |= {"seconds": round(gradient_seconds + spectra_from.stats.seconds, 3), "walk": "block by block, dense model"}
    if walks:
        walk = walks[0].stats
        walk.finish()
        calibration_info |= {
            "seconds": round(walk.seconds, 3),
            "blocks": len(walk.blocks),
            "blocks_compressed_before_the_walk_passed_them": walk.compressed_blocks,
        }
    timing["compress_s"] = sum(timing.values())
    del statistics, spectra_from, used, job
    walks.clear()  # the walks hold activations and statistics: free them before evaluating
    release_memory()

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
        recipe = before.recipe() | {"max_tokens": eval_tokens, "batch_size": EVAL_BATCH}
        report["perplexity"] = {
            "before": before.perplexity,
            "after": after.perplexity,
            "recipe": recipe | {"split": "validation"},
            "corpus": corpus_name,
            "corpus_fingerprint": fingerprint,
        }
        if heldout_set:
            after_heldout = perplexity(net, tokenizer, heldout_set, **eval_kwargs)
            report["perplexity"]["heldout"] = {
                "before": before_heldout.perplexity,
                "after": after_heldout.perplexity,
                "recipe": recipe | {"scored_tokens": after_heldout.tokens},
                "corpus": f"{HELDOUT} (rankwise.data.heldout_texts: /usr/share/common-licenses, never calibrated on)",
                "corpus_fingerprint": texts_fingerprint(heldout_set),
            }
    if heal_steps:
        healed = _heal(net, heal_data, heal_steps, heal_lr, progress, out, teacher, heal_precision)
        report["heal"] = healed.as_dict() | {"lr": heal_lr, "batch_size": HEAL_BATCH, "seq_len": heal_data.shape[1], "split": "train",
                                             "loss": heal_loss}  # fmt: skip
        if teacher is not None:
            report["heal"] |= {"teacher": "the dense model before compression", "teacher_top_k": teacher.ids.shape[-1],
                               "teacher_seconds": round(teacher_seconds, 2)}  # fmt: skip
        del teacher
        if evaluate:
            report["perplexity"]["healed"] = perplexity(net, tokenizer, eval_texts, **eval_kwargs).perplexity
            if heldout_set:
                report["perplexity"]["heldout"]["healed"] = perplexity(net, tokenizer, heldout_set, **eval_kwargs).perplexity
        if count_parameters(net) != after_total:
            raise ModelError("healing changed the parameter count; this is a bug in rankwise, please report it")
    if measure_speed:
        dense_speed, speed = decode_speeds_interleaved(net, tokenizer, _replaced(net, layers), new_tokens=decode_tokens)
        report["decode"] = {
            "new_tokens": decode_tokens,
            "batch": 1,
            "greedy_kv_cache": True,
            "timing": "dense and compressed interleaved (modules swapped), 1 warm-up + median of 3 each",
            "before_tokens_per_s": dense_speed,
            "after_tokens_per_s": speed,
            "speedup": speed / dense_speed,
        }
    report["calibration"] = calibration_info
    report["timing"] = {k: round(v, 3) for k, v in timing.items()}
    report["memory"] = {"peak_rss_bytes": peak_memory_bytes(), "measured": "ru_maxrss of this process so far (load included)"}
    report["layers"] = [r.to_dict() for r in rows]

    path = None
    if out is not None:
        t0 = time.perf_counter()

        def write_reports(folder: Path) -> None:
            from rankwise.compress.report import write_report

            report["file_bytes"] = (folder / "model.safetensors").stat().st_size
            report["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)
            report["memory"]["peak_rss_bytes"] = peak_memory_bytes()
            write_report(report, folder, spectra=spectra if report_html else None, html=report_html)

        with stage(f"save {out}", show=progress):
            path = save_compressed(
                net, tokenizer, out, method=chosen.name, method_options=chosen.options(), overwrite=overwrite, extra=write_reports
            )
    else:
        report["timing"]["total_s"] = round(time.perf_counter() - t_start, 3)
    return CompressionResult(model=net, tokenizer=tokenizer, report=report, path=path)


__all__ = [
    "compress",
    "CompressionResult",
    "check_causal_lm",
    "decode_speed",
    "decode_speeds_interleaved",
    "peak_memory_bytes",
    "parse_size",
    "DEFAULT_CALIBRATION",
]
