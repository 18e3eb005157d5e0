"""Mixed-adapter batches on the NF4 base against PEFT itself, on Llama, Phi and Falcon
(tests/unit/test_quantization.py runs the same check on the other --quantization choices).
Both sides run bitsandbytes' plain 4-bit path (adapterd.engine.model.unpacked), where a
row's float32 result does not depend on the batch it is in.

The PEFT way: first assert the adapters really produce different outputs, then that each
row of a mixed batch equals PeftModel with that row's adapter (logits and greedy tokens).
"""

from __future__ import annotations

import pytest
import torch
from adapterd.engine.generate import Generator, Request
from adapterd.engine.lora import inject_lora
from adapterd.engine.model import load_base_model, unpacked
from adapterd.engine.sampling import SamplingParams
from adapterd.registry.validate import read_adapter

from tests.engine_runs import run_to_end

NEW_TOKENS = 16
PROMPTS = [b"def mean(xs):", b"import numpy as np\n", b"hello", b"SELECT * FROM t WHERE", b"x = [1, 2, 3]"]


CPU = torch.device("cpu")


def _peft_reference(base_dir, adapter_dirs, prompt_ids, device=CPU, quantization="nf4", new_tokens=NEW_TOKENS):
    """PeftModel on its own copy of the base (NF4 unless `quantization` says otherwise): per
    adapter, first-step logits and the greedy tokens of generate()."""
    from peft import PeftModel

    model, _, _ = load_base_model(base_dir, device=device, quantization=quantization)
    unpacked(model)
    model.generation_config.eos_token_id = None  # compare every token; the engine runs with no EOS too
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapter_dirs[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.eval()
    out = {}
    with torch.no_grad():
        for name in names:
            peft_model.set_adapter(name)
            for p in prompt_ids:
                ids = torch.tensor([p], device=device)
                gen = peft_model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    do_sample=False, output_logits=True, return_dict_in_generate=True,
                )
                out[(name, tuple(p))] = (gen.logits[0][0], gen.sequences[0, len(p):].tolist())
    return out


def _engine_run(base_dir, adapter_dirs, rows, device=CPU, quantization="nf4", new_tokens=NEW_TOKENS):
    """Our engine: one mixed batch, rows = [(slot, prompt_ids)]. Returns per row the first
    logits and the generated tokens."""
    model, tokenizer, spec = load_base_model(base_dir, device=device, quantization=quantization)
    unpacked(model)
    slots = inject_lora(model, num_slots=len(adapter_dirs) + 1, max_rank=16)
    for slot, path in enumerate(adapter_dirs, start=1):
        slots.load(slot, read_adapter(path, spec, max_rank=16))
    gen = Generator(model, tokenizer, slots, eos_token_ids=set())  # always new_tokens, as the reference
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=new_tokens), slot) for i, (slot, p) in enumerate(rows)]
    got = run_to_end(gen, reqs)
    return [got[r.id] for r in reqs]


@pytest.mark.parametrize("arch", ["llama", "phi", "falcon"])
def test_mixed_batch_matches_peft(arch, model_factory, adapter_factory):
    check_mixed_batch_against_peft(arch, model_factory, adapter_factory, CPU, tol=1e-4)


def adapter_set(arch, base_dir, adapter_factory, n=3):
    """The first `n` of three adapters that differ in rank, alpha and rsLoRA."""
    return [
        adapter_factory(base_dir, arch, seed=10),
        adapter_factory(base_dir, arch, seed=11, rank=4, alpha=8),
        adapter_factory(base_dir, arch, seed=12, rank=16, alpha=16, use_rslora=True),
    ][:n]


def check_mixed_batch_against_peft(arch, model_factory, adapter_factory, device, tol, quantization="nf4",
                                   n_adapters=3, n_prompts=3, new_tokens=NEW_TOKENS):
    base_dir = model_factory(arch)
    adapter_dirs = adapter_set(arch, base_dir, adapter_factory, n_adapters)
    prompts = [list(p) for p in PROMPTS[:n_prompts]]
    ref = _peft_reference(base_dir, adapter_dirs, prompts, device, quantization, new_tokens)

    # The adapters must really differ, else "each row matches its adapter" proves nothing.
    firsts = [ref[(f"a{i}", tuple(prompts[0]))][0] for i in range(n_adapters)]
    for i in range(n_adapters):
        for j in range(i + 1, n_adapters):
            assert (firsts[i] - firsts[j]).abs().max() > 1e-2, f"adapters {i} and {j} give the same logits"

    # One mixed batch: every adapter, several prompts, interleaved and with the base model.
    rows = [(slot, p) for p in prompts for slot in range(1, n_adapters + 1)]
    got = _engine_run(base_dir, adapter_dirs, rows, device, quantization, new_tokens)
    for (slot, p), (logits, tokens) in zip(rows, got, strict=True):
        want_logits, want_tokens = ref[(f"a{slot - 1}", tuple(p))]
        torch.testing.assert_close(logits.float(), want_logits.float(), rtol=tol, atol=tol)
        assert tokens == want_tokens, f"{arch} {quantization} slot {slot} prompt {bytes(p)!r}"
