"""Running a batch through an engine (padded or paged) to its end, keeping what the
PEFT comparisons check: each request's first logits and every token it generated."""

from __future__ import annotations

import torch


def run_to_end(gen, requests) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """{request id: (logits that chose its first token, its tokens)}; no row may fail."""
    first: dict[str, torch.Tensor] = {}
    choose = gen._choose

    def spy(logits, rows):
        for i, r in enumerate(rows):
            first.setdefault(r.request.id, logits[i].clone())
        return choose(logits, rows)

    gen._choose = spy
    tokens: dict[str, list[int]] = {}
    events = gen.add(requests)
    while True:
        for e in events:
            assert e.error is None, e.error
            tokens.setdefault(e.request_id, []).append(e.token_id)
        if not gen.num_running:
            break
        events = gen.step()
    gen._choose = choose
    return {r.id: (first[r.id], tokens[r.id]) for r in requests}


@torch.no_grad()
def greedy_by_forward(model, prompt: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """A model's (a PeftModel's) greedy tokens with one whole forward each, as in training
    (not generate(): for prompt tuning it differs from PEFT's own forward after the first
    token, PEFT 0.21 with transformers 5.24): the first logits, and the n tokens."""
    ids, first = list(prompt), None
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        first = logits if first is None else first
        ids.append(int(logits.argmax()))
    return first, ids[len(prompt):]
