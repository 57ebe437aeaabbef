"""Saving and loading compressed models: safetensors + the base config + a rankwise marker.

A compressed folder holds

- ``config.json`` (and generation config): the base Hugging Face config, unchanged;
- ``model.safetensors``: every tensor, low-rank layers as ``<name>.U (out, r)`` and
  ``<name>.V (r, in)`` (tied weights stored once); no pickles;
- ``rankwise_compressed.json`` (:data:`~rankwise.models.COMPRESSED_MARKER`): format version,
  method and, per low-rank module, its rank and shape;
- the tokenizer files, and usually ``report.json`` / ``report.html``.

:func:`load_compressed` rebuilds the architecture from the config, swaps the listed modules
for :class:`~rankwise.compress.base.LowRankLinear` of the recorded ranks, checks every
tensor's shape, and loads the weights — so ``rankwise.load_model(folder)`` returns a model
that is small in memory, not a re-densified one. Folders are written to a temporary sibling
and renamed into place; an existing folder is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankwise.compress.base import LowRankLinear
from rankwise.compress.layers import install_module, module_spec, registered_modules
from rankwise.errors import CheckpointError
from rankwise.models import COMPRESSED_MARKER

FORMAT = "rankwise-compressed"
VERSION = 1
VERSION_WITH_MODULES = 2  # adds "modules": registered layer types of compress/layers.py
WEIGHTS = "model.safetensors"


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    outer = registered_modules(model)  # a LowRankLinear inside one of these is saved with it
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LowRankLinear) and not any(n.startswith(o + ".") for o in outer)
    }


def check_output_folder(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite`` (called before any work is done)."""
    final = Path(path).expanduser()
    if final.exists() and not overwrite:
        raise CheckpointError(
            f"output folder {str(final)!r} already exists; pass overwrite=True (--overwrite) "
            "or choose another --out"
        )
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"output path {str(final)!r} exists and is not a folder; choose another --out")
    return final


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an old ``final`` is removed only after the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
    os.replace(final, old / "folder")
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old / "folder", final)
        raise
    shutil.rmtree(old, ignore_errors=True)


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

    final = check_output_folder(path, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp."))
    try:
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "rankwise": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / COMPRESSED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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


def _swap(model: nn.Module, name: str, spec: dict, dtype: torch.dtype) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
    except AttributeError as e:
        raise CheckpointError(f"low-rank module {name!r} does not exist in {type(model).__name__}") from e
    if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (
        spec["out_features"],
        spec["in_features"],
    ):
        raise CheckpointError(
            f"module {name!r} is {old!r} in the base architecture, but the checkpoint describes a "
            f"{spec['out_features']}x{spec['in_features']} linear layer"
        )
    setattr(
        parent,
        child,
        LowRankLinear(spec["in_features"], spec["out_features"], int(spec["rank"]), bias=bool(spec["bias"]), dtype=dtype),
    )


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
        _swap(model, name, spec, dtype)
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


__all__ = ["save_compressed", "load_compressed", "check_output_folder", "low_rank_modules"]
