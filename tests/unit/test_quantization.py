"""--quantization: the base model in nf4, fp4, int8 or full precision.

Each choice stores every linear layer as it says (Falcon's FalconLinear subclasses too); on
each, the engine with adapters in its slots gives PeftModel's logits and tokens on the same
quantized base (the mixed-batch check of tests/numerics/test_against_peft.py, which runs it
on NF4 for three architectures); the CPU's direct 4-bit kernel call is right for fp4;
training loads the base the same way; a value that is none of them is refused by name.

bitsandbytes 0.50.2 has a CPU path for int8 (LLM.int8: row-wise int8 activations, the
matmul in torch._int_mm on AVX-512, in float32 elsewhere), so int8 is served on the CPU and
tested here like the others. LLM.int8 takes the input columns holding an outlier (|x| >
INT8_THRESHOLD) in any row of a batch out of the int8 matmul for every row, so a row's output
depends on the others in its batch: on int8 a request alone matches PeftModel exactly, and a
mixed batch does with the threshold at 0.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from adapterd.__main__ import build_parser
from adapterd.config import QUANTIZATIONS, Config, ConfigError, ModelConfig
from adapterd.engine import model as model_module
from adapterd.engine import nf4cpu
from adapterd.engine.lora import inject_lora
from adapterd.engine.model import load_base_model
from adapterd.errors import InvalidArgument
from adapterd.registry.validate import read_adapter

from tests.numerics.test_against_peft import (
    CPU,
    PROMPTS,
    _engine_run,
    _peft_reference,
    adapter_set,
    check_mixed_batch_against_peft,
)

LINEAR_TYPES = {
    "nf4": (bnb.nn.Linear4bit, "nf4"),
    "fp4": (bnb.nn.Linear4bit, "fp4"),
    "int8": (bnb.nn.Linear8bitLt, None),
    "none": (torch.nn.Linear, None),
}
SMALL = dict(n_adapters=2, n_prompts=2, new_tokens=6)  # the engine's mechanics are tested on nf4


def _linears(model):
    """Every linear layer but the output head, by name."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@pytest.mark.parametrize("arch", ["llama", "falcon"])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_every_linear_is_stored_as_asked(arch, quantization, model_factory):
    """Llama's through transformers, Falcon's FalconLinear through _quantize_leftover_linears;
    the spec adapters are checked against is the same on each."""
    model, _, spec = load_base_model(model_factory(arch), device=CPU, quantization=quantization)
    _, _, full_spec = load_base_model(model_factory(arch), device=CPU, quantization="none")
    assert spec == full_spec
    cls, quant_type = LINEAR_TYPES[quantization]
    linears = _linears(model)
    assert linears and set(spec.linear_shapes) == set(linears)
    for name, m in linears.items():
        assert isinstance(m, cls), f"{name} is a {type(m).__name__}"
        if quantization == "none":
            assert not isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) and m.weight.dtype == torch.float32
        elif quant_type:
            assert m.weight.quant_state.quant_type == quant_type and m.weight.quant_state.nested, name
        else:
            assert m.weight.dtype == torch.int8, name


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_leftover_linears_are_quantized_as_transformers_does(quantization, model_factory):
    """_quantize_leftover_linears on a full-precision Llama (every linear a leftover) gives the
    logits of transformers' own quantization of it: what Falcon's FalconLinear layers get."""
    base_dir = model_factory("llama")
    ids = torch.tensor([list(PROMPTS[0])])
    by_hand, _, _ = load_base_model(base_dir, device=CPU, quantization="none")
    model_module._quantize_leftover_linears(by_hand, quantization, torch.float32, CPU)
    by_hand.eval()  # the new layers too: a 4-bit layer in training mode is not packed for the CPU kernel
    assert all(isinstance(m, LINEAR_TYPES[quantization][0]) for m in _linears(by_hand).values())
    by_transformers, _, _ = load_base_model(base_dir, device=CPU, quantization=quantization)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(ids).logits, by_transformers(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["fp4", "none"])  # nf4: tests/numerics; int8: below
def test_engine_matches_peft_on_the_same_base(quantization, model_factory, adapter_factory):
    check_mixed_batch_against_peft("llama", model_factory, adapter_factory, CPU, tol=1e-4,
                                   quantization=quantization, **SMALL)


def test_int8_mixed_batch_matches_peft_without_outlier_columns(model_factory, adapter_factory, monkeypatch):
    monkeypatch.setattr(model_module, "INT8_THRESHOLD", 0.0)
    check_mixed_batch_against_peft("llama", model_factory, adapter_factory, CPU, tol=1e-4, quantization="int8",
                                   **SMALL)


def test_int8_request_alone_matches_peft(model_factory, adapter_factory):
    """At the served threshold, each adapter's request in a batch of its own."""
    base_dir = model_factory("llama")
    adapters = adapter_set("llama", base_dir, adapter_factory, 2)
    prompts = [list(p) for p in PROMPTS[:2]]
    ref = _peft_reference(base_dir, adapters, prompts, CPU, "int8", SMALL["new_tokens"])
    for slot, p in ((1, prompts[0]), (2, prompts[1])):
        [(logits, tokens)] = _engine_run(base_dir, adapters, [(slot, p)], CPU, "int8", SMALL["new_tokens"])
        want_logits, want_tokens = ref[(f"a{slot - 1}", tuple(p))]
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert tokens == want_tokens


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes packs CPU weights only with AVX512-BF16")
def test_fp4_direct_kernel_equals_plain_bitsandbytes(model_factory, adapter_factory):
    """The server's CPU path on fp4 (nf4cpu's direct kernel call, after the warm-up packed
    the weights) against transformers' own fp4 model, with and without PEFT's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir = model_factory("llama")
    [adapter] = adapter_set("llama", base_dir, adapter_factory, 1)
    ids = torch.tensor([list(PROMPTS[0])])
    model, _, spec = load_base_model(base_dir, device=CPU, quantization="fp4")
    slots = inject_lora(model, num_slots=2, max_rank=16)
    slots.load(1, read_adapter(adapter, spec, max_rank=16))
    got = {}
    with torch.inference_mode():
        model(ids)  # the warm-up: bitsandbytes packs the weights on the first inference forward
        assert nf4cpu.attach(slots.layers.values()) == len(slots.layers)
        for slot in (0, 1):
            slots.set_batch([slot])
            got[slot] = model(ids).logits

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    peft_model = PeftModel.from_pretrained(plain, adapter).eval()
    with torch.inference_mode():
        want_lora = peft_model(ids).logits
        with peft_model.disable_adapter():
            want_base = peft_model(ids).logits
    assert (want_lora - want_base).abs().max() > 1e-2, "the adapter changes nothing"
    torch.testing.assert_close(got[0], want_base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want_lora, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", ["fp4", "int8", "none"])  # nf4: tests/training
def test_training_loads_and_learns_on_each(quantization, model_factory):
    from adapterd.training.spec import TrainingSpec
    from adapterd.training.worker import prepare_model

    spec = TrainingSpec(name="t", rank=4, alpha=8, dropout=0.0)
    model, _ = prepare_model(model_factory("llama"), spec, CPU, torch.float32, quantization)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, LINEAR_TYPES[quantization][0])
    ids = torch.tensor([list(b"def mean(xs): return sum(xs) / len(xs)")])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_a_value_that_is_no_quantization_is_refused_by_name(model_factory, capsys):
    with pytest.raises(ConfigError, match=r"--quantization must be one of nf4, fp4, int8, none; got 'int4'"):
        ModelConfig(quantization="int4")
    with pytest.raises(InvalidArgument, match=r"--quantization must be one of nf4, fp4, int8, none; got 'int4'"):
        load_base_model(model_factory("llama"), device=CPU, quantization="int4")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int4"])
    assert "--quantization: invalid choice: 'int4'" in capsys.readouterr().err


def test_the_flag_and_its_old_alias(capsys):
    def parsed(*flags):
        return Config.from_args(build_parser().parse_args(["serve", *flags])).model.quantization

    assert parsed() == "nf4"
    assert parsed("--quantization", "fp4") == "fp4"
    assert parsed("--quantization", "int8") == "int8"
    assert parsed("--no-quantize") == "none"
    assert parsed("--quantization", "fp4", "--no-quantize") == "none"  # the later flag wins
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--quantization {nf4,fp4,int8,none}" in usage
    assert "--no-quantize the same as --quantization none" in usage
