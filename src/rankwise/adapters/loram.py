"""LoRAM: train the LoRA on a pruned (small) model, use it on the original (large) one.

"Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models"
(Zhang et al., 2025). Training memory is dominated by the frozen base weights, and many
neurons matter for inference but little for training, so:

1. :func:`loram_prune` copies the model and structurally prunes the copy (query heads and
   MLP channels, ``structure.py``), by weight magnitude or at random, remembering which
   units each layer kept (a :class:`PruneMap`);
2. optionally, :func:`align` gives the pruned copy a short continual pre-training on general
   text (all its weights, a few steps at a small ``lr``): the paper's alignment, done once by a
   model publisher, which narrows the knowledge gap between the pruned and the full model so
   that what the LoRA learns on the copy fits the full model better. Only the copy changes;
3. the LoRA is trained on the (aligned) small copy (any trainer; :func:`loram` uses
   :func:`~rankwise.adapters.local_training.train_adapters`);
4. :func:`recover` expands the pruned LoRA factors back to the full shapes, zeros where
   units were removed (``B``'s rows of removed outputs, ``A``'s columns of removed inputs),
   and attaches the result to the full, original model, where it is used for inference.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.adapters.inject import AttachPlan, adapted_layers, attach
from rankwise.adapters.local_training import batches_of, check_positive, check_ratio, train_adapters
from rankwise.adapters.structure import (
    ATTN,
    Shape,
    check_prunable,
    decoder_blocks,
    decoder_shape,
    head_rows,
    keep_counts,
    prune_units,
    top_units,
)
from rankwise.errors import ConfigError

CRITERIA = ("magnitude", "random")


@dataclass
class PruneMap:
    """Which query heads and MLP channels each layer of the pruned copy kept, and the full
    model's shape: what :func:`recover` needs to put the adapter back in place."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    shape: Shape

    def rows_cols(self, path: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(kept output rows, kept input columns)`` of the full layer at ``path`` (None: all)."""
        parts = path.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None, None
        i, proj = int(parts[2]), parts[-1]
        heads = head_rows(self.heads[i], self.shape.head_dim)
        return {
            "q_proj": (heads, None),
            "o_proj": (None, heads),
            "gate_proj": (self.channels[i], None),
            "up_proj": (self.channels[i], None),
            "down_proj": (None, self.channels[i]),
        }.get(proj, (None, None))


def _magnitude_scores(model: nn.Module, shape: Shape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for block in decoder_blocks(model):
        q = block.attn.q_proj.weight.detach().pow(2).sum(1).view(shape.heads, -1).sum(1)
        o = block.attn.o_proj.weight.detach().pow(2).sum(0).view(shape.heads, -1).sum(1)
        mlp = block.mlp
        c = mlp.gate_proj.weight.detach().pow(2).sum(1) + mlp.up_proj.weight.detach().pow(2).sum(1)
        out.append((q + o, c + mlp.down_proj.weight.detach().pow(2).sum(0)))
    return out


def loram_prune(
    model: nn.Module, ratio: float = 0.5, *, criterion: str = "magnitude", seed: int = 0
) -> tuple[nn.Module, PruneMap]:
    """A pruned copy of ``model`` (``ratio`` of query heads per group and of MLP channels
    removed in every layer, chosen by ``criterion``: "magnitude" or "random") and its
    :class:`PruneMap`. ``model`` is not changed and must carry no adapter yet."""
    check_ratio("ratio (the fraction of heads and channels removed)", ratio)
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if adapted_layers(model):
        raise ConfigError("loram_prune prunes the bare base model; call it before attaching adapters")
    shape = decoder_shape(model)
    per_group, channels = keep_counts(shape, ratio)
    if per_group == shape.group and channels == shape.channels:
        raise ConfigError(f"ratio={ratio} removes nothing from this model; use a larger ratio")
    if criterion == "magnitude":
        scores = _magnitude_scores(model, shape)
    else:
        g = torch.Generator().manual_seed(seed)
        n = len(decoder_blocks(model))
        scores = [(torch.rand(shape.heads, generator=g), torch.rand(shape.channels, generator=g)) for _ in range(n)]
    kept = [top_units(shape, h, c, per_group, channels) for h, c in scores]
    small = copy.deepcopy(model)
    prune_units(small, [k[0] for k in kept], [k[1] for k in kept])
    return small, PruneMap([k[0] for k in kept], [k[1] for k in kept], shape)


def align(
    small: nn.Module, blocks: torch.Tensor, *, steps: int, lr: float = 1e-4, batch_size: int = 4, seed: int = 0
) -> list[float]:
    """LoRAM's alignment: continual pre-training of the pruned copy ``small`` on ``blocks``
    (general text, ``(n, seq_len)`` token ids) for ``steps`` AdamW steps at ``lr``, every
    weight trained; returns the per-step LM losses. Call it before attaching the LoRA. The
    copy's ``requires_grad`` flags are restored afterwards."""
    if adapted_layers(small):
        raise ConfigError("align the pruned model before attaching its LoRA (the alignment trains the base weights)")
    data = batches_of(blocks, batch_size, seed=seed)
    params = list(small.parameters())
    flags = [p.requires_grad for p in params]
    torch.manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(True)
        return train_adapters(small, data, steps=steps, lr=lr).losses
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _expanded(adapter, rows, cols, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = adapter.lora_B.detach(), adapter.lora_A.detach()
    full_b = b if rows is None else b.new_zeros(out_features, b.shape[1]).index_copy_(0, rows, b)
    full_a = a if cols is None else a.new_zeros(a.shape[0], in_features).index_copy_(1, cols, a)
    return full_b, full_a


def recover(small: nn.Module, full: nn.Module, prune_map: PruneMap, name: str = "default") -> AttachPlan:
    """Attach to ``full`` the LoRA adapter ``name`` trained on ``small``, expanded to the full
    shapes (zeros for removed units); returns the attach plan. ``full`` must be the model
    ``small`` was pruned from. The adapter on ``full`` starts equal to the trained one on
    every kept unit: with the removed units' weights zeroed, both models compute the same."""
    layers = {p: layer for p, layer in adapted_layers(small).items() if name in layer.adapters}
    if not layers:
        raise ConfigError(f"the pruned model has no adapter {name!r} to recover; train one on it first")
    check_prunable(small)
    if decoder_shape(full) != prune_map.shape:
        raise ConfigError(
            f"recover onto the model that was pruned: its shape is {decoder_shape(full)}, the "
            f"prune map was made from {prune_map.shape}"
        )
    first = next(iter(layers.values())).adapters[name]
    plan = attach(full, "lora", sorted(layers), name=name, rank=first.config.rank, alpha=first.config.alpha, use_rslora=first.config.use_rslora)
    targets = adapted_layers(full)
    with torch.no_grad():
        for path, layer in layers.items():
            rows, cols = prune_map.rows_cols(path)
            view = targets[path].view
            b, a = _expanded(layer.adapters[name], rows, cols, view.out_features, view.in_features)
            new = targets[path].adapters[name]
            new.lora_B.copy_(b)
            new.lora_A.copy_(a)
    return plan


@dataclass(frozen=True)
class LoramConfig:
    """Options of :func:`loram`: pruning (``ratio``, ``criterion``), the alignment of the
    pruned copy (``align_steps`` steps at ``align_lr``; 0: no alignment), the LoRA (``rank``,
    ``alpha``, ``targets``) and its training on the pruned copy."""

    ratio: float = 0.5
    criterion: str = "magnitude"
    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ATTN + ("gate_proj", "up_proj", "down_proj")
    steps: int = 50
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    align_steps: int = 0
    align_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_ratio("ratio (the fraction of heads and channels removed)", self.ratio)
        for name in ("rank", "steps", "batch_size"):
            check_positive(name, getattr(self, name))
        if isinstance(self.align_steps, bool) or not isinstance(self.align_steps, int) or self.align_steps < 0:
            raise ConfigError(f"align_steps must be an integer >= 0 (0: no alignment), got {self.align_steps!r}")
        if not (isinstance(self.align_lr, (int, float)) and math.isfinite(self.align_lr) and self.align_lr > 0):
            raise ConfigError(f"align_lr must be a positive number, got {self.align_lr!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")


@dataclass
class LoramResult:
    """The full model (recovered adapter attached), the training losses on the small copy,
    the base parameter counts (full, pruned) the adapter was trained against, and the
    alignment losses (empty without alignment)."""

    model: nn.Module
    losses: list[float]
    parameters: tuple[int, int]
    align_losses: list[float] = field(default_factory=list)


def loram(
    model: nn.Module, blocks: torch.Tensor, config: LoramConfig | None = None, *, align_blocks: torch.Tensor | None = None
) -> LoramResult:
    """Prune a copy of ``model``, align it on ``align_blocks`` (general text) when
    ``config.align_steps > 0``, train a LoRA on it with ``blocks``, recover it onto ``model``."""
    config = config or LoramConfig()
    if (align_blocks is None) != (config.align_steps == 0):
        raise ConfigError(
            "alignment needs both align_steps > 0 in LoramConfig and align_blocks (general-text "
            "token blocks, e.g. rankwise.data.token_blocks of load_corpus().train); got "
            f"align_steps={config.align_steps} and align_blocks={'given' if align_blocks is not None else None}"
        )
    data = batches_of(blocks, config.batch_size, seed=config.seed)
    if align_blocks is not None:
        batches_of(align_blocks, config.batch_size)  # bad alignment data fails before pruning
    small, prune_map = loram_prune(model, config.ratio, criterion=config.criterion, seed=config.seed)
    sizes = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters()))
    aligned = []
    if align_blocks is not None:
        aligned = align(small, align_blocks, steps=config.align_steps, lr=config.align_lr, batch_size=config.batch_size, seed=config.seed)
    torch.manual_seed(config.seed)
    attach(small, "lora", list(config.targets), rank=config.rank, alpha=config.alpha)
    log = train_adapters(small, data, steps=config.steps, lr=config.lr)
    recover(small, model, prune_map)
    return LoramResult(model, log.losses, sizes, aligned)


__all__ = ["LoramConfig", "LoramResult", "PruneMap", "align", "loram", "loram_prune", "recover"]
