"""Next-token choice for a whole batch: greedy, or sampled with temperature, top-k, top-p,
penalties and a per-request seed, with the chosen tokens' logprobs and top alternatives.

Every step is a fixed handful of batched tensor ops on the logits' device, whatever the
number of rows, and one transfer of the results to the host at the end (the tokens must
reach the detokenizer): no per-row device op or host sync inside a step.

- Penalties: `repetition_penalty` (CTRL's, as transformers: over the prompt and the
  generated tokens, positive logits divided, negative multiplied) and OpenAI's
  `presence_penalty` / `frequency_penalty` (over the generated tokens, as vLLM: logit -=
  presence * [count > 0] + frequency * count). Each row keeps its counts on the device.
- Sampling: a row's seed drives its own CPU torch.Generator, which draws one uniform number
  per step; the token is where that number falls in the row's cumulative distribution
  (after top-k and top-p). A seeded request so draws the same tokens whatever else is in
  the batch, and the draw needs no device round trip.
- Logprobs are those of the model's raw distribution (log-softmax of the logits, before
  penalties and temperature), as vLLM and TGI report them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    repetition_penalty: float = 1.0  # 1 = none; > 1 discourages tokens already seen
    presence_penalty: float = 0.0  # OpenAI's, -2..2: minus this once a token was generated
    frequency_penalty: float = 0.0  # OpenAI's, -2..2: minus this per time it was generated
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: the most likely alternatives at each position
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class Choice:
    """One step's choice for the batch, on the host."""

    tokens: list[int]
    logprobs: list[float] | None  # the chosen tokens' (None: no row asked)
    top: list[list[tuple[int, float]]] | None  # per row, its top_logprobs alternatives

    def of(self, i: int, params: SamplingParams) -> tuple[float | None, tuple | None]:
        """Row i's logprob and alternatives, where its request asked for them."""
        if not params.logprobs or self.logprobs is None:
            return None, None
        return self.logprobs[i], (tuple(self.top[i]) if self.top is not None and params.top_logprobs else None)


class RowSampler:
    """Sampling state of one row: its generator, and (with penalties) the tokens it has seen
    as tensors on the logits' device, made on the first step (the vocabulary size is the
    logits' width)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device):
        self.params = params
        self.device = device
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            # A CPU generator: the same stream on every device, and a draw reads no device memory.
            self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._prompt_ids = prompt_ids if params.penalized else None
        self.in_prompt: torch.Tensor | None = None  # (V,) bool
        self.counts: torch.Tensor | None = None  # (V,) float: times each token was generated
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    def penalty_state(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None:
            self.in_prompt = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            ids = [t for t in self._prompt_ids if 0 <= t < vocab]
            if ids:
                self.in_prompt[torch.tensor(ids, device=self.device)] = True
            self.counts = torch.zeros(vocab, device=self.device)
        return self.in_prompt, self.counts

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1  # an op queued on the device, no sync
        if self.matcher is not None:
            self.matcher.accept(token)


def choose_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> Choice:
    """logits: (B, V) for the next position of each row."""
    logits = logits.float()
    device, vocab = logits.device, logits.shape[-1]
    want_logprobs = any(r.params.logprobs for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # (B, V)
    penalized = [i for i, r in enumerate(rows) if r.params.penalized]
    if penalized:
        logits = _penalize(logits.clone(), [rows[i] for i in penalized], penalized, vocab)
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None and not r.matcher.done]
    if constrained:
        logits = _constrain(logits, [rows[i].matcher for i in constrained], constrained)
    tokens = logits.argmax(dim=-1)  # (B,): greedy for every row; sampled rows overwrite theirs
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens[torch.tensor(sampled, device=device)] = _sample(logits, [rows[i] for i in sampled], sampled)
    chosen = top = None
    results = [tokens]
    k = max((r.params.top_logprobs for r in rows if r.params.logprobs), default=0)
    if raw_logprobs is not None:
        results.append(raw_logprobs.gather(1, tokens[:, None]).squeeze(1))
        if k:
            results += list(raw_logprobs.topk(k, dim=-1))  # values, indices: (B, k) each
    host = [t.tolist() for t in results]  # the step's one transfer to the host
    token_list = host[0]
    if raw_logprobs is not None:
        chosen = host[1]
        if k:
            top = [list(zip(ids[:r.params.top_logprobs], vals[:r.params.top_logprobs], strict=True))
                   if r.params.logprobs else [] for r, vals, ids in zip(rows, host[2], host[3], strict=True)]
    for r, t in zip(rows, token_list, strict=True):
        r.observe(t)
    return Choice(token_list, chosen, top)


def _penalize(logits: torch.Tensor, rows: list[RowSampler], index: list[int], vocab: int) -> torch.Tensor:
    """Every penalized row's penalties at once: (n, V) state stacked, one update of logits."""
    idx = torch.tensor(index, device=logits.device)
    states = [r.penalty_state(vocab) for r in rows]
    in_prompt = torch.stack([s[0] for s in states])  # (n, V)
    counts = torch.stack([s[1] for s in states])  # (n, V)
    column = lambda name: torch.tensor([getattr(r.params, name) for r in rows], device=logits.device)[:, None]  # noqa: E731
    sub = logits[idx]
    seen = in_prompt | (counts > 0)
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("presence_penalty") * (counts > 0) - column("frequency_penalty") * counts
    logits[idx] = sub
    return logits


def _constrain(logits: torch.Tensor, matchers: list, index: list[int]) -> torch.Tensor:
    """A copy of logits (B, V) where rows `index` keep only the tokens their grammar allows;
    the other rows are untouched (one mask, one masked_fill for the whole batch)."""
    from adapterd.engine.grammar import allowed_mask

    mask = torch.ones_like(logits, dtype=torch.bool)  # (B, V)
    mask[index] = allowed_mask(matchers, logits.shape[-1], logits.device)  # (n, V)
    return logits.masked_fill(~mask, float("-inf"))


def _sample(logits: torch.Tensor, rows: list[RowSampler], index: list[int]) -> torch.Tensor:
    """The sampled rows' tokens (n,), by inverse transform: each row's own uniform draw
    against its cumulative distribution. Rows with top-k or top-p sort their scores first
    (one batched sort); the others take the distribution in vocabulary order."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)[:, None]
    scores = logits[torch.tensor(index, device=device)] / temperature  # (n, V)
    draws = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device)  # (n,)
    out = torch.empty(len(rows), dtype=torch.long, device=device)
    truncated = [j for j, r in enumerate(rows) if r.params.top_p < 1.0 or 0 < r.params.top_k < vocab]
    plain = [j for j in range(len(rows)) if j not in set(truncated)]
    if plain:
        j = torch.tensor(plain, device=device)
        out[j] = _invert(torch.softmax(scores[j], dim=-1), draws[j])
    if truncated:
        j = torch.tensor(truncated, device=device)
        sorted_scores, order = torch.sort(scores[j], dim=-1, descending=True)  # (m, V)
        ks = torch.tensor([rows[t].params.top_k or vocab for t in truncated], device=device)[:, None]
        ranks = torch.arange(vocab, device=device)[None, :]
        sorted_scores = sorted_scores.masked_fill(ranks >= ks, float("-inf"))
        probs = torch.softmax(sorted_scores, dim=-1)
        top_p = torch.tensor([rows[t].params.top_p for t in truncated], device=device)[:, None]
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        probs = probs.masked_fill((probs.cumsum(-1) - probs) >= top_p, 0.0)
        out[j] = order.gather(1, _invert(probs, draws[j])[:, None]).squeeze(1)
    return out


def _invert(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(m, V) unnormalized probabilities, (m,) uniforms in [0, 1) -> (m,) column indices: the
    first column whose cumulative mass exceeds draw * total. A column of zero mass is never
    chosen."""
    cdf = probs.cumsum(-1)
    target = draws[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)
