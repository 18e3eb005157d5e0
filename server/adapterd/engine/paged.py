"""The paged engine: one forward per step over a flat run of tokens from every row.

    add(requests)   admit rows: reuse the longest cached prefix of each row's own adapter
                    and version (kv.py), reserve the blocks its prompt and max_new_tokens
                    can need; no forward
    step()          one forward: every decode row's next token, then prompt chunks of the
                    rows still prefilling, within the step's token budget (chunked prefill:
                    a long prompt never stalls the running rows or a short newcomer);
                    sample for each row that fed its last known token
    abort(ids)      drop rows now (cancelled calls, expired deadlines); their blocks return

The run is (1, T): LoRA applies a delta per token's adapter (lora.py, flat plan), attention
reads each row's keys from its block table (attention.py). Rows still prefilling are served
shortest-remaining first, which keeps a short prompt's time to first token short behind a
long one; a row that has waited `max_wait_s` goes first whatever its length.

The padded engine (generate.py) is the reference this is tested against, and serves the
architectures whose attention does not go through transformers' attention interface.
One thread owns a PagedGenerator (the engine loop); nothing here is thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from adapterd.engine import attention, native, prompts
from adapterd.engine.attention import Chunk, StepAttention
from adapterd.engine.generate import Request, TokenEvent, eos_ids, next_text
from adapterd.engine.kv import DEFAULT_BLOCK_SIZE, Blocks, KVPool, chain
from adapterd.engine.lora import LoraSlots
from adapterd.engine.sampling import RowSampler, choose_tokens
from adapterd.engine.text import TextStream

DEFAULT_STEP_TOKENS = 256


@dataclass
class _Row:
    request: Request
    sampler: RowSampler
    text: TextStream
    tokens: list[int]  # prompt, then every chosen token
    prompt_len: int
    admitted: float  # monotonic seconds
    blocks: list[int] = field(default_factory=list)  # the block table
    hashes: list[bytes] = field(default_factory=list)  # chain hash of each full, computed block
    computed: int = 0  # tokens whose K, V are in the pool
    reserve: int = 0  # blocks promised to this row and not allocated yet
    completion: int = 0
    finished: bool = False

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


class PagedGenerator:
    def __init__(self, model, tokenizer, slots: LoraSlots, *, kv_cache_bytes: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, step_tokens: int = DEFAULT_STEP_TOKENS,
                 max_wait_s: float = 3.0, eos_token_ids: set[int] | None = None):
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer)
        self.step_tokens = step_tokens
        self.max_wait_s = max_wait_s
        layers, kv_heads, head_dim, dtype = KVPool.shape_of(model)
        num_blocks = max(1, kv_cache_bytes // (KVPool.bytes_per_token(model) * block_size))
        self.pool = KVPool(layers, num_blocks, block_size, kv_heads, head_dim, dtype, self.device)
        self.blocks = Blocks(num_blocks, block_size)
        self.block_size = block_size
        kernels = native.load() if attention.kernel_applies(self.pool.k) else None
        self.kernel = kernels.paged_decode if kernels is not None else None
        self.rows: list[_Row] = []
        attention.register()
        self._configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
        self._configs[id(cfg)] = cfg

    # --- what the loop asks ------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def running_ids(self) -> list[str]:
        return [r.request.id for r in self.rows]

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.block_size

    def blocks_needed(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Blocks a request can need at most (before any prefix hit)."""
        return self.blocks.blocks_for(prompt_tokens + max_new_tokens)

    def can_take(self, prompt_tokens: int, max_new_tokens: int, already: int = 0) -> bool:
        """Whether a request fits in the pool now, beside `already` blocks promised in the
        same admission pass."""
        return self.blocks_needed(prompt_tokens, max_new_tokens) + already <= self.blocks.available

    def add(self, requests: list[Request]) -> list[TokenEvent]:
        """Admit rows; they are prefilled by the next steps. Each must fit (can_take)."""
        now = time.monotonic()
        for r in requests:
            tokens = prompts.placeholders(self.slots.virtual_tokens(r.slot)) + list(r.prompt_ids)
            row = _Row(r, RowSampler(r.params, r.prompt_ids, self.device), TextStream(self.tokenizer, r.params.stop),
                       tokens, len(r.prompt_ids), now)
            # At least the prompt's last token is fed: its logits choose the first token.
            limit = (len(tokens) - 1) // self.block_size
            row.blocks, row.hashes = self.blocks.match(r.salt, tokens, limit)
            row.computed = len(row.blocks) * self.block_size
            row.reserve = self.blocks_needed(len(tokens), r.params.max_new_tokens) - len(row.blocks)
            self.blocks.reserved += row.reserve
            self.rows.append(row)
        return []

    def abort(self, request_ids) -> list[str]:
        wanted = set(request_ids)
        hit = [r for r in self.rows if r.request.id in wanted]
        for r in hit:
            self._free(r)
        if hit:
            self.rows = [r for r in self.rows if not r.finished]
        return [r.request.id for r in hit]

    def abort_all(self) -> list[str]:
        ids = self.running_ids
        for r in self.rows:
            self._free(r)
        self.rows = []
        return ids

    def kv_stats(self) -> dict[str, int]:
        """The pool's blocks, each counted from its own state: held (a row holds it), cached
        (nobody holds it, its prefix is kept), free; these add up to total unless a block
        leaked. reserved: promised to admitted rows, not yet allocated."""
        b = self.blocks
        return {
            "held": b.held_counted(), "cached": b.evictable, "free": b.free, "total": b.num_blocks,
            "reserved": b.reserved, "tokens": sum(r.computed for r in self.rows),
            "lookups": b.stats.lookups, "hits": b.stats.hits,
        }

    def forget(self, salt: bytes) -> int:
        """Drop the cached prefix blocks of `salt` (an adapter version deleted)."""
        return self.blocks.drop(salt)

    # --- the step ----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        if not self.rows:
            return []
        for c in self._configs.values():  # ours, even if someone ran the model another way since
            c._attn_implementation = attention.ATTN_IMPLEMENTATION
        plan = self._plan()  # [(row, n tokens fed)]
        ids, positions, slot_mapping, token_slots, samples = [], [], [], [], []
        for row, n in plan:
            start = row.computed
            self._ensure_blocks(row, start + n)
            for p in range(start, start + n):
                ids.append(row.tokens[p])
                positions.append(p)
                slot_mapping.append(row.blocks[p // self.block_size] * self.block_size + p % self.block_size)
            token_slots.extend([row.request.slot] * n)
            if start + n == len(row.tokens):
                samples.append(len(ids) - 1)
        step = self._attention_meta(plan, slot_mapping)
        self.slots.set_tokens(token_slots)
        inputs = {"input_ids": torch.tensor([ids], device=self.device)}  # (1, T)
        if prompts.has_placeholders(ids):  # a prompt- or prefix-tuning row's virtual tokens
            virtual = self.slots.virtual
            inputs = {"inputs_embeds": prompts.inputs_embeds(self.model, inputs["input_ids"], [token_slots], virtual)}
            step.prefix = prompts.PrefixKV.of_run(ids, token_slots, virtual, self.device)
        out = self.model(
            **inputs,
            position_ids=torch.tensor([positions], device=self.device),  # (1, T)
            use_cache=False,
            logits_to_keep=torch.tensor(samples, dtype=torch.long, device=self.device),  # (S,)
            **{attention.STEP_KWARG: step},
        )
        logits = out.logits[0]  # (S, V): one per sampling row, in plan order
        sampling = []
        for row, n in plan:
            row.computed += n
            self._register_full_blocks(row)
            if row.computed == len(row.tokens):
                sampling.append(row)
        events = self._choose(logits, sampling)
        self.rows = [r for r in self.rows if not r.finished]
        return events

    def _plan(self) -> list[tuple[_Row, int]]:
        """Decode rows first (one token each), then prompt chunks within the budget:
        overdue rows first, then the shortest remaining prefill."""
        # By adapter slot: each adapter's decode tokens form one run (lora.FlatPlan).
        decode = sorted(((r, 1) for r in self.rows if r.pending == 1), key=lambda rn: rn[0].request.slot)
        budget = self.step_tokens - len(decode)
        now = time.monotonic()
        waiting = [r for r in self.rows if r.pending > 1]
        waiting.sort(key=lambda r: (now - r.admitted < self.max_wait_s, r.pending, r.admitted))
        chunks = []
        for r in waiting:
            if budget <= 0:
                break
            n = min(r.pending, budget)
            chunks.append((r, n))
            budget -= n
        return decode + chunks

    def _attention_meta(self, plan, slot_mapping: list[int]) -> StepAttention:
        tables, starts, ctx, chunks = [], [], [], []
        start = 0
        for row, n in plan:
            if n == 1 and row.pending == 1 and not chunks:
                starts.append(len(tables))
                nb = self.blocks.blocks_for(row.computed + 1)
                tables.extend(row.blocks[:nb])
                ctx.append(row.computed + 1)
            else:
                first = row.computed
                if first == 0:
                    chunks.append(Chunk(start, n, 0, None, None))
                else:
                    total = first + n
                    p = torch.arange(total)
                    table = torch.tensor(row.blocks[: self.blocks.blocks_for(total)], dtype=torch.long)
                    key_slots = (table[p // self.block_size] * self.block_size + p % self.block_size).to(self.device)
                    q_pos = torch.arange(first, total)
                    mask = (p[None, :] <= q_pos[:, None]).to(self.device)  # (n, total)
                    chunks.append(Chunk(start, n, first, key_slots, mask))
            start += n
        return StepAttention(
            k_pool=self.pool.k, v_pool=self.pool.v, block_size=self.block_size,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode=len(ctx),
            tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
            table_start=torch.tensor(starts, dtype=torch.int64, device=self.device),
            context=torch.tensor(ctx, dtype=torch.int32, device=self.device),
            max_context=max(ctx, default=0), chunks=chunks, kernel=self.kernel,
        )

    def _ensure_blocks(self, row: _Row, tokens: int) -> None:
        while len(row.blocks) * self.block_size < tokens:
            row.blocks.append(self.blocks.allocate())
            if row.reserve > 0:
                row.reserve -= 1
                self.blocks.reserved -= 1

    def _register_full_blocks(self, row: _Row) -> None:
        bs = self.block_size
        while (len(row.hashes) + 1) * bs <= row.computed:
            i = len(row.hashes)
            parent = row.hashes[-1] if row.hashes else row.request.salt
            h = chain(parent, row.tokens[i * bs:(i + 1) * bs])
            row.hashes.append(h)
            self.blocks.register(row.blocks[i], h, row.request.salt)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[TokenEvent]:
        if not rows:
            return []
        finite = torch.isfinite(logits).all(dim=-1)  # (S,)
        if not bool(finite.all()):
            events, keep, keep_rows = [], [], []
            for i, (row, ok) in enumerate(zip(rows, finite.tolist(), strict=True)):
                if ok:
                    keep.append(i)
                    keep_rows.append(row)
                else:
                    events.append(self._fail_row(row))
            if keep_rows:
                events += self._choose(logits[keep], keep_rows)
            return events
        choice = choose_tokens(logits, [r.sampler for r in rows])
        return [self._advance(row, tok, *choice.of(i, row.request.params))
                for i, (row, tok) in enumerate(zip(rows, choice.tokens, strict=True))]

    def _fail_row(self, row: _Row) -> TokenEvent:
        self._free(row)
        return TokenEvent(row.request.id, None, "", None, True, "error", row.prompt_len, row.completion,
                          error="the forward produced non-finite logits (NaN or inf) for this request")

    def _advance(self, row: _Row, token: int, logprob: float | None, top: tuple | None) -> TokenEvent:
        row.completion += 1
        text, reason = next_text(row.text, token, row.completion, row.request.params, self.eos)
        if reason is None:
            row.tokens.append(token)
        else:
            self._free(row)
        return TokenEvent(row.request.id, token, text, logprob, reason is not None, reason,
                          row.prompt_len, row.completion, top_logprobs=top)

    def _free(self, row: _Row) -> None:
        if row.finished:
            return
        row.finished = True
        self.blocks.release(row.blocks)
        self.blocks.reserved -= row.reserve
        row.blocks, row.reserve = [], 0

