"""The batched sampler (engine/sampling.py) against plain per-row references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from adapterd.engine.sampling import RowSampler, SamplingParams, choose_tokens

CPU = torch.device("cpu")
V = 50


def _rows(*params: SamplingParams, prompt: list[int] | None = None) -> list[RowSampler]:
    return [RowSampler(p, prompt or [], CPU) for p in params]


def _reference_penalized(logits: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int]):
    """One row, element by element: CTRL's repetition penalty over prompt + generated, then
    OpenAI's presence and frequency penalties over the generated tokens."""
    out = logits.clone()
    seen = set(prompt) | set(generated)
    for t in range(V):
        if t in seen:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        count = generated.count(t)
        out[t] -= p.presence_penalty * (count > 0) + p.frequency_penalty * count
    return out


def test_penalties_match_the_per_row_reference_over_steps():
    torch.manual_seed(0)
    prompt = [1, 2, 3, 7]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(presence_penalty=1.5),
              SamplingParams(frequency_penalty=0.8, presence_penalty=-0.5), SamplingParams()]
    rows = _rows(*params, prompt=prompt)
    generated: list[list[int]] = [[] for _ in params]
    for _ in range(12):
        logits = torch.randn(len(rows), V)
        # a peaked row: without penalties it would pick the same token every step
        logits[:, 5] += 6
        choice = choose_tokens(logits, rows)
        for i, p in enumerate(params):
            want = int(_reference_penalized(logits[i], p, prompt, generated[i]).argmax())
            assert choice.tokens[i] == want, (i, generated[i])
            generated[i].append(choice.tokens[i])
    assert len(set(generated[2])) > 1  # the penalty moved it off the peak
    assert set(generated[3]) == {5}  # the unpenalized row stayed on it


def test_logprobs_and_top_alternatives_are_the_raw_distribution():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    rows = _rows(SamplingParams(logprobs=True, top_logprobs=4), SamplingParams(),
                 SamplingParams(logprobs=True, repetition_penalty=2.0), prompt=[0, 1])
    choice = choose_tokens(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert choice.logprobs[0] == pytest.approx(float(raw[0, choice.tokens[0]]))
    values, ids = raw[0].topk(4)
    assert [t for t, _ in choice.top[0]] == ids.tolist()
    assert [lp for _, lp in choice.top[0]] == pytest.approx(values.tolist())
    assert choice.of(1, rows[1].params) == (None, None)  # it did not ask
    lp, top = choice.of(2, rows[2].params)  # logprobs before the penalty, and no alternatives
    assert lp == pytest.approx(float(raw[2, choice.tokens[2]])) and top is None


def test_a_seeded_row_draws_the_same_tokens_whatever_else_is_in_the_batch():
    torch.manual_seed(2)
    steps = [torch.randn(4, V) for _ in range(10)]
    p = SamplingParams(temperature=0.9, top_p=0.8, top_k=20, seed=1234)
    alone = _rows(p)
    mixed = _rows(SamplingParams(temperature=1.3, seed=7), SamplingParams(), p,
                  SamplingParams(temperature=0.5, top_k=3, seed=99))
    got_alone = [choose_tokens(s[2:3], alone).tokens[0] for s in steps]
    got_mixed = [choose_tokens(s, mixed).tokens[2] for s in steps]
    assert got_alone == got_mixed


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, seed=5),
                                    SamplingParams(temperature=1.0, top_k=6, seed=5),
                                    SamplingParams(temperature=1.0, top_p=0.6, seed=5)],
                         ids=["temperature", "top-k", "top-p"])
def test_draws_follow_the_reference_distribution(params):
    """Frequencies over many draws against the distribution computed the plain way: the
    temperature-scaled softmax, truncated to the top k or to the smallest prefix whose mass
    reaches top_p, renormalized. Every token outside it is never drawn."""
    torch.manual_seed(3)
    logits = torch.randn(V) * 2
    probs = torch.softmax(logits / params.temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    mass = 0.0
    for rank, t in enumerate(order.tolist()):
        if (params.top_k and rank >= params.top_k) or (params.top_p < 1 and mass >= params.top_p):
            break
        keep[t] = True
        mass += float(probs[t])
    want = torch.where(keep, probs, torch.zeros(())) / probs[keep].sum()
    n = 4000
    rows = _rows(*[dataclasses.replace(params, seed=params.seed + k) for k in range(8)])  # 8 streams
    counts = torch.zeros(V)
    for _ in range(n // 8):
        for t in choose_tokens(logits.expand(8, V), rows).tokens:
            counts[t] += 1
    assert counts[~keep].sum() == 0
    freq = counts / n
    # each frequency within 4.5 standard errors of its probability (n = 4000 draws)
    tolerance = 4.5 * torch.sqrt(want * (1 - want) / n) + 1e-3
    assert bool(((freq - want).abs() <= tolerance).all()), (freq - want).abs().max()


def test_sampling_never_draws_a_token_the_grammar_or_top_k_removed():
    logits = torch.full((2, V), -math.inf)
    logits[:, 10], logits[:, 11] = 0.0, 0.1
    rows = _rows(SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_k=1, seed=1))
    for _ in range(50):
        tokens = choose_tokens(logits, rows).tokens
        assert tokens[0] in (10, 11) and tokens[1] == 11
