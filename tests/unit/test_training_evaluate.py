"""Evaluation: ROUGE from rouge_score, the completion loss against the model's own loss,
batched greedy generation against one prompt at a time."""

from __future__ import annotations

import math

import pytest
import torch
from adapterd.training.data import Example, collate, encode
from adapterd.training.evaluate import completion_loss, flat_metrics, generate, rouge, score


def test_rouge_identical_disjoint_and_partial():
    same = rouge(["df.groupby('a').sum()"], ["df.groupby('a').sum()"])
    assert all(same[t][k] == 1.0 for t in same for k in ("precision", "recall", "f1"))
    none = rouge(["np.zeros(3)"], ["pd.read_csv(path)"])
    assert all(none[t][k] == 0.0 for t in none for k in ("precision", "recall", "f1"))
    half = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert half["rouge1"]["precision"] == 1.0 and half["rouge1"]["recall"] == 0.5
    assert half["rougeL"]["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_rouge_is_the_mean_over_examples():
    both = rouge(["a b", "x"], ["a b", "y"])
    assert both["rouge1"]["f1"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny(model_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def examples(n: int) -> list[Example]:
    return [Example(i + 1, f"Q{i}: " + "x" * i, f"answer {i}", f"Q{i}: " + "x" * i, f"answer {i}") for i in range(n)]


def test_completion_loss_is_the_token_weighted_mean_of_the_models_loss(tiny):
    model, tok = tiny
    exs = examples(3)
    total, count = 0.0, 0
    for e in exs:  # the model's own loss, one example at a time: a mean over its label tokens
        batch = collate([encode(e, tok)], tok.pad_token_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    assert completion_loss(model, tok, exs, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    model, tok = tiny
    exs = examples(4)  # prompts of different lengths: the batch is left-padded
    batched = generate(model, tok, exs, batch_size=4, max_new_tokens=8)
    single = [generate(model, tok, [e], batch_size=1, max_new_tokens=8)[0] for e in exs]
    assert batched == single


def test_score_and_flat_metrics(tiny):
    model, tok = tiny
    s = score(model, tok, examples(2), batch_size=2, max_new_tokens=4)
    assert s["perplexity"] == pytest.approx(math.exp(s["loss"]))
    assert len(s["samples"]) == 2 and s["samples"][0]["reference"] == "answer 0"
    flat = flat_metrics({"validation": {"examples": 2, "adapter": s, "base": s}})
    assert flat["validation.adapter.rougeL.f1"] == s["rougeL"]["f1"]
    assert flat["validation.base.loss"] == s["loss"] and flat["validation.examples"] == 2.0
    assert all(isinstance(v, float) for v in flat.values())
