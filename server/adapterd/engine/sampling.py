"""Next-token choice per row: greedy, or sampled with temperature, top-k, top-p, a
repetition penalty and a per-request seed.

A request's seed drives its own torch.Generator, so a seeded request draws the same
tokens whatever else is in the batch. Logprobs are those of the chosen token under the
model's raw distribution (log-softmax of the logits, before penalty and temperature),
as vLLM and TGI report them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    repetition_penalty: float = 1.0  # 1 = none; > 1 discourages tokens already seen
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks, tests), as vLLM's ignore_eos
    # Structured output (engine/grammar.py Grammar): each row gets its own matcher, and only
    # the tokens it allows can be chosen. None: free text.
    grammar: object | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RowSampler:
    """Sampling state of one row: its generator and the tokens it has seen."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            # CPU generator: the same stream on every device, and no device sync per draw.
            self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.seen = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen.add(token)
        if self.matcher is not None:
            self.matcher.accept(token)


def choose_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[list[int], list[float] | None]:
    """logits: (B, V) for the next position of each row. Returns the chosen token of
    every row and, when any row asked for them, the chosen tokens' logprobs."""
    logits = logits.float()
    want_logprobs = any(r.params.logprobs for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # (B, V)
    if any(r.seen is not None for r in rows):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.seen:
                _apply_repetition_penalty(logits[i], r.seen, r.params.repetition_penalty)
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None and not r.matcher.done]
    if constrained:
        logits = _constrain(logits, [rows[i].matcher for i in constrained], constrained)
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite
    for i, r in enumerate(rows):
        if not r.params.greedy:
            tokens[i] = _sample(logits[i], r.params, r.generator)
    chosen_logprobs = None
    if raw_logprobs is not None:
        idx = torch.tensor(tokens, device=logits.device)
        chosen_logprobs = raw_logprobs.gather(1, idx[:, None]).squeeze(1).tolist()
    for r, t in zip(rows, tokens, strict=True):
        r.observe(t)
    return tokens, chosen_logprobs


def _constrain(logits: torch.Tensor, matchers: list, index: list[int]) -> torch.Tensor:
    """A copy of logits (B, V) where rows `index` keep only the tokens their grammar allows;
    the other rows are untouched (one mask, one masked_fill for the whole batch)."""
    from adapterd.engine.grammar import allowed_mask

    mask = torch.ones_like(logits, dtype=torch.bool)  # (B, V)
    mask[index] = allowed_mask(matchers, logits.shape[-1], logits.device)  # (n, V)
    return logits.masked_fill(~mask, float("-inf"))


def _apply_repetition_penalty(row: torch.Tensor, seen: set[int], penalty: float) -> None:
    # CTRL's penalty as in transformers: divide positive logits, multiply negative ones.
    idx = torch.tensor(sorted(seen), device=row.device)
    vals = row[idx]
    row[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)


def _sample(row: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    scores = row / params.temperature  # (V,)
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sorted_p.cumsum(0) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())
