"""LoRAPrune: LoRA-guided iterative structured pruning, producing a smaller model.

"LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning" (Zhang et al., 2023).
A LoRA adapter is trained on the task; while it trains, the importance of every attention
head and MLP channel is estimated from the LoRA weights and gradients only (no gradient of
the frozen weights; the rule ``lora_prune_importance``, see
``rules/lora_prune_importance.py``). Pruning is iterative: after each round of
``steps_per_iteration`` steps the least important units are physically removed until the
removed fraction reaches ``ratio * t / iterations``; the LoRA keeps training on what is left,
so it recovers from each cut. The result is a smaller ``LlamaForCausalLM`` (fewer heads and
MLP channels in every layer) with its adapter; :func:`save_pruned` merges the adapter and
writes a Hugging Face folder that ``rankwise.load_model`` loads back.

    model, tok = rankwise.load_model("tiny-llama")
    blocks = token_blocks(tok, load_corpus().train, seq_len=64, max_tokens=20_000)
    result = lora_prune(model, blocks, LoraPruneConfig(ratio=0.5))
    save_pruned(result.model, tok, "pruned/")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.adapters.inject import adapted_layers, attach
from rankwise.adapters.local_training import (
    batches_of,
    check_positive,
    check_ratio,
    seeded,
    train_adapters,
)
from rankwise.adapters.rules.lora_prune_importance import (
    ADAPTED,
    LoraPruneImportance,
    LoraPruneImportanceConfig,
    check_lora_on_units,
)
from rankwise.adapters.structure import (
    bake,
    decoder_shape,
    keep_counts,
    prune_units,
    top_units,
)
from rankwise.errors import ConfigError
from rankwise.fileio import check_output_dir, output_dir
from rankwise.models import count_parameters


@dataclass(frozen=True)
class LoraPruneConfig:
    """Options of :func:`lora_prune`.

    ``ratio``: fraction of query heads (per key/value group) and MLP channels removed, in
    (0, 1). ``iterations`` pruning rounds of ``steps_per_iteration`` LoRA steps each, then
    ``recovery_steps`` more. The LoRA (``rank``, ``alpha``) sits on q/k/v/o/gate/up/down.
    ``momentum``: the importance moving average. ``seed`` fixes the whole run: the batch
    order and the LoRA initialisation (drawn under :func:`~rankwise.adapters.local_training.seeded`,
    so the caller's global torch generator is neither used nor changed).
    """

    ratio: float = 0.5
    iterations: int = 4
    steps_per_iteration: int = 10
    recovery_steps: int = 10
    rank: int = 8
    alpha: float | None = None
    lr: float = 1e-3
    batch_size: int = 4
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        check_ratio("ratio (the fraction of heads and channels removed)", self.ratio)
        for name in ("iterations", "steps_per_iteration", "rank", "batch_size"):
            check_positive(name, getattr(self, name))
        if isinstance(self.recovery_steps, bool) or not isinstance(self.recovery_steps, int) or self.recovery_steps < 0:
            raise ConfigError(f"recovery_steps must be an integer >= 0, got {self.recovery_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        LoraPruneImportanceConfig(momentum=self.momentum)


@dataclass
class PruneResult:
    """The pruned model (adapter attached) and what changed."""

    model: nn.Module
    heads: tuple[int, int]  # query heads per layer (before, after)
    channels: tuple[int, int]  # MLP channels per layer (before, after)
    parameters: tuple[int, int]  # base-model parameters (before, after), adapter excluded
    losses: list[float] = field(default_factory=list)
    schedule: list[float] = field(default_factory=list)  # removed fraction after each round

    @property
    def kept_fraction(self) -> float:
        return self.parameters[1] / self.parameters[0]


def _base_parameters(model: nn.Module) -> int:
    adapter = sum(p.numel() for layer in adapted_layers(model).values() for p in layer.adapters.parameters())
    return count_parameters(model) - adapter


def prune_by_scores(
    model: nn.Module, scores: list[tuple[torch.Tensor, torch.Tensor]], per_group: int, channels: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep the ``per_group`` best query heads of each key/value group and the ``channels``
    best MLP channels of every layer (``scores[i] = (per head, per channel)`` of layer i) and
    remove the rest. Returns the kept indices (into the current units) per layer."""
    shape = decoder_shape(model)
    per_group, channels = min(per_group, shape.group), min(channels, shape.channels)
    kept = [top_units(shape, h, c, per_group, channels) for h, c in scores]
    heads, chans = [k[0] for k in kept], [k[1] for k in kept]
    prune_units(model, heads, chans)
    return heads, chans


def _attach_lora(model: nn.Module, config: LoraPruneConfig) -> None:
    if not adapted_layers(model):
        attach(model, "lora", list(ADAPTED) + ["k_proj", "v_proj"], rank=config.rank, alpha=config.alpha)
    check_lora_on_units(model)


def _prune_rounds(model: nn.Module, data, shape, config: LoraPruneConfig) -> tuple[list[float], list[float]]:
    """The training/pruning rounds, then recovery; returns (losses, removed fraction per round)."""
    rule = LoraPruneImportance(LoraPruneImportanceConfig(momentum=config.momentum))
    losses, schedule = [], []
    for t in range(1, config.iterations + 1):
        log = train_adapters(model, data, steps=config.steps_per_iteration, lr=config.lr, rules=[rule])
        losses += log.losses
        target = config.ratio * t / config.iterations
        heads, chans = prune_by_scores(model, rule.scores, *keep_counts(shape, target))
        rule.keep(heads, chans)
        schedule.append(target)
    if config.recovery_steps:
        losses += train_adapters(model, data, steps=config.recovery_steps, lr=config.lr).losses
    return losses, schedule


def lora_prune(model: nn.Module, blocks: torch.Tensor, config: LoraPruneConfig | None = None) -> PruneResult:
    """Prune ``model`` in place with LoRAPrune (see the module docstring); returns what changed.

    ``blocks`` are training token blocks ``(n, seq_len)``. A LoRA adapter ``default`` is
    attached to every q/k/v/o/gate/up/down projection unless the model already carries one
    (it must then be a LoRA on q/o/gate/up/down). Raises ConfigError for a model that is not
    a Llama-style decoder, or a ratio that would remove nothing or everything.
    """
    config = config or LoraPruneConfig()
    shape = decoder_shape(model)
    per_group, channels = keep_counts(shape, config.ratio)
    if per_group == shape.group and channels == shape.channels:
        raise ConfigError(
            f"ratio={config.ratio} removes no head and no channel of this model ({shape.heads} "
            f"heads, {shape.channels} channels per layer); use a larger ratio"
        )
    data = batches_of(blocks, config.batch_size, seed=config.seed)
    with seeded(config.seed):  # the LoRA init (and any dropout) from config.seed alone
        _attach_lora(model, config)
        before = _base_parameters(model)
        losses, schedule = _prune_rounds(model, data, shape, config)
    after = decoder_shape(model)
    return PruneResult(
        model=model,
        heads=(shape.heads, after.heads),
        channels=(shape.channels, after.channels),
        parameters=(before, _base_parameters(model)),
        losses=losses,
        schedule=schedule,
    )


def save_pruned(model: nn.Module, tokenizer, out, *, overwrite: bool = False):
    """Merge the adapter into the pruned model and write a Hugging Face folder (safetensors,
    config, tokenizer) that ``rankwise.load_model(out)`` loads as a plain smaller model."""
    check_output_dir(out, overwrite=overwrite)
    bake(model)
    with output_dir(out, overwrite=overwrite, kind="pruned-model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


__all__ = ["LoraPruneConfig", "PruneResult", "lora_prune", "prune_by_scores", "save_pruned"]
