"""Weighted mixing of LoRA adapters on one request, against PEFT's add_weighted_adapter:
linear (0.7/0.3) and cat, in one batch beside the adapters alone; weights 1/0 equal the
first adapter alone; other kinds and unequal ranks are refused with what to do."""

from __future__ import annotations

import pytest
import torch
from adapterd import errors
from adapterd.engine.generate import Request
from adapterd.engine.lora import inject_lora
from adapterd.engine.mixing import combine
from adapterd.engine.model import load_base_model
from adapterd.engine.paged import PagedGenerator
from adapterd.engine.sampling import SamplingParams
from adapterd.registry.validate import read_adapter

from tests.engine_runs import greedy_by_forward, run_to_end

PROMPT = list(b"def mean(xs):")
NEW_TOKENS = 6


def _peft_mix(base, dirs, weights, combination):
    """PEFT: both adapters loaded, add_weighted_adapter, the mix active: first logits and greedy tokens."""
    from peft import PeftModel

    model, _, _ = load_base_model(base)
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name="a0")
    peft_model.load_adapter(dirs[1], adapter_name="a1")
    peft_model.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type=combination)
    peft_model.set_adapter("mix")
    peft_model.eval()
    return greedy_by_forward(peft_model, PROMPT, NEW_TOKENS)


def _engine(base, weights_by_slot):
    model, tokenizer, spec = load_base_model(base)
    slots = inject_lora(model, num_slots=len(weights_by_slot) + 1, max_rank=32)
    for slot, w in enumerate(weights_by_slot, start=1):
        slots.load(slot, w)
    gen = PagedGenerator(model, tokenizer, slots, kv_cache_bytes=4 * 2**20, eos_token_ids=set())
    reqs = [Request(str(s), PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS), s) for s in range(1, len(weights_by_slot) + 1)]
    got = run_to_end(gen, reqs)
    return [got[r.id] for r in reqs]


@pytest.fixture(scope="module")
def two(model_factory, adapter_factory):
    base = model_factory("llama")
    dirs = [adapter_factory(base, "llama", seed=41, rank=8, alpha=16), adapter_factory(base, "llama", seed=42, rank=8, alpha=8)]
    _, _, spec = load_base_model(base)
    return base, dirs, [read_adapter(d, spec, 32) for d in dirs]


def test_linear_and_cat_mixes_equal_peft(two):
    base, dirs, (a0, a1) = two
    mixes = [combine([a0, a1], [0.7, 0.3], "linear", 32), combine([a0, a1], [0.7, 0.3], "cat", 32),
             combine([a0, a1], [1.0, 0.0], "linear", 32), a0]
    got = _engine(base, mixes)  # one batch: both mixes, 1/0, and the first adapter alone
    for (logits, tokens), combination in zip(got[:2], ("linear", "cat"), strict=True):
        want_logits, want_tokens = _peft_mix(base, dirs, [0.7, 0.3], combination)
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4, msg=combination)
        assert tokens == want_tokens, combination
    assert (got[0][0] - got[1][0]).abs().max() > 1e-2, "linear and cat must differ (linear has cross terms)"
    assert (got[0][0] - got[3][0]).abs().max() > 1e-2, "the 0.7/0.3 mix must differ from the first adapter"
    torch.testing.assert_close(got[2][0], got[3][0], rtol=1e-5, atol=1e-5)  # 1/0: the first adapter alone
    assert got[2][1] == got[3][1]


def test_cat_is_the_weighted_sum_of_deltas(two):
    _, _, (a0, a1) = two
    mix = combine([a0, a1], [0.7, -0.3], "cat", 32)
    for module, (a, b) in mix.tensors.items():
        want = 0.7 * a0.scaling * a0.tensors[module][1] @ a0.tensors[module][0]
        want = want - 0.3 * a1.scaling * a1.tensors[module][1] @ a1.tensors[module][0]
        torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-6)


def test_mixes_that_cannot_be_built_are_refused(two, model_factory, adapter_factory, kind_adapter_factory):
    base, _, (a0, _) = two
    _, _, spec = load_base_model(base)
    r4 = read_adapter(adapter_factory(base, "llama", seed=43, rank=4, alpha=8), spec, 32)
    with pytest.raises(errors.InvalidArgument, match="ranks \\[4, 8\\]: use combination cat"):
        combine([a0, r4], [0.5, 0.5], "linear", 32)
    with pytest.raises(errors.InvalidArgument, match="rank 12 .* above this server's max rank 8"):
        combine([a0, r4], [0.5, 0.5], "cat", 8)
    ia3 = read_adapter(kind_adapter_factory(base, "llama", "ia3"), spec, 32)
    with pytest.raises(errors.InvalidArgument, match="is of kind ia3; only lora adapters can be mixed"):
        combine([a0, ia3], [0.5, 0.5], "cat", 32)
