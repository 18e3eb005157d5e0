"""Attention over the paged KV cache, for a flat run of tokens from many rows.

A step's forward takes one run of T tokens, (1, T): first the decode rows (one token each),
then prompt chunks (several tokens of one row each). Every layer's attention, registered
with transformers as ATTN_IMPLEMENTATION, does:

    write   the run's new K, V (after RoPE) into the pool at each token's slot
    decode  each decode token attends to its row's keys 0..position, read in place from the
            pool: the C kernel (native.py) on the CPU in float32; elsewhere a gather of the
            rows' blocks into a padded batch for SDPA
    chunks  each chunk gathers its row's keys 0..last position (one row: small next to the
            chunk's own compute) and runs SDPA with a causal mask offset by the chunk's start;
            a first chunk attends to its own keys only and needs no gather at all

`reference_attention` is the oracle: per token, softmax(q . K^T) V over that row's keys.
transformers builds no mask for an implementation it does not know, which is what we want:
the run has no padding, and each row's extent comes from its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapterd.engine.prompts import PrefixKV

ATTN_IMPLEMENTATION = "adapterd_paged"
STEP_KWARG = "adapterd_step"  # the forward kwarg that carries a StepAttention to every layer


@dataclass
class Chunk:
    start: int  # first token of the chunk in the run
    length: int
    first_position: int  # the row's position of that token
    key_slots: torch.Tensor | None  # (first_position + length,) long: slots of keys 0..last
    mask: torch.Tensor | None  # (length, first_position + length) bool; None for a first chunk


@dataclass
class StepAttention:
    """What every layer needs about this step's run; built once per step (generator)."""

    k_pool: torch.Tensor  # (layers, slots, kv_heads, dim)
    v_pool: torch.Tensor
    block_size: int
    slot_mapping: torch.Tensor  # (T,) long: where each token's K, V go
    num_decode: int  # tokens [0, num_decode) are decode rows
    tables: torch.Tensor  # int32: the decode rows' block tables, back to back
    table_start: torch.Tensor  # (num_decode,) int64
    context: torch.Tensor  # (num_decode,) int32: keys each decode row attends to
    max_context: int
    chunks: list[Chunk]
    kernel: object | None = None  # native.load().paged_decode, when it applies to this pool
    prefix: PrefixKV | None = None  # prefix-tuning rows' placeholders: their keys and values
    _decode_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # torch path, built once per step

    def decode_gather(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For the torch decode path: (num_decode, max_context) slot ids (padding: slot 0)
        and the matching validity mask, built on first use and shared by every layer."""
        if self._decode_slots is None:
            bs, n = self.block_size, self.max_context
            pos = torch.arange(n)
            rows = []
            tables, starts, ctx = self.tables.tolist(), self.table_start.tolist(), self.context.tolist()
            for start, c in zip(starts, ctx, strict=True):
                table = torch.tensor(tables[start:start + -(-c // bs)], dtype=torch.long)
                p = pos[:c]
                # Padding repeats the row's first key (masked out): a real, finite value,
                # where an unwritten slot of the pool may hold NaN bits.
                slots = torch.full((n,), int(table[0]) * bs, dtype=torch.long)
                slots[:c] = table[p // bs] * bs + p % bs
                rows.append(slots)
            slots = torch.stack(rows).to(device)
            valid = (pos[None, :] < self.context.long()[:, None]).to(device)
            self._decode_slots = (slots, valid)
        return self._decode_slots


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention interface transformers calls per layer: query (1, H, T, D), key and
    value (1, Hkv, T, D). Returns ((1, T, H, D), None)."""
    step: StepAttention = kwargs[STEP_KWARG]
    layer = module.layer_idx
    k_pool, v_pool = step.k_pool[layer], step.v_pool[layer]  # (slots, Hkv, D)
    q = query[0].transpose(0, 1)  # (T, H, D)
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (T, Hkv, D)
    if step.prefix is not None:
        step.prefix.apply(layer, k, v)
    k_pool.index_copy_(0, step.slot_mapping, k.to(k_pool.dtype))
    v_pool.index_copy_(0, step.slot_mapping, v.to(v_pool.dtype))
    t, h, d = q.shape
    scale = scaling if scaling is not None else d**-0.5
    out = torch.empty((t, h, d), dtype=query.dtype, device=query.device)  # (T, H, D)
    nd = step.num_decode
    if nd:
        _decode(step, q[:nd], k_pool, v_pool, out[:nd], scale)
    for c in step.chunks:
        qc = q[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        if c.mask is None:  # a first chunk: its keys are exactly this run's
            kc = k[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)  # (1, Hkv, n, D)
            vc = v[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)
            oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kc = k_pool.index_select(0, c.key_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, Hkv, L, D)
            vc = v_pool.index_select(0, c.key_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scale, enable_gqa=True)
        out[c.start:c.start + c.length] = oc[0].transpose(0, 1)  # (n, H, D)
    return out.unsqueeze(0), None


def _decode(step: StepAttention, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
            out: torch.Tensor, scale: float) -> None:
    """q (nd, H, D) -> out (nd, H, D), each row over its own keys."""
    nd, h, d = q.shape
    kernel = step.kernel
    if kernel is not None:
        qc = q.contiguous()
        kernel(qc.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(),
               step.tables.data_ptr(), step.table_start.data_ptr(), step.context.data_ptr(),
               nd, h, k_pool.shape[1], d, step.block_size, step.max_context, float(scale))
        return
    slots, valid = step.decode_gather(q.device)  # (nd, L)
    kr = k_pool[slots].permute(0, 2, 1, 3).to(q.dtype)  # (nd, Hkv, L, D)
    vr = v_pool[slots].permute(0, 2, 1, 3).to(q.dtype)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kr, vr, attn_mask=valid[:, None, None, :],
                                       scale=scale, enable_gqa=True)  # (nd, H, 1, D)
    out.copy_(o[:, :, 0])


def kernel_applies(pool: torch.Tensor) -> bool:
    """The C kernel reads float32 on the CPU; anything else takes the torch path."""
    return pool.device.type == "cpu" and pool.dtype == torch.float32 and pool.is_contiguous()


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """The oracle for one token: q (H, D) over its row's keys and values (n, Hkv, D)."""
    group = q.shape[0] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, n, D)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    p = torch.softmax((k @ q[:, :, None]).squeeze(-1).float() * scale, dim=-1)  # (H, n)
    return (p.to(v.dtype)[:, None, :] @ v).squeeze(1)  # (H, D)


def register() -> None:
    """Make ATTN_IMPLEMENTATION known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


def supports_paged(model) -> bool:
    """Whether every attention layer of `model` goes through transformers' attention
    interface (Llama, Mistral, Qwen2, Phi, GPT-NeoX, ...). Falcon, for one, does not: it
    is served by the padded engine (generate.py)."""
    import inspect

    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    if not layers:
        return False
    src = inspect.getsource(type(layers[0]).forward)
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src
