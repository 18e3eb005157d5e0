"""The batched LoRA layer against the plain row-by-row reference."""

from __future__ import annotations

import pytest
import torch
from adapterd.engine.lora import BatchedLoraLinear, LoraSlots, reference_forward
from torch import nn


def _slots_for(layer: BatchedLoraLinear, gathered: bool) -> LoraSlots:
    return LoraSlots({"layer": layer}, layer.lora_a.shape[0], layer.lora_a.shape[2], torch.device("cpu"),
                     gather_budget_bytes=2**40 if gathered else 0)


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "segments"])
@pytest.mark.parametrize("ranks", [(1, 4, 8), (16, 16, 16), (2, 32, 7)])
@pytest.mark.parametrize("seq_len", [1, 5])
def test_batched_layer_matches_reference(gathered, ranks, seq_len):
    torch.manual_seed(0)
    base = nn.Linear(48, 96)
    layer = BatchedLoraLinear(base, num_slots=len(ranks) + 1, max_rank=32)
    slots = _slots_for(layer, gathered)
    adapters = {}
    for slot, r in enumerate(ranks, start=1):
        a, b, scale = torch.randn(r, 48), torch.randn(96, r), 0.5 + slot
        layer.set_slot(slot, a, b, scale)
        adapters[slot] = (a, b, scale)
    row_slots = [0, 1, 1, 2, 3, 3, 3]  # sorted by slot, as the engine keeps rows
    x = torch.randn(len(row_slots), seq_len, 48)
    slots.set_batch(row_slots)
    with torch.no_grad():
        got = layer(x)
        want = reference_forward(base, x, [adapters.get(s) for s in row_slots])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32, sums of ~1500 products


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "segments"])
def test_unloaded_slots_equal_base_layer(gathered):
    torch.manual_seed(1)
    base = nn.Linear(32, 64)
    layer = BatchedLoraLinear(base, num_slots=3, max_rank=8)
    slots = _slots_for(layer, gathered)
    layer.set_slot(1, torch.randn(8, 32), torch.randn(64, 8), 2.0)
    layer.set_slot(2, torch.randn(4, 32), torch.randn(64, 4), 1.0)
    x = torch.randn(4, 3, 32)
    slots.set_batch([1, 1, 2, 2])
    with torch.no_grad():
        assert not torch.allclose(layer(x), base(x)), "a loaded adapter must change the output"
        layer.set_slot(1, None, None, 0.0)
        layer.set_slot(2, None, None, 0.0)
        assert torch.count_nonzero(layer.lora_a) == 0 and torch.count_nonzero(layer.lora_b) == 0
        slots._plan = None  # the slot table re-plans after load/unload; mimic it here
        slots.set_batch([1, 1, 2, 2])
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_slot_zero_is_reserved_and_batch_plan_is_reused():
    base = nn.Linear(8, 32)
    layer = BatchedLoraLinear(base, num_slots=2, max_rank=4)
    slots = LoraSlots({"m": layer}, 2, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="slot 0"):
        slots.unload(0)
    slots.set_batch([0, 1])
    plan = slots._plan
    slots.set_batch([0, 1])
    assert slots._plan is plan, "an unchanged batch must not be gathered again"
