"""Shrinking a trained LoRA adapter toward the base (--shrink-to-gain G): the smallest
strength that still keeps G of the task's gain.

A LoRA adapter adds s * B A x to each adapted layer's output, s = 1 as trained. Smaller s
interpolates in weight space between the base model (s = 0) and the adapter (as WiSE-FT
does between a pretrained and a fine-tuned model): a task whose behaviour saturates
early keeps it at s < 1, while on general prompts, where the adapter's changes only tip
near-ties between the base's top tokens, every change shrinks with s.

    gain(s) = ROUGE-L F1 on the validation split at strength s - the base model's (s = 0)

The search walks SCALES down from 1 and keeps the last s with gain(s) >= G gain(1); it
stops at the first that falls short (gain need not be monotone in s, and a scale past a
shortfall is not trusted). The scale is folded into B, so what is published is a plain
LoRA adapter with the config it was trained with. The validation split chose s, so its
figures at s are not held out any more: bench/replay.py scores a test split that no job
sees.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adapterd.training import evaluate
from adapterd.training.data import Example
from adapterd.training.subspace import lora_linears

SCALES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


class Strength:
    """Sets the strength s of a PEFT model's LoRA adapter, B = s * B_trained, in place."""

    def __init__(self, model):
        self.weights = [layer.lora_B["default"].weight for layer in lora_linears(model).values()]
        self.trained = [w.detach().clone() for w in self.weights]
        self.scale = 1.0

    @torch.no_grad()
    def set(self, scale: float) -> None:
        for w, trained in zip(self.weights, self.trained, strict=True):
            w.copy_(trained * scale)
        self.scale = scale


def rouge_l(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int) -> float:
    """The mean ROUGE-L F1 of the model's greedy answers against the references, as the
    job's evaluation scores them."""
    generations = evaluate.generate(model, tokenizer, examples, batch_size=max(batch_size, evaluate.GENERATE_BATCH),
                                    max_new_tokens=max_new_tokens)
    return evaluate.rouge(generations, [e.reference for e in examples])["rougeL"]["f1"]


def shrink(model, tokenizer, examples: list[Example], keep: float, *, batch_size: int, max_new_tokens: int,
           on_progress: Callable[[str], None] = lambda message: None) -> dict:
    """Sets the adapter of `model` (a PEFT LoRA model) to the smallest of SCALES whose gain
    on `examples` is at least `keep` of the full adapter's. Returns {"scale", "keep",
    "base_rougeL_f1", "rougeL_f1": {scale: score tried}}; with no gain at s = 1 (nothing to
    keep) the adapter stays at 1."""
    model.eval()
    strength = Strength(model)
    score = lambda: rouge_l(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)  # noqa: E731
    on_progress(f"shrinking the adapter: scoring the base model and the adapter on {len(examples)} validation examples")
    with model.disable_adapter():
        base = score()
    tried = {1.0: score()}
    full_gain = tried[1.0] - base
    chosen = 1.0
    if full_gain > 0:
        for scale in SCALES[1:]:
            strength.set(scale)
            tried[scale] = score()
            kept = (tried[scale] - base) / full_gain
            on_progress(f"shrinking the adapter: strength {scale:g} keeps {kept:.1%} of the validation gain")
            if kept < keep:
                break
            chosen = scale
    strength.set(chosen)
    on_progress(f"shrinking the adapter: chose strength {chosen:g} (at least {keep:g} of the validation gain kept)")
    return {"scale": chosen, "keep": keep, "base_rougeL_f1": base, "rougeL_f1": tried}
