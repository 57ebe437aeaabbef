"""Healing: a short fine-tune of a compressed model's own factors, size unchanged.

Truncating a weight loses what the discarded directions did; the model's other layers never
see that. A few hundred steps of next-token training on plain text let the kept factors
(``U``/``V`` of :class:`~rankwise.compress.base.LowRankLinear`, the correction ``A``/``B`` of
a compensated layer, a dictionary and its code values) absorb part of the loss, the way
SVD-LLM's LoRA fine-tune and LLM-Pruner's recovery step do — but by training the factors
themselves, so nothing is added and nothing has to be merged: the parameter count before and
after is the same, and the healed model saves and loads like any compressed folder.

Only floating-point parameters inside compressed modules train; embeddings, norms and layers
that were left dense stay frozen (they are the dense model's and healing on a small corpus
would over-fit them first). Integer codes of quantized layers are not trainable by nature.

Usage::

    blocks = heal_blocks(tokenizer, texts, seq_len=256, batch_size=4)   # DataError if too short
    result = heal(model, blocks, steps=200)                               # trains in place

:func:`heal_blocks` is separate so a caller (``compress(..., heal_steps=N)``) can check the
healing text before any slow compression work starts.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.errors import ConfigError, DataError, ShapeError
from rankwise.layers import LowRankLinear, is_registered
from rankwise.progress import Bar

DEFAULT_LR = 1e-4  # best held-out perplexity of 1e-4 / 2e-4 / 5e-4 at 100 steps (docs/compress.md, Healing)
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 4
WARMUP_FRACTION = 0.05
# Adam's first steps move every element by about the learning rate whatever its gradient's size:
# without a warm-up of at least 10 steps, 2-10 step heals made the model worse (docs/compress.md)
MIN_WARMUP_STEPS = 10
DEFAULT_TOP_K = 64  # teacher probabilities kept per token for distillation
LOSSES = ("distill", "ce")
PRECISIONS = ("auto", "float32", "bfloat16")
DEFAULT_LOSS = "distill"  # held-out 1.94x vs ce's 2.10x dense at 100 steps, lr 1e-4 (docs/compress.md, Healing)


@dataclass(frozen=True)
class TeacherTargets:
    """The dense model's next-token distribution on the healing blocks, for distillation.

    For every block position: the ``k`` most likely token ids (``ids``, int32) and their
    probabilities under the full softmax (``probs``, float16), shapes ``(n, seq_len, k)``, and
    the probability of "any other token" (``rest``, float32, ``(n, seq_len)``). Kept
    instead of the dense model itself: 6 bytes per kept token (39 MB at k = 64 for 100 steps of
    4 x 256 tokens) instead of a second copy of the model in memory.
    """

    ids: torch.Tensor
    probs: torch.Tensor
    rest: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.probs.shape or self.ids.ndim != 3 or self.rest.shape != self.ids.shape[:2]:
            raise ShapeError(
                f"teacher ids {tuple(self.ids.shape)} and probs {tuple(self.probs.shape)} must be equal "
                f"(n, seq_len, k) and rest {tuple(self.rest.shape)} their (n, seq_len)"
            )

    def check(self, blocks: torch.Tensor) -> None:
        """ShapeError unless these targets were computed on ``blocks``."""
        if self.ids.shape[:2] != blocks.shape:
            raise ShapeError(
                f"teacher targets cover blocks of shape {tuple(self.ids.shape[:2])}, the healing blocks are "
                f"{tuple(blocks.shape)}; compute them with teacher_targets(dense_model, blocks)"
            )


@torch.no_grad()
def teacher_targets(
    model: nn.Module, blocks: torch.Tensor, *, top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> TeacherTargets:
    """Run the (dense) ``model`` over ``blocks`` once and keep its top-``top_k`` next-token
    probabilities per position: the targets :func:`heal` distils towards (``teacher=``)."""
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ConfigError(f"top_k must be a positive whole number; got {top_k!r}")
    was_training = model.training
    model.eval()
    ids, probs, rest = [], [], []
    try:
        with Bar(len(blocks), "teacher targets", show=progress) as bar:
            for i in range(0, len(blocks), batch_size):
                batch = blocks[i : i + batch_size]
                logits = model(input_ids=batch.to(_device(model))).logits.float()
                top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
                ids.append(top.indices.to(torch.int32).cpu())
                log_total = logits.logsumexp(-1)
                probs.append((top.values - log_total.unsqueeze(-1)).exp().to(torch.float16).cpu())
                others = logits.scatter(-1, top.indices, float("-inf")).logsumexp(-1)  # -inf: no others
                rest.append((others - log_total).exp().cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return TeacherTargets(torch.cat(ids), torch.cat(probs), torch.cat(rest))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _distillation_loss(logits: torch.Tensor, targets: TeacherTargets, rows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher over k + 1 outcomes — the teacher's top
    k tokens and "any other token" — mean over positions. Its minimum is the teacher's own
    probabilities on the k tokens and on the rest; renormalising over the k alone would instead
    pull every distribution sharper than the teacher's. At k = vocabulary size it is the full
    KL divergence to the teacher plus the teacher's entropy."""
    ids = targets.ids[rows].to(logits.device, torch.int64)
    probs = targets.probs[rows].to(logits.device, torch.float32)
    logits = logits.float()
    log_q = logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)
    loss = -(probs * log_q).sum(-1)
    if ids.shape[-1] < logits.shape[-1]:  # else there is no "other token"
        # log(1 - mass of the k): no second pass over the vocabulary (a (batch, seq, vocab) copy)
        log_rest = torch.log1p(-log_q.exp().sum(-1).clamp(max=1 - 1e-6))
        loss = loss - targets.rest[rows].to(logits.device) * log_rest
    return loss.mean()


@dataclass(frozen=True)
class HealResult:
    """What a healing run did: ``losses`` are the training losses per step (mean per token)."""

    steps: int
    seconds: float
    tokens: int
    trained_parameters: int
    losses: tuple[float, ...]
    precision: str = "float32"

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        """Mean of the last tenth of the steps (one step's loss is noisy)."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "trained_parameters": self.trained_parameters,
            "precision": self.precision,
            "first_loss": round(self.first_loss, 4),
            "last_loss": round(self.last_loss, 4),
        }


def check_heal_steps(steps: object, *, option: str = "heal_steps") -> int:
    """``steps`` as a non-negative int, or ConfigError naming ``option``."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        else:
            raise ConfigError(f"{option} must be a whole number of steps (0 = no healing); got {steps!r}")
    if steps < 0:
        raise ConfigError(f"{option} must be >= 0 (0 = no healing); got {steps}")
    return steps


def heal_blocks(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Token blocks ``(n, seq_len)`` to heal on; DataError when the text is shorter than one block.

    Fewer blocks than ``batch_size`` is allowed (batches are then smaller), no blocks is not.
    """
    from rankwise.data import token_blocks

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    if not texts or not any(t.strip() for t in texts):
        raise DataError("the healing text is empty; give --data a text file or folder, or use 'builtin'")
    try:
        return token_blocks(tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens)
    except DataError as e:
        raise DataError(f"healing: {e}") from None


def healable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The floating-point parameters inside compressed modules, by qualified name.

    Compressed modules are :class:`LowRankLinear` and every registered compressed layer type
    (outermost ones; their inner modules' parameters are included once).
    """
    found: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, LowRankLinear) or is_registered(module)):
            continue
        for pname, p in module.named_parameters(prefix=name):
            if p.is_floating_point() and pname not in found:
                found[pname] = p
    return found


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over 5% of the steps but at least :data:`MIN_WARMUP_STEPS` (a run that
    short is all warm-up), then cosine decay to 10% of the peak."""
    warmup = min(steps, max(MIN_WARMUP_STEPS, int(steps * WARMUP_FRACTION)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def check_heal_loss(loss: object, *, option: str = "loss") -> str:
    """``loss`` if it is one of :data:`LOSSES`, else ConfigError naming ``option``."""
    if loss not in LOSSES:
        raise ConfigError(
            f"{option} must be 'distill' (towards the dense model's predictions) or 'ce' (next-token "
            f"cross-entropy on the text); got {loss!r}"
        )
    return loss


def check_heal_precision(precision: object, *, option: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ConfigError naming ``option``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{option} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def resolve_precision(precision: object, device: torch.device, *, option: str = "precision") -> str:
    """``"float32"`` or ``"bfloat16"`` (matmuls under autocast; weights, optimizer state and the
    loss stay float32). ``"auto"`` is bfloat16 where the hardware multiplies it natively (CPUs
    with AVX512-BF16/AMX, CUDA GPUs that support it) — 1.9x faster per healing step on SmolLM2
    here, same loss to 4 digits — else float32."""
    precision = check_heal_precision(precision, option=option)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


def _batches(n: int, batch_size: int, seed: int):
    """Endless shuffled mini-batches of block indices (a new permutation every epoch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]


def heal(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    teacher: TeacherTargets | None = None,
    precision: str = "auto",
) -> HealResult:
    """Train ``model``'s compressed factors for ``steps`` AdamW steps on ``blocks``, in place.

    ``blocks`` come from :func:`heal_blocks`. The loss is next-token cross-entropy on the
    blocks' own tokens, or, with ``teacher`` (:func:`teacher_targets` of the dense model on the
    same blocks), cross-entropy against the dense model's next-token distribution: distillation
    restores what compression changed instead of fitting the healing text's domain. Every other
    parameter is frozen for the run and its ``requires_grad`` restored afterwards, as is the
    train/eval mode. ``on_step(step, loss)`` is called after each step. ``precision``: see
    :func:`resolve_precision`. ConfigError when the model has nothing to heal.
    """
    steps = check_heal_steps(steps, option="steps")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a positive number; got {lr!r}")
    if blocks.ndim != 2 or len(blocks) == 0:
        raise DataError(f"blocks must be a non-empty (n, seq_len) tensor of token ids; got shape {tuple(blocks.shape)}")
    if teacher is not None:
        teacher.check(blocks)
    params = healable_parameters(model)
    if not params:
        raise ConfigError(
            "this model has no compressed layers to heal; compress it first "
            "(rankwise compress / rankwise.compress.compress)"
        )
    trained = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device
    precision = resolve_precision(precision, device)
    if steps == 0:
        return HealResult(0, 0.0, 0, trained, (), precision)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    was_training = model.training
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    model.train()
    try:
        with Bar(steps, "healing", show=progress) as bar:
            for step, rows in zip(range(steps), _batches(len(blocks), batch_size, seed), strict=False):
                batch = blocks[rows].to(device)
                with autocast:
                    out = model(input_ids=batch) if teacher is not None else model(input_ids=batch, labels=batch)
                loss = out.loss if teacher is None else _distillation_loss(out.logits, teacher, rows)
                if not torch.isfinite(loss):
                    raise DataError(
                        f"healing diverged at step {step + 1} (loss {loss.item()}); "
                        f"try a smaller learning rate than {lr:g}"
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += batch.numel()
                bar.update(1)
                bar.set(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(step + 1, losses[-1])
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
        model.train(was_training)
    return HealResult(len(losses), time.perf_counter() - start, tokens, trained, tuple(losses), precision)


def heal_folder(
    model: str | os.PathLike,
    *,
    steps: int,
    out: str | os.PathLike,
    overwrite: bool = False,
    data: str | os.PathLike = "builtin",
    lr: float = DEFAULT_LR,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    eval_tokens: int = 8192,
    loss: str = DEFAULT_LOSS,
    teacher: str | os.PathLike | None = None,
    precision: str = "auto",
    progress: bool = True,
) -> dict:
    """Heal a compressed folder (what ``rankwise compress --out`` wrote) and save it to ``out``.

    What ``rankwise heal`` does: ``out`` is checked and the healing text tokenized before the
    model is loaded. ``loss="distill"`` trains towards a dense model's next-token distribution:
    ``teacher`` (a name or folder for :func:`rankwise.load_model`), by default the model the
    folder's report.json says it was compressed from; it is loaded, run once over the healing
    tokens and freed before the compressed model is loaded. Perplexity is measured before and
    after on ``data``'s validation split
    and on the held-out corpus (:func:`rankwise.data.heldout_texts`, never trained on);
    the healed model is written with the folder's method and options and a ``heal.json``
    report, and loads with ``rankwise.load_model(out)``. Returns that report.
    """
    from rankwise.compress.checkpoint import (
        COMPRESSED_MARKER,
        _read_marker,
        load_compressed,
        save_compressed,
    )
    from rankwise.data import heldout_texts, load_corpus, perplexity
    from rankwise.fileio import check_output_dir, write_json
    from rankwise.models import count_parameters
    from rankwise.progress import stage

    steps = check_heal_steps(steps, option="--steps")
    loss = check_heal_loss(loss, option="--loss")
    precision = check_heal_precision(precision, option="--precision")
    folder = Path(model).expanduser()
    if not (folder / COMPRESSED_MARKER).is_file():
        raise ConfigError(
            f"{str(folder)!r} is not a compressed folder (no {COMPRESSED_MARKER}); heal the folder "
            "`rankwise compress --out` wrote, or use `rankwise compress --heal-steps`"
        )
    marker = _read_marker(folder)
    same = folder.resolve() == Path(out).expanduser().resolve()
    if not same:
        check_output_dir(out, overwrite=overwrite, option="--out")
    elif not overwrite:
        raise ConfigError(f"--out is the folder being healed ({str(folder)!r}); add --overwrite to replace it")
    corpus = load_corpus(data)
    source = folder / "report.json"
    summary = json.loads(source.read_text()) if source.is_file() else {}
    targets = None
    if loss == "distill" and steps:
        teacher = _teacher_name(teacher, summary, folder)
        with stage(f"load teacher {teacher}", show=progress):
            dense, tokenizer = _load_teacher(teacher)
        blocks = heal_blocks(tokenizer, corpus.train, seq_len=seq_len, batch_size=batch_size,
                             max_tokens=steps * batch_size * seq_len + seq_len)  # fmt: skip
        teacher_blocks = blocks
        targets = teacher_targets(dense, blocks, batch_size=batch_size, progress=progress)
        del dense
    with stage(f"load {folder}", show=progress):
        net, tokenizer = load_compressed(folder)
    blocks = heal_blocks(tokenizer, corpus.train, seq_len=seq_len, batch_size=batch_size,
                         max_tokens=steps * batch_size * seq_len + seq_len)  # fmt: skip
    if targets is not None and not torch.equal(blocks, teacher_blocks):
        raise ConfigError(
            f"the teacher {teacher!r} tokenizes the healing text differently from {str(folder)!r}; "
            "pass the dense model it was compressed from (--teacher) or heal with --loss ce"
        )
    sets = {"validation": corpus.validation, "heldout": list(heldout_texts())}

    def measure() -> dict[str, float]:
        return {
            name: perplexity(net, tokenizer, texts, seq_len=512, max_tokens=eval_tokens, progress=progress).perplexity
            for name, texts in sets.items()
        }

    before = measure()
    result = heal(net, blocks, steps=steps, lr=lr, batch_size=batch_size, progress=progress, teacher=targets, precision=precision)
    after = measure()
    report = {
        "model": str(folder),
        "data": str(data),
        "heal": result.as_dict() | {"lr": lr, "batch_size": batch_size, "seq_len": seq_len, "split": "train", "loss": loss}
        | ({"teacher": str(teacher), "teacher_top_k": targets.ids.shape[-1]} if targets is not None else {}),
        "perplexity": {"before": before, "healed": after, "eval_tokens": eval_tokens, "seq_len": 512},
    }
    # the folder's report.json carries on (compression recipe and layers), with the healing added
    summary.setdefault("parameters", {})["after"] = count_parameters(net)
    summary |= {"heal": report["heal"], "heal_perplexity": report["perplexity"]}

    def write_reports(tmp: Path) -> None:
        write_json(tmp / "heal.json", report)
        write_json(tmp / "report.json", summary)

    with stage(f"save {out}", show=progress):
        save_compressed(
            net, tokenizer, out, method=marker.get("method", "unknown"), method_options=marker.get("method_options"),
            overwrite=True if same else overwrite, extra=write_reports,
        )  # fmt: skip
    return report


def _teacher_name(teacher: str | os.PathLike | None, summary: dict, folder: Path) -> str:
    """The dense model to distil from: ``teacher``, or the model the folder was compressed from."""
    if teacher is not None:
        return str(teacher)
    name = summary.get("model")
    if not name:
        raise ConfigError(
            f"{str(folder)!r} does not say which model it was compressed from (no 'model' in report.json); "
            "pass the dense model (--teacher NAME_OR_FOLDER) or heal with --loss ce"
        )
    return str(name)


def _load_teacher(name: str):
    from rankwise.errors import ModelError
    from rankwise.models import load_model

    try:
        return load_model(name)
    except (ConfigError, ModelError, OSError) as e:
        raise ConfigError(
            f"cannot load the teacher model {name!r} for distillation ({e}); pass the dense model it was "
            "compressed from (--teacher NAME_OR_FOLDER) or heal with --loss ce"
        ) from None


__all__ = [
    "DEFAULT_LOSS", "HealResult", "LOSSES", "PRECISIONS", "TeacherTargets", "check_heal_loss", "check_heal_precision", "check_heal_steps", "heal", "heal_blocks", "heal_folder", "healable_parameters",
    "resolve_precision", "teacher_targets",
]  # fmt: skip
