"""A direct call into bitsandbytes' CPU 4-bit kernel, for weights bitsandbytes has packed.

On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first
inference forward and from then on runs every call through one C kernel. Around that kernel
each call passes through Linear4bit.forward, matmul_4bit, the torch.ops dispatcher and a
Python kernel that re-derives the quant type from a tensor and builds ctypes arguments:
about 55 µs a call, against 8-70 µs for the kernel itself on the demo model, 28 calls a
decode step. `PackedKernel` makes the same kernel call with the same bf16 operands (so the
output is bit for bit what Linear4bit returns) and nothing else.

`PackedKernel.of(module)` returns None wherever this does not apply (GPU, no AVX512-BF16,
weight not packed yet, training); callers then use the module itself.
"""

from __future__ import annotations

import ctypes as ct

import torch

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


class PackedKernel:
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
        """Still the module's current weight (bitsandbytes unpacks it to save a state dict)."""
        return module.weight.data_ptr() == self._weight_ptr

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in)
        m = a.shape[0]
        out = torch.empty((m, self.out_features), dtype=torch.bfloat16)  # (M, out)
        self._fn(m, self.out_features, self.in_features, a.data_ptr(), self._weight_ptr,
                 self._absmax_ptr, out.data_ptr(), self.blocksize, a.stride(0), out.stride(0))
        y = out.to(self.dtype)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
