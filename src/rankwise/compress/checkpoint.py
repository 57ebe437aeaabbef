"""Saving and loading compressed models: safetensors + the base config + a rankwise marker.

A compressed folder holds

- ``config.json`` (and generation config): the base Hugging Face config, unchanged;
- ``model.safetensors``: every tensor, low-rank layers as ``<name>.U (out, r)`` and
  ``<name>.V (r, in)`` (tied weights stored once); no pickles;
- ``rankwise_compressed.json`` (:data:`COMPRESSED_MARKER`): format version, method and, per
  low-rank module, its rank and shape;
- the tokenizer files, usually ``report.json`` / ``report.html``, and ``rankwise_output.json``
  (what rankwise wrote, so ``--overwrite`` may later replace the folder).

:func:`load_compressed` rebuilds the architecture from the config, swaps the listed modules
for :class:`~rankwise.compress.base.LowRankLinear` of the recorded ranks, checks every
tensor's shape, and loads the weights — so ``rankwise.load_model(folder)`` returns a model
that is small in memory, not a re-densified one (this module registers
:func:`load_compressed` with :func:`rankwise.models.register_folder_format` for the marker).
Folders follow rankwise's output-folder policy (:mod:`rankwise.fileio`): built in a temporary
sibling and renamed into place, with the user's permissions; an existing non-empty folder is
refused unless ``overwrite=True``, and even then only a folder rankwise wrote is replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankwise.errors import CheckpointError
from rankwise.fileio import output_dir, write_json
from rankwise.layers import LowRankLinear, install_module, module_spec, registered_modules
from rankwise.models import register_folder_format

COMPRESSED_MARKER = "rankwise_compressed.json"
FORMAT = "rankwise-compressed"
VERSION = 1
VERSION_WITH_MODULES = 2  # adds "modules": registered layer types of rankwise/layers (spec.py)
WEIGHTS = "model.safetensors"
WEIGHTS_METADATA = {"format": "pt", "rankwise": FORMAT}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def map_weights(model: nn.Module, file: str | os.PathLike) -> int:
    """Point ``model``'s floating-point parameters and buffers at a memory map of the
    safetensors ``file`` they were loaded from; returns the bytes now mapped.

    The map is copy-on-write (``mmap.ACCESS_COPY``): a page is read from disk when a forward
    first touches it, stays a clean file page the kernel may drop and re-read under memory
    pressure (unlike the loader's private copy), and a write changes only this process's copy,
    never the file. So compressing block by block needs the dense weights resident only while
    they are used (the way SVD-LLM compresses LLaMA-7B on one GPU). A tensor whose name,
    dtype or shape differ from the file's (e.g. tied weights stored once) is left as it is;
    values are identical either way. CheckpointError for a file that is not safetensors.
    """
    import mmap

    path = Path(file)
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot memory-map {str(path)!r}: not a readable safetensors file ({e})") from e
    start = 8 + size
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    total = 0
    for name, entry in header.items():
        tensor = targets.get(name)
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype", "") if isinstance(entry, dict) else "")
        if tensor is None or dtype is None or dtype != tensor.dtype or list(entry["shape"]) != list(tensor.shape):
            continue
        begin, end = entry["data_offsets"]
        view = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        tensor.data = view.view(tensor.shape)
        total += end - begin
    return total


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    outer = registered_modules(model)  # a LowRankLinear inside one of these is saved with it
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LowRankLinear) and not any(n.startswith(o + ".") for o in outer)
    }


def _header_entry_bound(name: str, ndim: int, shape_digits: int, offset_digits: int) -> int:
    """Bytes of ``"name":{"dtype":"BF16","shape":[..],"data_offsets":[a,b]},`` at most."""
    numbers = ndim * shape_digits + 2 * offset_digits + ndim  # with the commas
    return len(json.dumps(name)) + len(':{"dtype":"BF16","shape":[],"data_offsets":[]},') + numbers


def weights_header_bound(
    model: nn.Module, layers: dict[str, nn.Linear], file_bytes: int, tensors: tuple[str, ...]
) -> int:
    """An upper bound on the bytes of ``model.safetensors`` that are not tensor data (the
    8-byte length, the JSON header and its padding), for a file of at most ``file_bytes``,
    once each of ``layers`` holds the tensors ``<layer>.<t>`` for ``t`` in ``tensors`` (plus
    a bias where the dense layer has one). ``--size`` takes it off the budget."""
    state = model.state_dict()
    shape_digits = len(str(max(t.numel() for t in state.values())))  # no tensor grows past these
    offset_digits = len(str(file_bytes))
    total = len(json.dumps({"__metadata__": WEIGHTS_METADATA}))
    for key, tensor in state.items():
        if key.rpartition(".")[0] not in layers:
            total += _header_entry_bound(key, tensor.ndim, shape_digits, offset_digits)
    for name, layer in layers.items():
        names = [*tensors, *(["base.bias"] if layer.bias is not None else [])]
        total += sum(_header_entry_bound(f"{name}.{t}", 2, shape_digits, offset_digits) for t in names)
    return 8 + total + 8


def save_compressed(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    method: str,
    method_options: dict | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` (with its :class:`LowRankLinear` modules) and ``tokenizer`` to ``path``.

    ``extra(folder)`` may add files (reports) to the temporary folder before it is renamed
    into place, so a crash anywhere leaves no half-written output. Returns the final path.
    """
    from safetensors.torch import save_model

    modules = {name: module_spec(m) for name, m in registered_modules(model).items()}
    marker = {
        "format": FORMAT,
        "version": VERSION_WITH_MODULES if modules else VERSION,
        "method": method,
        "method_options": method_options or {},
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "low_rank": {
            name: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
            for name, m in low_rank_modules(model).items()
        },
        **({"modules": modules} if modules else {}),
    }
    with output_dir(path, overwrite=overwrite, kind="compressed") as tmp:
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata=WEIGHTS_METADATA)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / COMPRESSED_MARKER, marker)
        if extra is not None:
            extra(tmp)
    return Path(path).expanduser().absolute()


def _read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / COMPRESSED_MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {COMPRESSED_MARKER} in {str(folder)!r}: {e}") from e
    if marker.get("format") != FORMAT or not isinstance(marker.get("low_rank"), dict):
        raise CheckpointError(f"{COMPRESSED_MARKER} in {str(folder)!r} is not a rankwise compressed-model marker")
    if int(marker.get("version", 0)) > VERSION_WITH_MODULES:
        raise CheckpointError(
            f"{str(folder)!r} was written by a newer rankwise (format version {marker['version']}); upgrade rankwise"
        )
    return marker


def load_compressed(path: str | os.PathLike):
    """Load a folder written by :func:`save_compressed`; returns ``(model, tokenizer)``.

    Raises :class:`~rankwise.errors.CheckpointError` when the marker, config or weights are
    missing, or a tensor's shape does not match the module it is loaded into.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    marker = _read_marker(folder)
    if not (folder / WEIGHTS).exists():
        raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS}; the compressed checkpoint is incomplete")
    dtype = getattr(torch, marker.get("dtype", "float32"), torch.float32)
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise CheckpointError(f"cannot read config.json in {str(folder)!r}: {str(e).splitlines()[0]}") from e
    causal = marker.get("model_class", "").endswith(("ForCausalLM", "LMHeadModel"))
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=dtype)
    for name, spec in marker["low_rank"].items():
        install_module(model, name, {"type": "LowRankLinear", **spec}, dtype)
    for name, spec in marker.get("modules", {}).items():
        install_module(model, name, spec, dtype)
    try:
        missing, unexpected = load_safetensors(model, str(folder / WEIGHTS), strict=False)
    except (RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"weights in {str(folder)!r} do not fit the model: {str(e).splitlines()[0]}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {str(folder)!r} do not match the compressed architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


# models.py knows nothing of compress: the compressed folder format registers itself there.
register_folder_format(COMPRESSED_MARKER, load_compressed)


__all__ = ["COMPRESSED_MARKER", "map_weights", "save_compressed", "load_compressed", "low_rank_modules", "weights_header_bound"]
