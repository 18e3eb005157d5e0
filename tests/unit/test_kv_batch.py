"""The growing KV layer: the same tensors as concatenation, written in place."""

from __future__ import annotations

import torch
from adapterd.engine.batch import GROW_MIN, GrowingLayer, KVBatch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _kv(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, n, 4, generator=g), torch.randn(b, 2, n, 4, generator=g)


def test_appends_equal_concatenation_and_reuse_the_buffer():
    grow, plain = GrowingLayer(), DynamicLayer()
    k, v = _kv(3, 5, 0)  # a prefill
    grow.update(k, v)
    plain.update(k, v)
    ptrs = set()
    for step in range(GROW_MIN + 10):  # past the first buffer's room
        k, v = _kv(3, 1, step + 1)
        gk, gv = grow.update(k, v)
        pk, pv = plain.update(k, v)
        assert torch.equal(gk, pk) and torch.equal(gv, pv)
        ptrs.add(gk.data_ptr())
    assert grow.get_seq_length() == 5 + GROW_MIN + 10
    assert len(ptrs) <= 3, "a buffer is reallocated only when its room is used up"


def test_a_replaced_tensor_is_adopted_then_grown():
    layer = GrowingLayer(*_kv(4, 6, 1))
    layer.update(*_kv(4, 1, 2))
    keep = torch.tensor([3, 0])
    layer.keys = layer.keys.index_select(0, keep)  # what KVBatch.select does
    layer.values = layer.values.index_select(0, keep)
    layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]  # and _trim_left
    want_k, want_v = layer.keys.clone(), layer.values.clone()
    k, v = _kv(2, 1, 3)
    gk, gv = layer.update(k, v)
    assert torch.equal(gk, torch.cat([want_k, k], dim=2)) and torch.equal(gv, torch.cat([want_v, v], dim=2))
    ptr = gk.data_ptr()
    assert layer.update(*_kv(2, 1, 4))[0].data_ptr() == ptr  # in place again


def test_kvbatch_converts_plain_layers_only():
    cache = DynamicCache()
    k, v = _kv(2, 3, 5)
    cache.update(k, v, 0)
    batch = KVBatch(cache, torch.ones(2, 3, dtype=torch.long))
    assert type(batch.cache.layers[0]) is GrowingLayer
    assert torch.equal(batch.cache.layers[0].keys, k) and torch.equal(batch.cache.layers[0].values, v)
