"""Checkpoints a run resumes from, bit-identically.

A checkpoint is the folder ``OUT/checkpoint`` (written whole in a temporary sibling and
renamed into place by :func:`rankwise.fileio.output_dir`, so a run killed while writing keeps
the previous one):

- ``model.safetensors``: every parameter and buffer (tied tensors stored once per name);
- ``optimizer.pt``: the optimizer's ``state_dict()`` and the RNG state, plain tensors only
  (read back with ``torch.load(..., weights_only=True)``);
- ``trainer.json``: the step reached (the data position is a function of it), the skipped-step
  count, the refresh counters, the log so far, and the run's identity
  (:meth:`~rankwise.pretrain.config.PretrainConfig.identity`);
- ``tokenizer.json``: for a config whose tokenizer is trained (``bpe8k``), the tokenizer the run
  uses, so a resumed run tokenizes with exactly it, whatever the cache holds by then.

Resuming compares the identity first: another config, model, method or option raises a
:class:`~rankwise.errors.CheckpointError` naming each difference, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rankwise.errors import CheckpointError
from rankwise.fileio import output_dir

CHECKPOINT = "checkpoint"
FILES = ("model.safetensors", "optimizer.pt", "trainer.json")
TOKENIZER = "tokenizer.json"


def save_checkpoint(
    out: Path, model_state: dict, optimizer_state: dict, trainer: dict, tokenizer: str | None = None
) -> Path:
    """Write ``out/checkpoint`` atomically (the previous one stays until the new one is whole);
    ``tokenizer``: the ``tokenizer.json`` text of a trained tokenizer, kept beside the weights."""
    from safetensors.torch import save_file

    with output_dir(out / CHECKPOINT, overwrite=True, kind="pretrain-checkpoint", option="checkpoint") as tmp:
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer_state, "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer)
    return out / CHECKPOINT


def read_tokenizer(out: Path) -> str | None:
    """The ``tokenizer.json`` text kept in the checkpoint in ``out`` (None if it has none)."""
    path = out / CHECKPOINT / TOKENIZER
    return path.read_text() if path.is_file() else None


def read_trainer(out: Path) -> dict:
    """``trainer.json`` of the checkpoint in ``out``; CheckpointError if there is none."""
    folder = out / CHECKPOINT
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(
            f"--resume: {str(folder)!r} has no complete checkpoint (missing {', '.join(missing)}); "
            "start a new run without --resume"
        )
    try:
        return json.loads((folder / "trainer.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"--resume: {str(folder / 'trainer.json')!r} is not valid JSON ({e})") from e


def check_identity(saved: dict, current: dict, out: Path) -> None:
    """CheckpointError naming every option where the checkpoint's run differs from this one
    (an option the checkpoint predates counts as its default, :data:`IDENTITY_DEFAULTS`)."""
    from rankwise.pretrain.config import IDENTITY_DEFAULTS

    saved = {**IDENTITY_DEFAULTS, **saved}
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"--resume: the checkpoint in {str(out)!r} belongs to another run ({'; '.join(diffs)}); "
            "resume with the same options, or start over in another --out (or with --overwrite)"
        )


def load_tensors(out: Path) -> tuple[dict, dict, torch.Tensor]:
    """``(model_state, optimizer_state, rng_state)`` of the checkpoint in ``out``."""
    from safetensors.torch import load_file

    folder = out / CHECKPOINT
    try:
        model_state = load_file(str(folder / "model.safetensors"))
        blob = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # corrupt or truncated files: one clear line
        raise CheckpointError(f"--resume: the checkpoint in {str(folder)!r} cannot be read ({type(e).__name__}: {e})") from e
    return model_state, blob["optimizer"], blob["rng"]


__all__ = ["CHECKPOINT", "check_identity", "load_tensors", "read_tokenizer", "read_trainer", "save_checkpoint"]
