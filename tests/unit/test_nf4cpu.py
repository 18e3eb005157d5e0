"""The direct call into bitsandbytes' CPU 4-bit kernel gives what Linear4bit gives, bit for bit."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from adapterd.engine.lora import BatchedLoraLinear, LoraSlots
from adapterd.engine.nf4cpu import PackedKernel

pytestmark = pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes packs CPU weights only with AVX512-BF16"
)


def _linear4bit(in_features: int, out_features: int, *, bias: bool, quant_type: str = "nf4",
                compute_dtype=torch.float32, seed: int = 0) -> bnb.nn.Linear4bit:
    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                            compress_statistics=True, quant_type=quant_type, device="meta")
    lin.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                   compress_statistics=True, quant_type=quant_type)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(out_features).to(compute_dtype), requires_grad=False)
    lin.weight.module = lin
    return lin.to("cpu").eval()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", [(1, 1), (16, 1), (3, 37)], ids=["one-row", "decode-16", "prefill"])
def test_direct_call_equals_linear4bit(quant_type, bias, shape):
    lin = _linear4bit(128, 96, bias=bias, quant_type=quant_type)
    with torch.inference_mode():
        assert PackedKernel.of(lin) is None, "not packed before the first inference forward"
        x = torch.randn(*shape, 128)
        want = lin(x)  # bitsandbytes packs the weight here
        kernel = PackedKernel.of(lin)
        assert kernel is not None
        got = kernel(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)
        x2 = torch.randn(*shape, 128)
        assert torch.equal(kernel(x2), lin(x2))


def test_bf16_compute_dtype_returns_the_input_dtype():
    lin = _linear4bit(64, 64, bias=True, compute_dtype=torch.bfloat16)
    with torch.inference_mode():
        x = torch.randn(4, 2, 64)
        want = lin(x)
        got = PackedKernel.of(lin)(x)
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want)


def test_not_used_for_training_modules():
    lin = _linear4bit(64, 32, bias=False)
    with torch.inference_mode():
        lin(torch.randn(1, 64))
    lin.train()
    assert PackedKernel.of(lin) is None


def test_lora_layer_follows_the_weight_when_bitsandbytes_unpacks_it():
    """Saving a state dict makes bitsandbytes unpack the weight (new storage): the layer
    must notice, go through the module, and take up the repacked weight after that."""
    lin = _linear4bit(64, 96, bias=True, seed=3)
    layer = BatchedLoraLinear(lin, num_slots=2, max_rank=4)
    slots = LoraSlots({"layer": layer}, 2, 4, torch.device("cpu"))
    layer.set_slot(1, torch.randn(4, 64), torch.randn(96, 4), 0.5)
    slots.set_batch([1, 1])
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        first = layer(x)  # packs; the next call goes direct
        assert layer._kernel is not None
        assert torch.equal(layer(x), first)
        lin.state_dict()  # unpacks into new storage
        assert not layer._kernel.matches(lin)
        again = layer(x)  # through the module, which packs again
        torch.testing.assert_close(again, first, rtol=0.02, atol=0.05)  # bitsandbytes' round trip is not exact
        assert layer._kernel.matches(lin)
        assert torch.equal(layer(x), again)
