"""The KV cache of a continuously changing batch: rows join (after their prefill) and leave.

Rows are left-padded to one length: ``mask[i, t]`` is 1 where row ``i`` has a real token.
A new group of rows (prefilled in its own forward pass) is merged in by right-aligning both
parts; finished rows are dropped by index; columns that every row pads are trimmed. Each
layer appends into preallocated room (:class:`AppendLayer`) instead of concatenating the
whole cache at every step as transformers' ``DynamicLayer`` does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class AppendLayer(DynamicLayer):
    """A cache layer with spare room along the sequence axis (doubling when full)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def _set(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self._k, self._v, self.length = k, v, length
        self.keys = k[:, :, :length]
        self.values = v[:, :, :length]
        self.is_initialized = True
        self.device = k.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self._k is None or self._k.shape[0] != key_states.shape[0]:
            if self._k is not None and self.length:
                raise RuntimeError("batch size changed without select/merge")
            room = max(16, 2 * n)
            shape = (*key_states.shape[:2], room, key_states.shape[-1])
            self._set(
                key_states.new_empty(shape), value_states.new_empty(value_states.shape[:2] + (room, value_states.shape[-1])), 0
            )
        if self.length + n > self._k.shape[2]:
            self._grow(self.length + n)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self._set(self._k, self._v, self.length + n)
        return self.keys, self.values

    def _grow(self, need: int) -> None:
        room = max(need, 2 * self._k.shape[2])
        k = self._k.new_empty((*self._k.shape[:2], room, self._k.shape[3]))
        v = self._v.new_empty((*self._v.shape[:2], room, self._v.shape[3]))
        k[:, :, : self.length] = self.keys
        v[:, :, : self.length] = self.values
        self._set(k, v, self.length)

    def get_seq_length(self) -> int:
        return self.length

    def select(self, rows: torch.Tensor) -> None:
        self._set(self._k.index_select(0, rows), self._v.index_select(0, rows), self.length)

    def trim(self, columns: int) -> None:
        """Drop the first ``columns`` positions (padding for every row)."""
        self._set(self._k[:, :, columns:], self._v[:, :, columns:], self.length - columns)

    def merge(self, other: AppendLayer) -> None:
        """Append ``other``'s rows after this layer's, both right-aligned to the longer length."""
        length = max(self.length, other.length)
        room = length + 16
        rows = self._k.shape[0] + other._k.shape[0]
        k = self._k.new_zeros((rows, self._k.shape[1], room, self._k.shape[3]))
        v = self._v.new_zeros((rows, self._v.shape[1], room, self._v.shape[3]))
        b = self._k.shape[0]
        k[:b, :, length - self.length : length] = self.keys
        v[:b, :, length - self.length : length] = self.values
        k[b:, :, length - other.length : length] = other.keys
        v[b:, :, length - other.length : length] = other.values
        self._set(k, v, length)


def new_cache(num_layers: int) -> DynamicCache:
    """An empty cache whose layers are :class:`AppendLayer`."""
    cache = DynamicCache()
    cache.layers = [AppendLayer() for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    return cache


class BatchCache:
    """A cache plus its ``(rows, length)`` attention mask, for a batch whose rows change."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """The position id of each row's next token, ``(rows, 1)``."""
        return self.mask.sum(dim=1, keepdim=True)

    def step_mask(self, new_tokens: int = 1) -> torch.Tensor:
        """The mask to pass when ``new_tokens`` more tokens per row enter; becomes the mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, new_tokens)], dim=1)
        return self.mask

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in that order), then drop columns that are padding for all."""
        for layer in self.cache.layers:
            layer.select(rows)
        self.mask = self.mask.index_select(0, rows)
        self.trim()

    def trim(self) -> None:
        if self.rows == 0:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.mask.shape[1]
        if first > 0:
            for layer in self.cache.layers:
                layer.trim(first)
            self.mask = self.mask[:, first:]

    def merge(self, other: BatchCache) -> None:
        """Add ``other``'s rows after this batch's rows (left-padding the shorter part)."""
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.merge(theirs)
        length = max(self.mask.shape[1], other.mask.shape[1])
        pad = [
            torch.cat([m.new_zeros(m.shape[0], length - m.shape[1]), m], dim=1)
            for m in (self.mask, other.mask)
        ]
        self.mask = torch.cat(pad, dim=0)

    def nbytes(self) -> int:
        return sum(
            layer._k.numel() * layer._k.element_size() * 2
            for layer in self.cache.layers
            if layer._k is not None
        )


__all__ = ["AppendLayer", "BatchCache", "new_cache"]
