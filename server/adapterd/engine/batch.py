"""KV-cache batch operations for continuous batching: keep rows, merge groups.

A running batch is a DynamicCache of (B, H, L, D) keys/values per layer plus a left-padded
attention mask (B, L): 1 where a row has a real token, 0 for padding. Rows keep their own
position ids, so padding never shifts positions. Merging a newly prefilled group pads the
shorter side on the left; dropping rows trims columns that became padding for every row.

Each layer's keys and values are views into buffers with room at the end (`GrowingLayer`):
a decode step writes its new position in place. transformers' DynamicLayer concatenates
instead, which copies the layer's whole cache on every step.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Room a buffer gets past the current length: this many positions, or an eighth of the
# length if that is more (so at most 1/8 of the cache is spare).
GROW_MIN = 64


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends in place. `keys`/`values` stay plain (B, H, L, D) tensors
    that anyone may replace (KVBatch does, to select and merge rows): a replaced tensor is
    copied into a fresh buffer at the next update, once."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None
        if keys is not None:
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_buf = _append(self.keys, self._key_buf, key_states)
        self.values, self._value_buf = _append(self.values, self._value_buf, value_states)
        return self.keys, self.values


def _append(cur: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cur (B, H, L, D) + new (B, H, n, D) along L. Returns (a view of L + n, its buffer)."""
    length = cur.shape[-2] if cur.dim() == 4 else 0  # lazy_initialization leaves an empty 1-D tensor
    total = length + new.shape[-2]
    in_place = (
        buf is not None and length > 0 and cur.data_ptr() == buf.data_ptr() and cur.stride() == buf.stride()
        and cur.shape[:2] == buf.shape[:2] and total <= buf.shape[-2]
    )
    if not in_place:
        b, h, _, d = new.shape
        buf = new.new_empty(b, h, total + max(GROW_MIN, total // 8), d)
        if length:
            buf[:, :, :length].copy_(cur)
    buf[:, :, length:total].copy_(new)
    return buf[:, :, :total], buf


class KVBatch:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # (B, L) long
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer and layer.is_initialized:  # not sliding-window layers
                cache.layers[i] = GrowingLayer(layer.keys, layer.values)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order), then drop all-padding columns."""
        self.mask = self.mask.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self._trim_left()

    def concat(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours, left-padding whichever is shorter."""
        length = max(self.length, other.length)
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(other.mask, length, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])

    def append_step(self) -> torch.Tensor:
        """Extend the mask by the column of the token being decoded now; returns the mask."""
        ones = torch.ones(self.size, 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)  # (B, L + 1)
        return self.mask

    def _trim_left(self) -> None:
        if self.size == 0:
            return
        used = self.mask.any(dim=0)  # (L,)
        first = int(used.int().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
