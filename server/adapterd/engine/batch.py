"""KV-cache batch operations for continuous batching: keep rows, merge groups.

A running batch is a DynamicCache of (B, H, L, D) keys/values per layer plus a left-padded
attention mask (B, L): 1 where a row has a real token, 0 for padding. Rows keep their own
position ids, so padding never shifts positions. Merging a newly prefilled group pads the
shorter side on the left; dropping rows trims columns that became padding for every row.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVBatch:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # (B, L) long

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
