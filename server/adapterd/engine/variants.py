"""What DoRA needs of the base model: its weight as the forward uses it, and the per-output
scale m / ||W + scaling * B A|| (PEFT's DoRA), computed once when an adapter is put in a
slot, never per step.

PEFT dequantizes the base weight with bitsandbytes on every DoRA forward. On a CPU with
AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first inference forward
(another layout, absmax in bfloat16), and that dequantization then reads the packed bytes
as if they were not: `dense_weight` reads the packed layout itself.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterd import errors


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight of an nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        return _unpack_cpu_4bit(weight.data, state)
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base).detach().to(torch.float32)
    return weight.detach().to(torch.float32)


def _unpack_cpu_4bit(packed: torch.Tensor, state, block_n: int = 32) -> torch.Tensor:
    """bitsandbytes' CPU packing (functional._convert_weight_packed_for_cpu) read back: codes
    (N, K/2) in blocks of `block_n` output rows, 32 low and 32 high nibbles to a group, and
    absmax (K / blocksize, N) in bfloat16."""
    n, k_half = packed.shape
    k = 2 * k_half
    groups = packed.reshape(-1, 32)
    codes = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # (-1, 64)
    codes = codes.reshape(n // block_n, k_half, block_n, 2).transpose(1, 2).reshape(n, k)  # (N, K)
    table = state.code.to(torch.float32)
    absmax = state.absmax.to(torch.float32).T  # (N, K / blocksize)
    w = table[codes.long()].view(n, k // state.blocksize, state.blocksize) * absmax[:, :, None]
    return w.view(n, k)


def dora_scale(base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor, name: str) -> torch.Tensor:
    """m / ||W + scaling * B A|| per output feature, (out,) float32 on the CPU."""
    w = dense_weight(base).cpu()
    norm = torch.linalg.norm(w + scaling * (b @ a), dim=1)  # (out,)
    scale = magnitude / norm
    if not torch.isfinite(scale).all():
        raise errors.InvalidAdapter(
            f"module {name}: the DoRA weight norm ||W + scaling * B A|| is zero for some output, so its "
            "magnitude scale is not finite"
        )
    return scale
