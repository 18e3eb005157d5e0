"""Did the adapter help? Scores for the adapter and the base model side by side.

For each evaluated split (the validation split; the retention file, when given, so that
forgetting shows too):

- loss: the mean negative log-likelihood per completion token (the tokens the training
  loss is on), and perplexity = exp(loss);
- ROUGE-1, ROUGE-2 and ROUGE-L precision, recall and F1 (the `rouge_score` package, with
  stemming), averaged over examples, of greedy generations from each prompt against its
  reference.

The base model's scores come from the same PEFT model with its adapter disabled, so both
columns see the same weights, prompts and generation settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from adapterd.engine.chat import eos_token_ids
from adapterd.training.data import IGNORE_INDEX, Example, collate, tokens

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SAMPLES_KEPT = 3  # generations kept per split and model, to show next to the numbers


def rouge(predictions: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    """Mean ROUGE precision/recall/F1 over pairs: {"rouge1": {"precision", "recall", "f1"}, ...}."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = {t: {"precision": 0.0, "recall": 0.0, "f1": 0.0} for t in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for t in ROUGE_TYPES:
            totals[t]["precision"] += scores[t].precision
            totals[t]["recall"] += scores[t].recall
            totals[t]["f1"] += scores[t].fmeasure
    n = max(1, len(predictions))
    return {t: {k: v / n for k, v in s.items()} for t, s in totals.items()}


@torch.no_grad()
def completion_loss(model, tokenizer, examples: list[Example], batch_size: int) -> float:
    """Mean NLL per completion token over all examples (token-weighted, not batch-weighted)."""
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([tokens(e, tokenizer) for e in examples[start : start + batch_size]], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(1, count)


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of each example's eval_prompt, stopping at EOS or the chat
    template's end-of-turn token, as the server does."""
    device = _device(model)
    outputs: list[str] = []
    for start in range(0, len(examples), batch_size):
        prompts = [_prompt_ids(e, tokenizer) for e in examples[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token is generated at the same position.
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,  # training with gradient checkpointing turned the model's default off
            eos_token_id=sorted(eos_token_ids(model, tokenizer)),  # where serving stops: end of turn too
            pad_token_id=tokenizer.pad_token_id,
        )  # (B, T + new)
        outputs.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return [o.strip() for o in outputs]


def _prompt_ids(example: Example, tokenizer) -> list[int]:
    ids = tokenizer(example.eval_prompt, add_special_tokens=not example.chat)["input_ids"]
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


def score(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int) -> dict:
    """Loss, perplexity, ROUGE and a few samples of one model on one split."""
    loss = completion_loss(model, tokenizer, examples, batch_size)
    generations = generate(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        **rouge(generations, [e.reference for e in examples]),
        "samples": [
            {"prompt": e.eval_prompt, "reference": e.reference, "generation": g}
            for e, g in zip(examples[:SAMPLES_KEPT], generations, strict=False)
        ],
    }


def compare(
    peft_model,
    tokenizer,
    splits: dict[str, list[Example]],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """{split: {"examples": n, "adapter": scores, "base": scores}} for each non-empty split."""
    peft_model.eval()
    results = {}
    for split, examples in splits.items():
        if not examples:
            continue
        on_progress(f"evaluating the adapter on {split} ({len(examples)} examples)")
        adapter = score(peft_model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
        on_progress(f"evaluating the base model on {split} ({len(examples)} examples)")
        with peft_model.disable_adapter():
            base = score(peft_model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
        results[split] = {"examples": len(examples), "adapter": adapter, "base": base}
    return results


def flat_metrics(results: dict) -> dict[str, float]:
    """The numbers of `compare` as one flat {"validation.adapter.rougeL.f1": 0.42, ...} map,
    for the registry's metadata."""
    flat: dict[str, float] = {}
    for split, r in results.items():
        flat[f"{split}.examples"] = float(r["examples"])
        for model in ("adapter", "base"):
            s = r[model]
            flat[f"{split}.{model}.loss"] = s["loss"]
            flat[f"{split}.{model}.perplexity"] = s["perplexity"]
            for t in ROUGE_TYPES:
                for k, v in s[t].items():
                    flat[f"{split}.{model}.{t}.{k}"] = v
    return flat


def _device(model) -> torch.device:
    return next(model.parameters()).device
