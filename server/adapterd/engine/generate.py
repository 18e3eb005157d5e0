"""Generation over a mixed-adapter batch, with the operations continuous batching needs.

    add(group)  prefill the group in one forward (left-padded), choose first tokens, merge
                its KV cache into the running batch
    step()      one decode step for every running row; finished rows are dropped
    abort(ids)  drop rows now (cancelled calls, expired deadlines)

One thread owns a Generator (the engine loop); nothing here is thread-safe.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from adapterd.engine import prompts
from adapterd.engine.batch import KVBatch
from adapterd.engine.lora import LoraSlots
from adapterd.engine.sampling import RowSampler, SamplingParams, choose_tokens
from adapterd.engine.text import TextStream


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = 0  # 0 = base model
    salt: bytes = b""  # the prefix cache's h_0 for this request (kv.prefix_salt); paged engine only


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None
    text: str  # newly printable text
    logprob: float | None
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "eos"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # the row failed (finish_reason "error"): why, for the caller
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token, logprob), most likely first


@dataclass
class _Row:
    request: Request
    sampler: RowSampler
    text: TextStream
    position: int  # position id of the newest token; the chosen token is fed at position + 1
    last_token: int = -1
    completion: int = 0
    finished: bool = False


class Generator:
    def __init__(self, model, tokenizer, slots: LoraSlots, *, eos_token_ids: set[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids if eos_token_ids is not None else eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: list[_Row] = []
        self.kv: KVBatch | None = None
        if slots.prompt_shape is not None:  # per-layer prefixes need the paged engine's cache
            slots.prompt_shape = dataclasses.replace(slots.prompt_shape, prefix_tuning=False)
        self._keep_kw = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def running_ids(self) -> list[str]:
        return [r.request.id for r in self.rows]

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> list[TokenEvent]:
        """Prefill `requests` as one group and merge them into the running batch."""
        if not requests:
            return []
        group = sorted(requests, key=lambda r: r.slot)
        tokens = [prompts.placeholders(self.slots.virtual_tokens(r.slot)) + list(r.prompt_ids) for r in group]
        ids, mask = self._left_pad(tokens)  # (G, L), (G, L)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (G, L)
        self.slots.set_batch([r.slot for r in group], transient=True)
        inputs = {"input_ids": ids}
        if any(prompts.has_placeholders(t) for t in tokens):  # prompt tuning: the virtual tokens' embeddings
            slots = [[r.slot] * ids.shape[1] for r in group]
            inputs = {"inputs_embeds": prompts.inputs_embeds(self.model, ids, slots, self.slots.virtual)}
        out = self.model(
            **inputs, attention_mask=mask, position_ids=positions, use_cache=True, **self._keep_kw
        )
        rows = [
            _Row(r, RowSampler(r.params, r.prompt_ids, self.device), TextStream(self.tokenizer, r.params.stop), len(t) - 1)
            for r, t in zip(group, tokens, strict=True)
        ]
        events = self._choose(out.logits[:, -1], rows)  # logits (G, V)
        group_kv = KVBatch(out.past_key_values, mask)
        if self.kv is None or not self.rows:
            self.kv, self.rows = group_kv, rows
        else:
            self.kv.concat(group_kv)
            self.rows = self.rows + rows
        self._compact(resort=True)
        return events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One decode step over the running batch."""
        if not self.rows:
            return []
        self.slots.set_batch([r.request.slot for r in self.rows])
        mask = self.kv.append_step()  # (B, L + 1)
        ids = torch.tensor([[r.last_token] for r in self.rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)  # (B, 1)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=self.kv.cache, use_cache=True,
        )
        events = self._choose(out.logits[:, -1], self.rows)  # logits (B, V)
        self._compact(resort=False)
        return events

    def abort(self, request_ids) -> list[str]:
        """Drop the rows of `request_ids` now; returns the ids that were running."""
        wanted = set(request_ids)
        hit = [r.request.id for r in self.rows if r.request.id in wanted]
        for r in self.rows:
            if r.request.id in wanted:
                r.finished = True
        if hit:
            self._compact(resort=False)
        return hit

    def abort_all(self) -> list[str]:
        """Drop every row (after a failed forward, the batch state cannot be trusted)."""
        ids = self.running_ids
        self.rows, self.kv = [], None
        return ids

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[TokenEvent]:
        choice = choose_tokens(logits, [r.sampler for r in rows])
        return [self._advance(row, tok, *choice.of(i, row.request.params))
                for i, (row, tok) in enumerate(zip(rows, choice.tokens, strict=True))]

    def _advance(self, row: _Row, token: int, logprob: float | None, top: tuple | None) -> TokenEvent:
        row.completion += 1
        row.last_token = token
        text, reason = next_text(row.text, token, row.completion, row.request.params, self.eos)
        if reason is None:
            row.position += 1
        row.finished = reason is not None
        return TokenEvent(
            row.request.id, token, text, logprob, row.finished, reason,
            len(row.request.prompt_ids), row.completion, top_logprobs=top,
        )

    def _compact(self, resort: bool) -> None:
        """Drop finished rows. Where LoRA stacks are gathered per row, rows keep their places:
        the last rows move into finished rows' places and new rows stay at the end, so the
        layers copy only those rows (see lora.py). On the segment path, rows are kept sorted
        by adapter slot, re-sorted after a merge (`resort`)."""
        n = len(self.rows)
        live = [i for i in range(n) if not self.rows[i].finished]
        if self.slots.gathers(len(live)):
            tail = iter([i for i in live if i >= len(live)])  # as many as finished rows before them
            keep = [next(tail) if self.rows[i].finished else i for i in range(len(live))]
        else:
            order = list(range(n))
            if resort:
                order.sort(key=lambda i: self.rows[i].request.slot)  # stable: keeps arrival order per slot
            keep = [i for i in order if not self.rows[i].finished]
        if keep == list(range(n)):
            return
        if not keep:
            self.rows, self.kv = [], None
            return
        self.kv.select(torch.tensor(keep, device=self.device))
        self.rows = [self.rows[i] for i in keep]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(p) for p in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, p in enumerate(sequences):
            ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)


def next_text(stream: TextStream, token: int, completion: int, params: SamplingParams,
              eos: set[int]) -> tuple[str, str | None]:
    """The text a row's new token prints, and why the row ends with it (None: it goes on).
    Shared by both engines."""
    if token in eos and not params.ignore_eos:
        return stream.flush(), "eos"
    text, stopped = stream.push(token)
    if stopped:
        return text, "stop"
    if completion >= params.max_new_tokens:
        return text + stream.flush(), "length"
    return text, None


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
