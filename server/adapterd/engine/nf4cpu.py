"""A direct call into bitsandbytes' CPU 4-bit kernel, for weights bitsandbytes has packed.

On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first
inference forward and from then on runs every call through one C kernel. Around that kernel
each call passes through Linear4bit.forward, matmul_4bit, the torch.ops dispatcher and a
Python kernel that re-derives the quant type from a tensor and builds ctypes arguments:
about 55 µs a call, against 8-70 µs for the kernel itself on the demo model, 28 calls a
decode step. `PackedKernel` makes the same kernel call with the same bf16 operands (so the
output is bit for bit what Linear4bit returns) and nothing else.

Sibling layers that take the same input (q/k/v, gate/up) are one call: `FusedKernel`
concatenates their packed weights along the output dimension (the kernel computes each
output column on its own, so every member's output is bit for bit its own call's) and
re-points each module's weight at its rows of the concatenation, so nothing is stored twice.
One call instead of three saved 40 µs of 113 at 16 decode rows for q/k/v on the demo model,
31 of 161 for gate/up: the input conversion, the output allocation and the kernel's
thread fork/join, paid once.

`PackedKernel.of(module)` returns None wherever this does not apply (GPU, no AVX512-BF16,
weight not packed yet, training); callers then use the module itself. Likewise
`FusedKernel.of(modules)`.
"""

from __future__ import annotations

import ctypes as ct
import logging

import torch

log = logging.getLogger(__name__)

_ARGTYPES = [ct.c_int64] * 3 + [ct.c_void_p] * 4 + [ct.c_int64] * 3
_kernels: dict[str, object] = {}


def _kernel(quant_type: str):
    """Our own ctypes handle on the library's function, so setting argtypes (which lets the
    call take plain ints) does not touch the handle bitsandbytes itself calls through."""
    if quant_type not in _kernels:
        from bitsandbytes.cextension import lib

        raw = getattr(lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16")
        fn = ct.CFUNCTYPE(None, *_ARGTYPES)(ct.cast(raw, ct.c_void_p).value)
        _kernels[quant_type] = fn
    return _kernels[quant_type]


class _KernelCall:
    """The bf16 call into the kernel, shared by one layer and a fused group of them."""

    in_features: int
    out_features: int
    blocksize: int
    _fn: object
    _weight_ptr: int
    _absmax_ptr: int

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (M, out) bf16
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in)
        m = a.shape[0]
        out = torch.empty((m, self.out_features), dtype=torch.bfloat16)  # (M, out)
        self._fn(m, self.out_features, self.in_features, a.data_ptr(), self._weight_ptr,
                 self._absmax_ptr, out.data_ptr(), self.blocksize, a.stride(0), out.stride(0))
        return out


class PackedKernel(_KernelCall):
    """y = x @ W.T (+ bias) for one packed Linear4bit, through bitsandbytes' C kernel."""

    def __init__(self, module: torch.nn.Module):
        state = module.weight.quant_state
        self.weight = module.weight.data.view(torch.uint8)  # (N, K/2), packed for the kernel
        self.absmax = state.absmax  # bf16, un-nested by the packing
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.blocksize = int(state.blocksize)
        self.bias = module.bias
        self.dtype = module.compute_dtype or torch.float32
        self._fn = _kernel(state.quant_type)
        self._weight_ptr = self.weight.data_ptr()
        self._absmax_ptr = self.absmax.data_ptr()

    @classmethod
    def of(cls, module: torch.nn.Module) -> PackedKernel | None:
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if (
            state is None
            or module.training
            or module.weight.device.type != "cpu"
            or not getattr(state, "packing_format_for_cpu", False)
            or state.absmax.dtype != torch.bfloat16
            or module.compute_dtype not in (None, torch.float32, torch.bfloat16)
            or state.quant_type not in ("nf4", "fp4")
        ):
            return None
        return cls(module)

    def matches(self, module: torch.nn.Module) -> bool:
        """Still the module's current weight. bitsandbytes unpacks it to save a state dict
        (clearing packing_format_for_cpu) and packs it again on its next inference forward,
        always into a new absmax tensor; the quant state's flag and absmax identity tell
        both apart at a third of the cost of the weight's data_ptr (which goes through
        Params4bit's __torch_function__), on every base call of every decode step."""
        state = module.weight.quant_state
        return state.packing_format_for_cpu and state.absmax is self.absmax

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = self._gemm(x).to(self.dtype)  # (M, out)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class FusedKernel(_KernelCall):
    """One kernel call for sibling Linear4bit layers that take the same input."""

    BLOCK_N = 32  # the packed layout interleaves output rows in blocks of 32

    def __init__(self, modules: list[torch.nn.Module], kernels: list[PackedKernel]):
        first = kernels[0]
        self.in_features, self.blocksize, self.dtype = first.in_features, first.blocksize, first.dtype
        self._fn = first._fn
        self.weight = torch.cat([k.weight for k in kernels])  # (N_total, K/2) uint8
        self.absmax = torch.cat([k.absmax for k in kernels], dim=1).contiguous()  # (K/blocksize, N_total)
        self.out_features = int(self.weight.shape[0])
        self.parts: list[tuple[int, int, torch.Tensor | None]] = []  # (offset, out_features, bias)
        offset = 0
        for module, kernel in zip(modules, kernels, strict=True):
            rows = self.weight[offset : offset + kernel.out_features]
            module.weight.data = rows.view(module.weight.data.dtype)  # the module now reads the shared copy
            self.parts.append((offset, kernel.out_features, kernel.bias))
            offset += kernel.out_features
        self.members = [PackedKernel(m) for m in modules]  # on the re-pointed weights
        self._weight_ptr = self.weight.data_ptr()
        self._absmax_ptr = self.absmax.data_ptr()

    @classmethod
    def of(cls, modules: list[torch.nn.Module]) -> FusedKernel | None:
        kernels = [PackedKernel.of(m) for m in modules]
        if len(modules) < 2 or any(k is None for k in kernels):
            return None
        first = kernels[0]
        if any(
            (k.in_features, k.blocksize, k._fn, k.dtype) != (first.in_features, first.blocksize, first._fn, first.dtype)
            or k.out_features % cls.BLOCK_N
            or k.weight.shape != (k.out_features, k.in_features // 2)
            or k.absmax.shape != (k.in_features // k.blocksize, k.out_features)
            for k in kernels
        ):
            return None
        return cls(modules, kernels)

    def matches(self, modules: list[torch.nn.Module]) -> bool:
        """Every member still reads its rows of the shared weight (see PackedKernel.matches)."""
        return all(k.matches(m) for k, m in zip(self.members, modules, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: (..., in) -> per member (..., out_i)
        out = self._gemm(x)  # (M, N_total)
        ys = []
        for offset, n, bias in self.parts:
            y = out[:, offset : offset + n].to(self.dtype)  # (M, n)
            if bias is not None:
                y = y + bias  # a new tensor: y may still be a view into `out`
            y = y.to(x.dtype).contiguous()  # a copy only where y is still that view
            ys.append(y.view(*x.shape[:-1], n))
        return ys


def attach(layers) -> int:
    """The one seam: give every BatchedLoraLinear whose base bitsandbytes has packed the
    direct kernel call, once, after the warm-up forward. The first one is checked against
    the module itself for bit equality; if that fails, or bitsandbytes lacks the symbol
    (a version that renamed it), every layer stays on the module's own path, with one log
    line, and the server serves as before. Returns how many layers were attached."""
    layers = list(layers)
    try:
        attached = [layer for layer in layers if layer.attach_kernel()]
        if attached and not _bit_equal(attached[0]):
            raise RuntimeError("its output differs from Linear4bit's")
    except (AttributeError, OSError, RuntimeError, TypeError) as e:
        for layer in layers:
            layer.detach_kernel()
        log.warning("direct CPU 4-bit kernel not used (%s): bitsandbytes' own path serves", e)
        return 0
    if attached:
        log.info("direct CPU 4-bit kernel: %d of %d layers", len(attached), len(layers))
    return len(attached)


def _bit_equal(layer) -> bool:
    g = torch.Generator().manual_seed(0)
    dtype = layer.base.compute_dtype or torch.float32
    x = torch.randn(3, 1, layer.in_features, generator=g).to(dtype)
    with torch.inference_mode():
        return torch.equal(layer._kernel(x), layer.base(x))
