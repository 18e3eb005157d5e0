"""The batched LoRA layer against the plain row-by-row reference."""

from __future__ import annotations

import pytest
import torch
from adapterd.engine.lora import BatchedLoraLinear, LoraSlots, reference_forward
from torch import nn


def _slots_for(layer: BatchedLoraLinear, gathered: bool) -> LoraSlots:
    return LoraSlots({"layer": layer}, layer.lora_a.shape[0], layer.lora_a.shape[1], torch.device("cpu"),
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


def _weights(name: str, rank: int, seed: int, scaling: float):
    from adapterd.registry.validate import AdapterWeights

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, 24, generator=g), torch.randn(40, rank, generator=g)
    return AdapterWeights(name=name, sha256=name, rank=rank, alpha=rank * scaling, scaling=scaling,
                          target_modules=["layer"], tensors={"layer": (a, b)}, nbytes=0, config={})


def test_running_batch_stacks_follow_every_change_and_copy_only_changed_rows():
    """The running batch's per-row stacks are updated in place: a joined row, a finished row
    replaced by the last one, a prefill group planned in between, a reload and a rank change
    each give the reference output, and a one-row join copies one row into the same buffer."""
    torch.manual_seed(3)
    base = nn.Linear(24, 40)
    layer = BatchedLoraLinear(base, num_slots=4, max_rank=8)
    slots = _slots_for(layer, gathered=True)
    loaded = {}

    def load(slot, rank, seed):
        w = _weights(f"a{seed}", rank, seed, 0.5 + seed / 10)
        slots.load(slot, w)
        loaded[slot] = (*w.tensors["layer"], w.scaling)

    def check(row_slots, transient=False):
        slots.set_batch(row_slots, transient=transient)
        x = torch.randn(len(row_slots), 1, 24)
        with torch.no_grad():
            got = layer(x)
            want = reference_forward(base, x, [loaded.get(s) for s in row_slots])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return slots._plan

    load(1, 4, 1)
    load(2, 4, 2)
    load(3, 4, 3)
    plan = check([1, 2, 0])
    assert plan.changed is None, "the first batch after a load gathers every row"
    buf = layer._a_buf.data_ptr()
    plan = check([1, 2, 0, 3])  # a row joins at the end
    assert plan.changed == ((3,), (3,)) and plan.changed_index is None, "one row, copied straight"
    assert layer._a_buf.data_ptr() == buf, "a join within capacity must not re-allocate"
    check([2, 3, 1], transient=True)  # a prefill group between two steps
    plan = check([1, 2, 0, 3])  # the running batch again, unchanged: nothing copied
    assert plan.changed == ((), ()) and layer._a_buf.data_ptr() == buf
    plan = check([1, 3, 0])  # row 1 finished; the last row took its place
    assert plan.changed == ((1,), (3,))
    plan = check([2, 1, 3, 0, 1])  # several rows changed at once: the indexed copy
    assert plan.changed == ((0, 1, 2, 3, 4), (2, 1, 3, 0, 1)) and plan.changed_index is not None
    assert layer._a_buf.data_ptr() == buf
    plan = check([1, 3, 0])
    plan = check([1, 3, 0] + [2] * 9)  # past capacity: a larger buffer, every row gathered
    assert layer._a_buf.shape[0] >= 12
    load(2, 8, 4)  # a reload, with a larger rank: the stacks are re-made
    plan = check([1, 3, 0] + [2] * 9)
    assert plan.changed is None
    check([2, 2, 1])
    slots.unload(3)
    loaded.pop(3)
    check([3, 2, 1])


def test_stacks_made_under_no_grad_are_rebuilt_for_inference_mode_and_back():
    torch.manual_seed(4)
    base = nn.Linear(24, 40)
    layer = BatchedLoraLinear(base, num_slots=3, max_rank=8)
    slots = _slots_for(layer, gathered=True)
    w = _weights("x", 8, 5, 2.0)
    slots.load(1, w)
    a, b = w.tensors["layer"]
    x = torch.randn(2, 1, 24)
    with torch.inference_mode():
        slots.set_batch([1, 0])
        want = reference_forward(base, x, [(a, b, 2.0), None])
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an inference tensor cannot be updated in place outside inference mode
        slots.set_batch([1, 0, 1])
        want = reference_forward(base, torch.cat([x, x[:1]]), [(a, b, 2.0), None, (a, b, 2.0)])
        torch.testing.assert_close(layer(torch.cat([x, x[:1]])), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack_dtype", [torch.float32, torch.bfloat16], ids=["f32-stacks", "bf16-stacks"])
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "c-kernel"])
@pytest.mark.parametrize("token_slots", [
    [2, 2, 2, 2],  # one adapter, every token
    [0, 3, 0, 3, 3],  # one adapter beside base tokens (masked)
    [1, 1, 2, 3, 3, 3, 0, 2],  # grouped, unequal counts (padded)
    [1, 2, 3, 1, 2, 3],  # grouped, equal counts
    [1] * 40 + [0] * 3 + [2] * 30 + [3] * 5,  # runs: a run longer than the grouped path takes
], ids=["one", "one-masked", "grouped-padded", "grouped", "runs"])
def test_flat_run_matches_reference_per_token(token_slots, kernel, stack_dtype):
    """The paged engine's flat runs (FlatPlan): each token's output equals the base plus its
    own adapter's delta, whichever path the plan takes (the C kernel for decode-sized runs on
    the CPU, else torch), with ranks that differ per adapter, an adapter that does not touch
    this layer, and stacks in float32 or bfloat16 (the reference then takes the weights as
    the stacks hold them: A and scale * B rounded to bfloat16)."""
    from adapterd.engine import native

    kernels = native.load() if kernel else None
    if kernel and kernels is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    torch.manual_seed(7)
    base = nn.Linear(24, 40)
    layer = BatchedLoraLinear(base, num_slots=5, max_rank=8, stack_dtype=stack_dtype)
    slots = LoraSlots({"l": layer}, 5, 8, torch.device("cpu"), kernels=kernels)
    adapters = {}
    for slot, r in ((1, 8), (2, 3), (3, 5)):
        a, b, scale = torch.randn(r, 24), torch.randn(40, r), 0.5 * slot
        layer.set_slot(slot, a, b, scale)
        held_a, held_sb = a.to(stack_dtype).float(), (b * scale).to(stack_dtype).float()
        adapters[slot] = (held_a, held_sb, 1.0)
    layer.set_slot(4, None, None, 0.0)  # targets other modules only
    x = torch.randn(1, len(token_slots), 24)
    slots.set_tokens(token_slots)
    decode_sized = len(token_slots) <= 64
    assert (layer.flat_path == "kernel") == (kernel and decode_sized), layer.flat_path
    with torch.no_grad():
        got = layer(x)[0]  # (T, out)
        want = reference_forward(base, x[0][:, None, :], [adapters.get(s) for s in token_slots])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and a slot with nothing here adds nothing
        slots.set_tokens([4] * len(token_slots))
        torch.testing.assert_close(layer(x)[0], base(x[0]))


def test_kernel_reads_the_stacks_in_place_after_a_slot_is_replaced():
    """The C kernel takes the stacks' addresses once per plan: a slot loaded anew (a hot
    swap) between two steps is what the next plan's kernel reads."""
    from adapterd.engine import native

    kernels = native.load()
    if kernels is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    torch.manual_seed(3)
    base = nn.Linear(16, 16)
    layer = BatchedLoraLinear(base, num_slots=3, max_rank=4)
    slots = LoraSlots({"l": layer}, 3, 4, torch.device("cpu"), kernels=kernels)
    x = torch.randn(1, 3, 16)
    for trial in range(2):
        a, b = torch.randn(4, 16), torch.randn(16, 4)
        layer.set_slot(1, a, b, 2.0)
        slots.set_tokens([1, 0, 1])
        with torch.no_grad():
            got = layer(x)[0]
            want = reference_forward(base, x[0][:, None, :], [(a, b, 2.0), None, (a, b, 2.0)])[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"trial {trial}")
