"""The direct call into bitsandbytes' CPU 4-bit kernel gives what Linear4bit gives, bit for bit."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from adapterd.engine import nf4cpu
from adapterd.engine.lora import BatchedLoraLinear, LoraSlots, SiblingGroup, reference_forward
from adapterd.engine.nf4cpu import FusedKernel, PackedKernel

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
        first = layer(x)  # packs
        assert nf4cpu.attach([layer]) == 1  # the next call goes direct
        assert layer._kernel is not None
        assert torch.equal(layer(x), first)
        lin.state_dict()  # unpacks into new storage
        assert not layer._kernel.matches(lin)
        again = layer(x)  # through the module, which packs again
        torch.testing.assert_close(again, first, rtol=0.02, atol=0.05)  # bitsandbytes' round trip is not exact
        assert layer._kernel.matches(lin)
        assert torch.equal(layer(x), again)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(1, 1), (16, 1), (3, 37)], ids=["one-row", "decode-16", "prefill"])
def test_fused_siblings_equal_each_linear4bit_and_share_its_weight(quant_type, shape):
    lins = [_linear4bit(128, n, bias=bias, quant_type=quant_type, seed=s)
            for s, (n, bias) in enumerate([(96, False), (32, True), (64, False)])]
    with torch.inference_mode():
        x = torch.randn(*shape, 128)
        want = [lin(x) for lin in lins]  # packs each weight
        fused = FusedKernel.of(lins)
        assert fused is not None
        got = fused(x)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.is_contiguous() and torch.equal(g, w)
        for lin in lins:  # each module reads its rows of the one fused weight, not a copy
            assert _storage(lin.weight.data) == _storage(fused.weight)
        assert fused.matches(lins)
        x2 = torch.randn(*shape, 128)
        assert all(torch.equal(g, lin(x2)) for g, lin in zip(fused(x2), lins, strict=True)), \
            "the modules' own forward reads the shared weight"
        lins[1].state_dict()  # bitsandbytes unpacks one member
        assert not fused.matches(lins)


def test_fused_kernel_refuses_what_one_call_cannot_take():
    a, b = _linear4bit(128, 64, bias=False), _linear4bit(64, 64, bias=False, seed=1)
    with torch.inference_mode():
        a(torch.randn(1, 128))
        b(torch.randn(1, 64))
        assert FusedKernel.of([a, b]) is None, "different input sizes"
        assert FusedKernel.of([a]) is None, "nothing to fuse"
    c = _linear4bit(128, 64, bias=False, seed=2)
    assert FusedKernel.of([a, c]) is None, "c is not packed yet"


class _Attention(torch.nn.Module):
    """q/k/v siblings, called the way the model families in lora.FUSED_SIBLINGS call them."""

    def __init__(self, same_input: bool = True):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (_linear4bit(64, n, bias=False, seed=s)
                                                 for s, n in enumerate((64, 32, 32)))
        self.same_input = same_input

    def forward(self, x):
        x2 = x if self.same_input else x * 2
        return torch.cat([self.q_proj(x), self.k_proj(x2), self.v_proj(x)], -1)


@pytest.mark.parametrize("same_input", [True, False], ids=["fused", "different-inputs"])
def test_sibling_layers_with_lora_give_the_unfused_output(same_input):
    from adapterd.engine.lora import inject_lora

    torch.manual_seed(5)
    plain = _Attention(same_input).eval()
    ref = _Attention(same_input).eval()  # the same weights (same seeds), never fused
    slots = inject_lora(plain, num_slots=2, max_rank=4)
    for layer in slots.layers.values():
        layer.set_slot(1, torch.randn(4, 64), torch.randn(layer.out_features, 4), 0.5)
    slots._plan = slots._held = None
    slots.set_batch([1, 0, 1])
    group = slots.layers["q_proj"]._siblings
    assert group is slots.layers["v_proj"]._siblings

    def want(x):
        outs = []
        for name, lin in (("q_proj", ref.q_proj), ("k_proj", ref.k_proj), ("v_proj", ref.v_proj)):
            layer = slots.layers[name]
            xi = x * 2 if (name == "k_proj" and not same_input) else x
            a, b = layer.lora_a[1, :4], layer.lora_b[1, :4].T  # scale folded into B
            outs.append(reference_forward(lin, xi, [(a, b, 1.0), None, (a, b, 1.0)]))
        return torch.cat(outs, -1)

    with torch.inference_mode():
        for step in range(6):
            if step == 1:  # the first forward packed the weights
                assert nf4cpu.attach(slots.layers.values()) == 3
            x = torch.randn(3, 1 if step else 5, 64)
            torch.testing.assert_close(plain(x), want(x), rtol=1e-5, atol=1e-5)
        if same_input:
            assert group._fused is not None and group._misses == 0
        else:  # k's output was computed for x and never claimed: the group stopped fusing
            assert group._misses == SiblingGroup.MAX_MISSES and group.output(0, x) is None
        if same_input:
            plain.k_proj.base.state_dict()  # unpacked: the group falls back, then fuses again
            for _ in range(3):
                x = torch.randn(3, 1, 64)
                torch.testing.assert_close(plain(x), want(x), rtol=0.02, atol=0.05)  # the round trip is not exact
            assert group._fused is not None and group._fused.matches([m.base for m in group.members])


def test_attach_falls_back_when_bitsandbytes_lacks_the_symbol(monkeypatch, caplog):
    """A bitsandbytes that renamed its kernel must not stop the server: every layer keeps
    the module's own path, with a log line, and the output is the module's."""
    lin = _linear4bit(64, 32, bias=False, seed=4)
    layer = BatchedLoraLinear(lin, num_slots=2, max_rank=4)
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        want = lin(x)  # packs

        def missing(quant_type):
            raise AttributeError(f"gemv_4bit_inference_cpu_{quant_type}_bf16")

        monkeypatch.setattr(nf4cpu, "_kernel", missing)
        assert nf4cpu.attach([layer]) == 0
        assert not layer._direct and "not used" in caplog.text
        assert torch.equal(layer(x), want)


def test_attach_refuses_a_kernel_that_is_not_bit_equal(monkeypatch):
    lin = _linear4bit(64, 32, bias=False, seed=6)
    layer = BatchedLoraLinear(lin, num_slots=2, max_rank=4)
    with torch.inference_mode():
        lin(torch.randn(1, 64))
        real = PackedKernel.__call__
        monkeypatch.setattr(PackedKernel, "__call__", lambda self, x: real(self, x) + 1e-3)
        assert nf4cpu.attach([layer]) == 0
        assert layer._kernel is None
