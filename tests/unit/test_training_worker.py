"""The worker's model: an evaluation forward (no grad, eval mode) must not switch
bitsandbytes' CPU layers to their inference-only packed kernel, and training after one
still lowers the loss."""

from __future__ import annotations

import torch
from adapterd.training.data import Example, collate, encode
from adapterd.training.spec import TrainingSpec
from adapterd.training.worker import prepare_model


def _packed(model) -> int:
    return sum(
        bool(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False))
        for m in model.modules()
    )


def test_training_after_an_evaluation_forward_still_learns(model_factory):
    torch.manual_seed(0)
    model, tok = prepare_model(model_factory("llama"), TrainingSpec(name="x", dropout=0.0), torch.device("cpu"),
                               torch.float32)
    example = Example(1, "Q: two plus two?\nA: ", "4", "Q: two plus two?\nA: ", "4")
    batch = collate([encode(example, tok)], tok.pad_token_id)

    model.eval()  # what the Trainer does for each validation-loss evaluation
    with torch.no_grad():
        before = model(**batch).loss.item()
    assert _packed(model) == 0, "an evaluation repacked the 4-bit weights: training after it would lose its backward"

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < before / 2, (before, loss.item())
