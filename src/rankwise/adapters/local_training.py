"""Train the adapters of a model already in memory, with training rules, on given batches.

:func:`~rankwise.adapters.finetune.finetune` loads a model by name and trains it on a corpus;
the methods that prune, transfer or federate adapters (``prune.py``, ``loram.py``,
``trans_lora.py``, ``federated/``) train a model they hold, a few steps at a time, sometimes
with another loss (Trans-LoRA's distillation). :func:`train_adapters` runs those steps with
:meth:`TrainingRules.train_step <rankwise.adapters.rules.TrainingRules.train_step>`, the
step every rule hooks into (the same hooks, in the same order, as ``finetune``'s).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.inject import adapted_layers
from rankwise.adapters.rules import TrainingRule, TrainingRules
from rankwise.errors import ConfigError

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of a batch of token blocks ``(n, seq_len)`` (what finetune trains)."""
    return model(input_ids=batch, labels=batch).loss


@dataclass
class TrainLog:
    """What :func:`train_adapters` did: the loss of every step."""

    losses: list[float]


def check_positive(name: str, value: object, *, fix: str = "") -> None:
    """ConfigError unless ``value`` is a positive integer (``fix`` says what to pass)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}{fix}")


def check_ratio(name: str, value: object, *, low: float = 0.0, high: float = 1.0) -> float:
    """ConfigError unless ``low < value < high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
    if not low < value < high:
        raise ConfigError(f"{name} must be in ({low:g}, {high:g}), got {value!r}")
    return float(value)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded with ``seed``, and restore the
    caller's generator state afterwards. Adapter initialisation (``attach``: LoRA's
    ``kaiming_uniform_`` on A) and dropout draw from the global generator, which torch seeds
    differently in every process; a method whose config has a ``seed`` wraps its attach and
    training in this so that the seed alone fixes the result."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def batches_of(blocks: torch.Tensor, batch_size: int, *, seed: int = 0):
    """An endless, seeded stream of ``batch_size`` rows of ``blocks`` (reshuffled every pass);
    ConfigError at once (not at the first batch) for blocks that cannot make a batch."""
    check_positive("batch_size", batch_size)
    if blocks.dim() != 2 or len(blocks) == 0:
        raise ConfigError(
            f"training blocks must be a non-empty (n, seq_len) tensor of token ids, got shape "
            f"{tuple(blocks.shape)}; cut text with rankwise.data.token_blocks"
        )
    if len(blocks) < batch_size:
        raise ConfigError(
            f"{len(blocks)} training blocks are fewer than batch_size={batch_size}; give more "
            "text or a smaller batch_size"
        )
    return _endless(blocks, batch_size, torch.Generator().manual_seed(seed))


def _endless(blocks: torch.Tensor, batch_size: int, g: torch.Generator):
    while True:
        order = torch.randperm(len(blocks), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[i : i + batch_size]]


def train_adapters(
    model: nn.Module,
    batches,
    *,
    steps: int,
    lr: float = 1e-3,
    rules: Sequence[TrainingRule] = (),
    loss_fn: LossFn = lm_loss,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
) -> TrainLog:
    """Train ``model``'s trainable adapter parameters for ``steps`` AdamW steps (constant lr).

    ``batches`` is an iterator of inputs for ``loss_fn(model, batch)`` (default: the LM loss
    of token blocks). ``rules`` are :class:`~rankwise.adapters.rules.TrainingRule` objects
    run at the hooks listed in the module docstring. Returns the per-step losses.
    """
    check_positive("steps", steps)
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; attach an adapter first")
    adapters = {}  # {module path: adapter}, "path[name]" when a layer trains several
    for path, layer in adapted_layers(model).items():
        trained = {n: a for n, a in layer.adapters.items() if a.trainable}
        for name, adapter in trained.items():
            adapters[path if len(trained) == 1 else f"{path}[{name}]"] = adapter
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    hooks = TrainingRules(rules)
    hooks.setup(model, adapters, optimizer, steps=steps)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            batch = next(batches)
            losses.append(
                hooks.train_step(step, lambda b=batch: loss_fn(model, b), optimizer, max_grad_norm=max_grad_norm)
            )
    finally:
        hooks.teardown()
        model.train(was_training)
    return TrainLog(losses)


__all__ = [
    "LossFn", "TrainLog", "batches_of", "check_positive", "check_ratio", "lm_loss", "seeded", "train_adapters",
]
