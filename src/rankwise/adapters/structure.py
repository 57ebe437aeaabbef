"""Structured pruning of Llama-style decoders, adapters included: heads and MLP channels.

Shared by LoRAPrune (``prune.py``, which picks what to remove from LoRA gradients) and
LoRAM (``loram.py``, which trains on a pruned copy and maps the adapter back). The units:

- an attention **head** is a query head: ``head_dim`` rows of ``q_proj`` and the same
  columns of ``o_proj``. Key/value heads stay (grouped-query attention needs every group to
  keep the same number of query heads, so each group loses the same count);
- an MLP **channel** is one row of ``gate_proj`` and ``up_proj`` and that column of
  ``down_proj``.

Removing a unit really removes rows/columns of the weights (and of LoRA factors on those
layers), so the result is a smaller ``LlamaForCausalLM`` whose config (``num_attention_heads``,
``head_dim``, ``intermediate_size``) says so; every layer keeps the same counts, so the model
saves with ``save_pretrained`` and loads back as a plain Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.adapters.inject import AdaptedLayer, adapted_layers, merge
from rankwise.errors import ConfigError
from rankwise.modules import replace_module

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Block:
    """One decoder layer: its index, path prefix and attention / MLP modules."""

    index: int
    prefix: str
    attn: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class Shape:
    """The prunable sizes of a decoder: query/key-value heads, head size, MLP channels."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _is_linear(parent: nn.Module | None, name: str) -> bool:
    module = getattr(parent, name, None)
    return module is not None and isinstance(_base(module), nn.Linear)


def decoder_blocks(model: nn.Module) -> list[Block]:
    """The decoder layers of a Llama-style model; ConfigError naming what is missing."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ConfigError(
            f"structured pruning needs a Llama-style decoder (model.model.layers[i] with "
            f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj); {type(model).__name__} "
            "has no model.layers"
        )
    blocks = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [f"self_attn.{n}" for n in ATTN if not _is_linear(attn, n)]
        missing += [f"mlp.{n}" for n in MLP if not _is_linear(mlp, n)]
        if missing:
            raise ConfigError(
                f"structured pruning needs Llama-style linear projections; model.layers.{i} has "
                f"no linear {missing}"
            )
        blocks.append(Block(i, f"model.layers.{i}", attn, mlp))
    return blocks


def decoder_shape(model: nn.Module) -> Shape:
    """Head and channel counts, read from the modules (not the config, which may be stale)."""
    block = decoder_blocks(model)[0]
    cfg = model.config
    kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    k_rows = _base(block.attn.k_proj).out_features
    q_rows = _base(block.attn.q_proj).out_features
    if k_rows != kv * head_dim or q_rows % head_dim:
        raise ConfigError(
            f"k_proj has {k_rows} rows, q_proj {q_rows}; expected multiples of head_dim={head_dim} "
            f"with {kv} key/value heads: the config does not describe this model"
        )
    return Shape(q_rows // head_dim, kv, head_dim, _base(block.mlp.up_proj).out_features)


def keep_counts(shape: Shape, ratio: float) -> tuple[int, int]:
    """``(query heads kept per key/value group, MLP channels kept)`` after removing ``ratio``."""
    per_group = max(1, round(shape.group * (1.0 - ratio)))
    return per_group, max(1, round(shape.channels * (1.0 - ratio)))


def top_units(
    shape: Shape, head_scores: torch.Tensor, channel_scores: torch.Tensor, per_group: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the highest-scoring query heads (``per_group`` in each key/value
    group) and MLP channels (``channels``); ties keep the lower index."""
    grouped = head_scores.view(shape.kv_heads, shape.group)
    local = torch.topk(grouped, per_group, dim=1, sorted=False).indices
    heads = (local + torch.arange(shape.kv_heads)[:, None] * shape.group).flatten().sort().values
    kept = torch.topk(channel_scores, channels, sorted=False).indices.sort().values
    return heads, kept


def _lora_pair(path: str, layer: AdaptedLayer) -> None:
    for name, adapter in layer.adapters.items():
        if adapter.lowrank_factors() is None:
            raise ConfigError(
                f"{path}: adapter {name!r} ({adapter.method}) is not a plain LoRA (lora_A, lora_B); "
                "structured pruning slices LoRA factors only; attach method='lora'"
            )
    if layer.merged:
        raise ConfigError(f"{path}: adapters {layer.merged} are merged; unmerge before pruning")


def slice_linear(module: nn.Module, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (output features) / ``cols`` (input features) of a linear layer, in
    place; on an :class:`AdaptedLayer` its LoRA factors are sliced alike (B's rows, A's columns)."""
    base = _base(module)
    w = base.weight.detach()
    if rows is not None:
        w = w[rows]
        if base.bias is not None:
            base.bias = nn.Parameter(base.bias.detach()[rows].clone(), requires_grad=False)
        base.out_features = len(rows)
    if cols is not None:
        w = w[:, cols]
        base.in_features = len(cols)
    base.weight = nn.Parameter(w.clone(), requires_grad=False)
    if not isinstance(module, AdaptedLayer):
        return
    for adapter in module.adapters.values():
        b, a = adapter.lora_B, adapter.lora_A
        if rows is not None:
            adapter.lora_B = nn.Parameter(b.detach()[rows].clone(), requires_grad=b.requires_grad)
        if cols is not None:
            adapter.lora_A = nn.Parameter(a.detach()[:, cols].clone(), requires_grad=a.requires_grad)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The ``q_proj`` rows (= ``o_proj`` columns) of query heads ``heads``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def check_prunable(model: nn.Module) -> None:
    """ConfigError if an adapter on a pruned layer is not a plain, unmerged LoRA."""
    for path, layer in adapted_layers(model).items():
        _lora_pair(path, layer)


def prune_units(model: nn.Module, heads: list[torch.Tensor], channels: list[torch.Tensor]) -> None:
    """Remove every query head / MLP channel not listed (per layer: indices kept), in place,
    and update the config. Every layer must keep the same counts (a Llama config has one)."""
    blocks = decoder_blocks(model)
    shape = decoder_shape(model)
    if len(heads) != len(blocks) or len(channels) != len(blocks):
        raise ConfigError(f"give kept heads and channels for each of the {len(blocks)} layers")
    if len({len(h) for h in heads}) != 1 or len({len(c) for c in channels}) != 1:
        raise ConfigError("every layer must keep the same number of heads and of channels")
    per_group = len(heads[0]) // shape.kv_heads
    if per_group < 1 or len(heads[0]) % shape.kv_heads:
        raise ConfigError(
            f"kept heads must be a multiple of the {shape.kv_heads} key/value heads, got {len(heads[0])}"
        )
    check_prunable(model)
    for block, kept_heads, kept_channels in zip(blocks, heads, channels, strict=True):
        counts = torch.bincount(kept_heads // shape.group, minlength=shape.kv_heads)
        if bool((counts != per_group).any()):
            raise ConfigError(
                f"layer {block.index}: each key/value group must keep {per_group} query heads, "
                f"got {counts.tolist()}"
            )
        rows = head_rows(kept_heads, shape.head_dim)
        slice_linear(block.attn.q_proj, rows=rows)
        slice_linear(block.attn.o_proj, cols=rows)
        block.attn.num_key_value_groups = per_group
        slice_linear(block.mlp.gate_proj, rows=kept_channels)
        slice_linear(block.mlp.up_proj, rows=kept_channels)
        slice_linear(block.mlp.down_proj, cols=kept_channels)
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = len(kept_channels)
    cfg = model.config
    cfg.head_dim = shape.head_dim
    cfg.num_attention_heads = len(heads[0])
    cfg.intermediate_size = len(channels[0])


def bake(model: nn.Module) -> nn.Module:
    """Merge every active adapter into the weights and unwrap the adapted layers: a plain
    model that ``save_pretrained`` writes and Hugging Face loads."""
    merge(model)
    for path, layer in adapted_layers(model).items():
        replace_module(model, path, layer.base_layer, expect=AdaptedLayer)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = [
    "Block",
    "Shape",
    "bake",
    "check_prunable",
    "decoder_blocks",
    "decoder_shape",
    "head_rows",
    "keep_counts",
    "prune_units",
    "slice_linear",
    "top_units",
]
