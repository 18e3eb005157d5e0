"""Prompt and prefix tuning in both engines: virtual tokens as placeholder ids.

PEFT's PeftModelForCausalLM puts an adapter's n virtual tokens before the prompt: they take
positions 0..n-1, the prompt starts at position n, and every prompt token attends to all
of them. Here a row of such an adapter starts with the placeholder ids -1, -2, .., -n in its
token list, so the KV cache, chunked prefill and the prefix cache (its key holds the adapter)
treat them as tokens of the row, and nothing else changes:

    prompt tuning  placeholder -1-i is embedded as the adapter's virtual token i
                   (`inputs_embeds`); the model runs on embeddings for that forward
    prefix tuning  every layer's key and value at those positions are replaced by the
                   adapter's own (`PrefixKV`, applied by the paged attention); what the
                   placeholders embed as is never read by a real token

The usage a caller sees counts the prompt's own tokens, not the virtual ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from adapterd_rules import PromptShape

from adapterd import errors


def placeholders(n: int) -> list[int]:
    return [-1 - i for i in range(n)]


@dataclass
class Virtual:
    """A slot's virtual tokens, on the model's device in its dtype."""

    kind: str  # "prompt_tuning" | "prefix_tuning"
    embeds: torch.Tensor | None  # prompt tuning: (n, hidden)
    kv: torch.Tensor | None  # prefix tuning: (layers, 2, n, kv_heads, head_dim); [l, 0] keys, [l, 1] values

    @property
    def tokens(self) -> int:
        return int((self.embeds if self.embeds is not None else self.kv[0, 0]).shape[0])

    @classmethod
    def of(cls, kind: str, table: torch.Tensor, shape: PromptShape | None, device: torch.device,
           dtype: torch.dtype) -> Virtual:
        """From PEFT's prompt_embeddings (n, width)."""
        table = table.to(device=device, dtype=dtype)
        if kind == "prompt_tuning":
            return cls(kind, table.contiguous(), None)
        if shape is None or not shape.prefix_tuning:
            raise errors.UnsupportedAdapter(
                "prefix tuning is served by the paged engine only (per-layer keys and values in its cache); "
                "this base model is served by the padded engine"
            )
        n = table.shape[0]
        # PEFT: view (n, layers * 2, kv_heads, head_dim); layer l's keys at 2l, its values at 2l + 1.
        kv = table.view(n, shape.num_layers * 2, shape.kv_heads, shape.head_dim).transpose(0, 1)
        return cls(kind, None, kv.reshape(shape.num_layers, 2, n, shape.kv_heads, shape.head_dim).contiguous())


def prompt_shape(model, prefix_tuning: bool) -> PromptShape:
    """What a prompt or prefix must fit in `model` (hidden size; layers, KV heads, head size)."""
    from adapterd.engine.kv import KVPool

    layers, kv_heads, head_dim, _ = KVPool.shape_of(model)
    if getattr(model.config, "multi_query", False) and not getattr(model.config, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon's multi-query attention: one key/value head
    return PromptShape(model.config.hidden_size, layers, kv_heads, head_dim, prefix_tuning)


def has_placeholders(ids: list[int]) -> bool:
    return bool(ids) and min(ids) < 0


def inputs_embeds(model, ids: torch.Tensor, token_slots: list[list[int]], virtual: dict[int, Virtual]) -> torch.Tensor:
    """(B, T, hidden) embeddings of `ids` (B, T), the placeholders (< 0) of prompt-tuning rows
    as their adapter's virtual tokens; `token_slots[b][t]`: the adapter slot of that token."""
    embeds = model.get_input_embeddings()(ids.clamp(min=0))  # (B, T, hidden)
    for b, t in (ids < 0).nonzero().tolist():
        v = virtual.get(token_slots[b][t])
        if v is not None and v.embeds is not None:
            embeds[b, t] = v.embeds[-int(ids[b, t]) - 1].to(embeds.dtype)
    return embeds


@dataclass
class PrefixKV:
    """The placeholder tokens of prefix-tuning rows in one run, and the keys and values every
    layer writes for them instead of its own."""

    index: torch.Tensor  # (n,) long: the tokens' places in the run
    kv: torch.Tensor  # (layers, 2, n, kv_heads, head_dim)

    def apply(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (T, kv_heads, head_dim) for the run, after RoPE; replaced in place."""
        k.index_copy_(0, self.index, self.kv[layer, 0].to(k.dtype))
        v.index_copy_(0, self.index, self.kv[layer, 1].to(v.dtype))

    @classmethod
    def of_run(cls, ids: list[int], token_slots: list[int], virtual: dict[int, Virtual],
               device: torch.device) -> PrefixKV | None:
        index, parts = [], []
        for t, (tok, slot) in enumerate(zip(ids, token_slots, strict=True)):
            if tok < 0:
                v = virtual.get(slot)
                if v is not None and v.kv is not None:
                    index.append(t)
                    parts.append(v.kv[:, :, -tok - 1])  # (layers, 2, kv_heads, head_dim)
        if not index:
            return None
        return cls(torch.tensor(index, dtype=torch.long, device=device), torch.stack(parts, dim=2))
