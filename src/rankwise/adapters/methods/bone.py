"""Bone: block affine adaptation, with PEFT's MiSS format (Bone's successor) both ways.

"Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large
Language Models" (Kang 2024; later versions renamed it DiSHA, then MiSS, "Matrix Shard
Sharing"). The weight ``W (out, in)`` is cut into ``b × b`` blocks ``W_ij`` (``b`` = ``rank``,
PEFT's ``r``). Three variants, one trainable tensor ``bone_block`` each:

- ``variant="bat"`` (default; the paper's "Weight Guide"): one ``b × b`` matrix ``B_i`` per
  row of blocks, ``ΔW_ij = W_ij B_i + B_i = (W_ij + I) B_i``, so the original weights
  steer the update all through training. ``bone_block`` is ``(out/b, b, b)``: ``out·b``
  parameters. ``b`` must divide both ``out`` and ``in``.
- ``variant="miss"`` (PEFT's default): one shared ``(b, out)`` shard ``D``;
  ``ΔW[:, c] = D[c mod b, :]`` (the shard tiled along the input), so
  ``Δ(x) = Dᵀ Σ_j x_j`` with ``x_j`` the ``b``-wide input chunks (the last one zero-padded).
  ``b·out`` parameters, any ``b ≤ in``.
- ``variant="mini"``: the shard is ``(b, mini_r)``, repeated ``out/mini_r`` times along the
  output: ``b·mini_r`` parameters; ``mini_r`` must divide ``out``.

Everything is scaled by ``s = alpha / rank`` (1 by default, as in PEFT, which has no scale).
``bone_block`` starts at zero, so the model starts unchanged. On disk in PEFT's format the
tensor is ``<path>.miss_block`` (times ``s``) with ``peft_type="MISS"`` and
``init_weights`` = ``True`` / ``"bat"`` / ``"mini"``. Linear and transformers ``Conv1D``
layers only (PEFT's MiSS: ``nn.Linear`` only).

Cost: ``miss``/``mini`` add one ``(tokens, b) × (b, out)`` product to the layer (cheaper
than LoRA). ``bat``'s ``ΔW`` is dense by construction (no factorisation of ``(W_ij + I)
B_i``), so its step costs a second dense matmul, as PEFT's ``bat`` does.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.adapters.base import Adapter, AdapterConfig, LayerView, register_method
from rankwise.errors import ConfigError

VARIANTS = ("bat", "miss", "mini")
_PEFT_INIT = {"bat": "bat", "miss": True, "mini": "mini"}


def divisors(n: int, *, limit: int = 12) -> list[int]:
    """The divisors of ``n`` (at most ``limit`` of them, smallest first), for error messages."""
    return [d for d in range(1, n + 1) if n % d == 0][:limit]


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Bone options: ``rank`` is the block size ``b``; ``variant`` "bat" | "miss" | "mini";
    ``mini_r`` the output width of the "mini" shard."""

    variant: str = "bat"
    mini_r: int = 1

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.mini_r < 1:
            raise ConfigError(f"mini_r must be a positive integer, got {self.mini_r!r}")


class WeightGuidedMerge(abc.ABC):
    """Merging for methods whose ``ΔW`` reads the base weight (Bone's ``bat``, Hydra).

    The engine restores ``W`` on unmerge by subtracting the merge terms again; once merged,
    the weight holds ``W + ΔW``, so ``ΔW`` must not be recomputed from it. The delta is
    computed once at merge time and returned unchanged while merged (and by
    ``delta_weight``). Mix in before :class:`Adapter` and define ``fresh_delta_weight``.
    """

    _merged_delta: torch.Tensor | None = None

    @abc.abstractmethod
    def fresh_delta_weight(self) -> torch.Tensor:
        """``ΔW`` computed from the current weight (what ``delta_weight`` returns unmerged)."""

    def delta_weight(self) -> torch.Tensor:
        if self.merged and self._merged_delta is not None:
            return self._merged_delta
        return self.fresh_delta_weight()

    def merge_terms(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not self.merged:
            self._merged_delta = self.fresh_delta_weight().detach()
        return None, self._merged_delta


def chunk_sum(x: torch.Tensor, b: int) -> torch.Tensor:
    """``Σ_j x_j`` over the ``b``-wide chunks of the last dimension (zero-padded): ``(..., b)``."""
    pad = (-x.shape[-1]) % b
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // b, b).sum(dim=-2)  # (..., n_chunks, b) -> (..., b)


def block_affine(w: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``ΔW`` with ``ΔW_ij = W_ij B_i + B_i`` for ``W (out, in)`` and ``blocks (out/b, b, b)``."""
    nb_out, b, _ = blocks.shape
    nb_in = w.shape[1] // b
    wb = w.reshape(nb_out, b, nb_in, b).permute(0, 2, 1, 3)  # (out/b, in/b, b, b): W_ij
    d = torch.matmul(wb, blocks[:, None]) + blocks[:, None]
    return d.permute(0, 2, 1, 3).reshape(w.shape)


@register_method("bone")
class BoneAdapter(WeightGuidedMerge, Adapter):
    """Block affine ``ΔW_ij = W_ij B_i + B_i`` ("bat") or a tiled shared shard ("miss", "mini")."""

    peft_type = "MISS"
    peft_suffixes = ("miss_block",)
    summary = "Bone/MiSS: block-affine update W_ij·B_i + B_i, or a shared shard tiled (Kang 2024); PEFT MiSS format"
    config_class = BoneConfig

    @classmethod
    def check_layer(cls, layer: LayerView, config: BoneConfig) -> str | None:
        out, inp, b = layer.out_features, layer.in_features, config.rank
        if layer.kind not in ("linear", "transposed_linear"):
            return (
                f"bone adapts the blocks of a weight matrix: {type(layer.module).__name__} is not "
                "supported (valid: nn.Linear, transformers Conv1D)"
            )
        if config.variant == "bat":
            if out % b or inp % b:
                return (
                    f"variant='bat' needs the block size rank={b} to divide out={out} and "
                    f"in={inp}; valid ranks here: {divisors(math.gcd(out, inp))}"
                )
            if layer.is_quantized:
                return f"variant='bat' reads the base weight, but it is quantized ({layer.weight.dtype})"
        elif b > inp:
            return f"rank={b} (the shard height) exceeds in={inp}; valid ranks: 1..{inp}"
        if config.variant == "mini" and out % config.mini_r:
            return (
                f"variant='mini' needs mini_r={config.mini_r} to divide out={out}; "
                f"valid mini_r here: {divisors(out)}"
            )
        return None

    def _block_shape(self) -> tuple[int, ...]:
        b, out = self.config.rank, self.layer.out_features
        return {
            "bat": (out // b, b, b),
            "miss": (b, out),
            "mini": (b, self.config.mini_r),
        }[self.config.variant]

    def build(self) -> None:
        shape, dev = self._block_shape(), self.layer.device
        self.bone_block = nn.Parameter(torch.empty(shape, device=dev, dtype=self.param_dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bone_block)

    # -- the shard variants: Δ(x) = s · Dᵀ Σ_j x_j
    def _shard(self) -> torch.Tensor:
        """The ``(b, out)`` shard ``D`` of "miss"/"mini"."""
        if self.config.variant == "mini":
            return self.bone_block.repeat(1, self.layer.out_features // self.config.mini_r)
        return self.bone_block

    def _bat_delta(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.layer.weight_matrix().detach().to(dtype)
        return block_affine(w, self.bone_block.to(dtype))

    def delta(self, x: torch.Tensor, base: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.config.variant == "bat":
            return F.linear(x, self._bat_delta(x.dtype)) * self.scaling
        return F.linear(chunk_sum(x, self.config.rank), self._shard().t()) * self.scaling

    def compose(
        self, y: torch.Tensor, x: torch.Tensor, base: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if self.config.variant == "bat":  # one fused y + s·x ΔWᵀ
            return self.layer.add_projected(y, x, self._bat_delta(x.dtype), self.scaling)
        h = chunk_sum(x, self.config.rank)
        return self.layer.add_projected(y, h, self._shard().t(), self.scaling)

    def dense_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.config.variant != "bat" or self.layer.kind != "linear":
            return None
        return self._bat_delta(self.dtype) * self.scaling

    def fresh_delta_weight(self) -> torch.Tensor:
        if self.config.variant == "bat":
            return self._bat_delta(torch.float32) * self.scaling
        cols = torch.arange(self.layer.in_features, device=self.bone_block.device)
        return self._shard().float().t()[:, cols % self.config.rank] * self.scaling

    # -- PEFT's MiSS format (peft_type "MISS"); its tensor carries the scale
    def peft_config(self) -> dict[str, Any] | None:
        if self.layer.kind != "linear":
            return None
        c = self.config
        return {
            "peft_type": "MISS",
            "r": c.rank,
            "mini_r": c.mini_r,
            "miss_dropout": float(c.dropout),
            "init_weights": _PEFT_INIT[c.variant],
            "bias": "none",
        }

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.bone_block.detach() * self.scaling}

    def peft_to_native(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"bone_block": tensors["miss_block"].reshape(self.bone_block.shape) / self.scaling}

    @classmethod
    def options_from_peft(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """rankwise options for a PEFT ``MissConfig`` (``peft_type == "MISS"``)."""
        if cfg.get("bias", "none") != "none":
            raise ConfigError(f"MiSS bias={cfg['bias']!r} is not supported (only 'none')")
        init = cfg.get("init_weights", True)
        variants = {True: "miss", False: "miss", "bat": "bat", "mini": "mini"}
        if init not in variants:
            raise ConfigError(f"MiSS init_weights={init!r} is unknown; valid: True, 'bat', 'mini'")
        return {
            "rank": cfg.get("r", 64),
            "variant": variants[init],
            "mini_r": cfg.get("mini_r", 1),
            "dropout": cfg.get("miss_dropout", 0.0) or 0.0,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.config.variant}"
