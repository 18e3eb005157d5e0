"""Did the adapter help? Scores for the adapter and the base model side by side.

For each evaluated split (the validation split; the retention split, so that forgetting
shows too: the --retention-file, or the built-in general set of general.py, whose
references are the base model's own greedy answers):

- loss: the mean negative log-likelihood per completion token (the tokens the training
  loss is on), and perplexity = exp(loss);
- ROUGE-1, ROUGE-2 and ROUGE-L precision, recall and F1 (the `rouge_score` package, with
  stemming), averaged over examples, of greedy generations from each prompt against its
  reference;
- retention: the adapter's ROUGE-L F1 on the retention split over the base model's.

The base model's scores come from the same PEFT model with its adapter disabled, so both
columns see the same weights, prompts and generation settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from adapterd.engine.chat import eos_token_ids
from adapterd.training.data import IGNORE_INDEX, Example, answered, collate, tokens

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SAMPLES_KEPT = 3  # generations kept per split and model, to show next to the numbers
GENERATE_BATCH = 16  # rows per greedy generation: more than a training batch, decoding is cheap per row


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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1]:]  # (B, T, V): prompt tuning's virtual tokens come first
        targets = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at position t-1
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(1, count)


@torch.no_grad()
def generate_ids(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy completions of each example's eval_prompt as token ids, stopping at EOS or the
    chat template's end-of-turn token as the server does (that token kept, when reached)."""
    device = _device(model)
    stops = eos_token_ids(model, tokenizer)
    outputs: list[list[int]] = []
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
            # Training with gradient checkpointing turned the model's default off. Prompt learning
            # without a cache: with one, PEFT's generate() gives other tokens than its own forward
            # after the first (PEFT 0.21, transformers 5.24), and the server serves the forward's.
            use_cache=not _prompt_learning(model),
            eos_token_id=sorted(stops),  # where serving stops: end of turn too
            pad_token_id=tokenizer.pad_token_id,
        )  # (B, T + new)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            outputs.append(row[:end])  # a finished row's padding dropped
    return outputs


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def generate(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of each example's eval_prompt, as text."""
    ids = generate_ids(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]


def answer(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int) -> list[Example]:
    """The examples answered by `model` greedily: each generation becomes the reference and
    the completion (the exact tokens generated). The built-in retention set's references and
    replay's training examples are the base model's answers."""
    ids = generate_ids(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [answered(e, tokenizer, i, tokenizer.decode(i, skip_special_tokens=True).strip())
            for e, i in zip(examples, ids, strict=True)]


def _prompt_ids(example: Example, tokenizer) -> list[int]:
    ids = tokenizer(example.eval_prompt, add_special_tokens=not example.chat)["input_ids"]
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


def score(model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int,
          generations: list[str] | None = None) -> dict:
    """Loss, perplexity, ROUGE and a few samples of one model on one split; `generations`:
    the model's greedy answers when they are known already."""
    loss = completion_loss(model, tokenizer, examples, batch_size)
    if generations is None:
        generations = generate(model, tokenizer, examples, batch_size=max(batch_size, GENERATE_BATCH),
                               max_new_tokens=max_new_tokens)
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
    base_referenced: frozenset[str] = frozenset(),
    on_progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """{split: {"examples": n, "references": "file" | "base", "adapter": scores, "base": scores}}
    for each non-empty split. The splits in `base_referenced` (the built-in retention set)
    have no references of their own: the base model's greedy answers are their references,
    so the base scores ROUGE 1 there and the adapter's ROUGE says how much of it it kept."""
    peft_model.eval()
    results = {}
    for split, examples in splits.items():
        if not examples:
            continue
        n = len(examples)
        base_answers = None
        if split in base_referenced:
            on_progress(f"answering {split} ({n} examples) with the base model, for references")
            with peft_model.disable_adapter():
                examples = answer(peft_model, tokenizer, examples, batch_size=max(batch_size, GENERATE_BATCH),
                                  max_new_tokens=max_new_tokens)
            base_answers = [e.reference for e in examples]
        on_progress(f"evaluating the adapter on {split} ({n} examples)")
        adapter = score(peft_model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
        on_progress(f"evaluating the base model on {split} ({n} examples)")
        with peft_model.disable_adapter():
            base = score(peft_model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         generations=base_answers)
        results[split] = {"examples": n, "references": "base" if base_answers is not None else "file",
                          "adapter": adapter, "base": base}
    return results


def retention(results: dict) -> float | None:
    """How much of the base model's behaviour the adapter kept: its ROUGE-L F1 on the
    retention split over the base's (1.0: all of it); None without a retention split."""
    r = results.get("retention")
    if r is None:
        return None
    adapter, base = r["adapter"]["rougeL"]["f1"], r["base"]["rougeL"]["f1"]
    return adapter / base if base > 0 else (1.0 if adapter >= base else 0.0)


def retention_failure(results: dict, min_retention: float) -> str:
    """Why the adapter may not be published under --min-retention, with the figures; ""
    when it may."""
    kept = retention(results)
    if not min_retention or kept is None or kept >= min_retention:
        return ""
    r = results["retention"]
    of = "the base model's own answers" if r.get("references") == "base" else "the retention file's references"
    return (
        f"retention {kept:.3f} is below --min-retention {min_retention:g}: on {r['examples']} general prompts "
        f"the adapter's ROUGE-L F1 against {of} is {r['adapter']['rougeL']['f1']:.4f}, the base model's "
        f"{r['base']['rougeL']['f1']:.4f}; the adapter was not published (try --replay-ratio, fewer epochs "
        "or a lower --lr)"
    )


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
