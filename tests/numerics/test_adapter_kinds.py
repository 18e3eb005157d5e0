"""Every adapter kind PEFT trains, served in one batch, against PEFT itself, on NF4 Llama,
Phi and Falcon: base, LoRA, DoRA, IA3 and prompt-tuning rows (and prefix tuning where the
paged engine serves the model) in one mixed batch; each row's first logits and greedy
tokens equal PeftModel with that row's adapter alone.

Both sides run bitsandbytes' plain 4-bit path (adapterd.engine.model.unpacked): PEFT's
DoRA dequantizes the base weight on every forward, and on a CPU where bitsandbytes repacks
4-bit weights for its AVX512-BF16 kernel it reads the packed bytes as the unpacked layout
(its outputs there are wrong; see test_dense_weight_reads_packed_layers for ours).
"""

from __future__ import annotations

import pytest
import torch
from adapterd.engine.generate import Generator, Request
from adapterd.engine.lora import inject_lora
from adapterd.engine.model import load_base_model, unpacked
from adapterd.engine.paged import PagedGenerator
from adapterd.engine.sampling import SamplingParams
from adapterd.engine.variants import dense_weight
from adapterd.registry.validate import read_adapter

from tests.engine_runs import greedy_by_forward, run_to_end

NEW_TOKENS = 8
PROMPTS = [list(b"def mean(xs):"), list(b"hello there"), list(b"SELECT * FROM t")]
KINDS = {"llama": ("dora", "ia3", "prompt_tuning", "prefix_tuning"),
         "phi": ("dora", "ia3", "prompt_tuning", "prefix_tuning"),
         "falcon": ("dora", "ia3", "prompt_tuning")}  # Falcon: the padded engine, no prefixes


def _adapters(arch, model_factory, adapter_factory, kind_adapter_factory):
    base = model_factory(arch)
    dirs = {"lora": adapter_factory(base, arch, seed=31)}
    for kind in KINDS[arch]:
        dirs[kind] = kind_adapter_factory(base, arch, kind, seed=32)
    return base, dirs


def _peft_reference(base, path, prompt):
    """PeftModel with the adapter alone (None: the base): first logits and greedy tokens,
    one whole forward per token."""
    from peft import PeftModel

    model, _, _ = load_base_model(base)
    model = unpacked(model)
    if path is not None:
        model = PeftModel.from_pretrained(model, path).eval()
    return greedy_by_forward(model, prompt, NEW_TOKENS)


def _engine_rows(base, dirs, rows):
    """One mixed batch through the engine the model takes; rows = [(kind or None, prompt)]."""
    model, tokenizer, spec = load_base_model(base)
    unpacked(model)
    kinds = list(dirs)
    slots = inject_lora(model, num_slots=len(kinds) + 1, max_rank=16)
    for slot, kind in enumerate(kinds, start=1):
        slots.load(slot, read_adapter(dirs[kind], spec, 16))
    paged = slots.prompt_shape.prefix_tuning
    gen = (PagedGenerator(model, tokenizer, slots, kv_cache_bytes=4 * 2**20, eos_token_ids=set()) if paged
           else Generator(model, tokenizer, slots, eos_token_ids=set()))
    requests = [Request(str(i), p, SamplingParams(max_new_tokens=NEW_TOKENS),
                        0 if kind is None else kinds.index(kind) + 1) for i, (kind, p) in enumerate(rows)]
    got = run_to_end(gen, requests)
    return [got[str(i)] for i in range(len(rows))]


@pytest.mark.parametrize("arch", ["llama", "phi", "falcon"])
def test_mixed_kinds_batch_matches_peft(arch, model_factory, adapter_factory, kind_adapter_factory):
    base, dirs = _adapters(arch, model_factory, adapter_factory, kind_adapter_factory)
    kinds = [None, *dirs]
    ref = {(k, i): _peft_reference(base, dirs.get(k), p) for k in kinds for i, p in enumerate(PROMPTS[:2])}

    # Every adapter must change the outputs, else "each row equals its adapter" proves nothing.
    firsts = {k: ref[(k, 0)][0] for k in kinds}
    for a in kinds:
        for b in kinds:
            if a is not None and a != b:
                assert (firsts[a] - firsts[b]).abs().max() > 1e-2, f"{a} and {b} give the same logits"

    rows = [(k, p) for i, p in enumerate(PROMPTS[:2]) for k in kinds]
    got = _engine_rows(base, dirs, rows)
    for (kind, p), (logits, tokens) in zip(rows, got, strict=True):
        want_logits, want_tokens = ref[(kind, PROMPTS.index(p))]
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4, msg=f"{arch} {kind}")
        assert tokens == want_tokens, f"{arch} {kind} prompt {bytes(p)!r}"


def test_dense_weight_reads_packed_layers(model_factory):
    """DoRA's norms read the base weight; after bitsandbytes repacks a 4-bit layer for its CPU
    kernel (absmax in bfloat16), the weight read back is the one before, to bfloat16's precision."""
    model, _, _ = load_base_model(model_factory("llama"))
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    before = {n: dense_weight(m).clone() for n, m in layers.items()}
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    packed = [n for n, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if not packed:
        pytest.skip("bitsandbytes does not repack 4-bit weights on this CPU")
    for n in packed:
        torch.testing.assert_close(dense_weight(layers[n]), before[n], rtol=2**-8, atol=1e-6)
