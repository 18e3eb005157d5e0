"""Shrinking a trained LoRA adapter (--shrink-to-gain, shrink.py) against plain references:
strength s scales every layer's LoRA output by exactly s (0: the base model, 1: as trained,
nothing lost on the way back), and the search picks the scale a plain walk over the
ROUGE-L scores of each strength picks.
"""

from __future__ import annotations

import pytest
import torch
from adapterd.errors import InvalidArgument
from adapterd.training import evaluate, shrink
from adapterd.training.data import Example
from adapterd.training.spec import TrainingSpec
from adapterd.training.subspace import lora_linears
from adapterd.training.worker import prepare_model

PROMPTS = ["pandas: drop NaN rows\n", "numpy: five zeros\n", "Say hello.\n", "Name a colour.\n", "Count to three.\n",
           "pandas: first rows\n", "What is 2 + 2?\n", "numpy: an identity matrix\n", "Spell cat.\n",
           "pandas: sort by age\n", "Greet a friend.\n", "Name a fruit.\n"]
NEW_TOKENS = 10


@pytest.fixture
def peft_model(model_factory):
    torch.manual_seed(0)
    model, tok = prepare_model(model_factory("llama"), TrainingSpec(name="x", rank=4, dropout=0.0), torch.device("cpu"),
                               torch.float32)
    with torch.no_grad():  # a trained adapter: PEFT starts B at 0, which would change nothing
        for layer in lora_linears(model).values():
            layer.lora_B["default"].weight.normal_(std=0.5)
    return model.eval(), tok


def examples(references: list[str]) -> list[Example]:
    return [Example(i, p, r, p, r) for i, (p, r) in enumerate(zip(PROMPTS, references, strict=True), 1)]


def answered_by(model, tok) -> list[Example]:
    """The prompts with the model's greedy answers as references, those ROUGE can score: the
    tiny model's bytes are often no word at all, and an answer with no word scores 0 even
    against itself."""
    refs = evaluate.generate(model, tok, examples(["x"] * len(PROMPTS)), batch_size=16, max_new_tokens=NEW_TOKENS)
    return [e for e in examples(refs) if evaluate.rouge([e.reference], [e.reference])["rougeL"]["f1"] == 1.0]


def test_strength_scales_every_lora_output_and_returns_to_the_trained_adapter(peft_model):
    model, tok = peft_model
    layers = lora_linears(model)
    trained = {n: layer.lora_B["default"].weight.clone() for n, layer in layers.items()}
    x = torch.randn(3, next(iter(layers.values())).in_features)
    name, layer = next((n, m) for n, m in layers.items() if m.in_features == x.shape[1])

    def delta():
        with torch.no_grad():
            return layer(x) - layer.base_layer(x)

    full = delta()
    assert full.abs().max() > 1e-3
    strength = shrink.Strength(model)
    for s in (0.5, 0.1, 0.0):
        strength.set(s)
        torch.testing.assert_close(delta(), s * full, rtol=1e-5, atol=1e-6)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        at_zero = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(at_zero, base)  # strength 0 is the base model
    strength.set(1.0)
    assert all(torch.equal(layers[n].lora_B["default"].weight, w) for n, w in trained.items())


def reference_walk(scores: dict[float, float], base: float, keep: float) -> float:
    chosen, full = 1.0, scores[1.0] - base
    for s in shrink.SCALES[1:]:
        if (scores[s] - base) / full < keep:
            return chosen
        chosen = s
    return chosen


def test_shrink_picks_the_scale_a_plain_walk_over_each_strengths_score_picks(peft_model):
    model, tok = peft_model
    score = lambda ex: shrink.rouge_l(model, tok, ex, batch_size=4, max_new_tokens=NEW_TOKENS)  # noqa: E731
    # The references are the trained adapter's own answers: it scores 1, the base less, and
    # weaker strengths somewhere between.
    task = answered_by(model, tok)
    assert len(task) >= 4
    strength = shrink.Strength(model)
    scores = {}
    for s in shrink.SCALES:
        strength.set(s)
        scores[s] = score(task)
    strength.set(1.0)
    with model.disable_adapter():
        base = score(task)
    assert scores[1.0] == pytest.approx(1.0) and base < 0.9

    for keep in (1.0, 0.9, 0.5, 0.0):
        result = shrink.shrink(model, tok, task, keep, batch_size=4, max_new_tokens=NEW_TOKENS)
        expected = reference_walk(scores, base, keep)
        assert result["scale"] == expected
        assert result["base_rougeL_f1"] == pytest.approx(base)
        assert all(result["rougeL_f1"][s] == pytest.approx(scores[s]) for s in result["rougeL_f1"])
        # The model is left at the chosen strength: it scores what the walk saw there.
        assert score(task) == pytest.approx(scores[expected])
        shrink.Strength(model).set(1 / expected)  # back to the trained adapter for the next keep
        assert score(task) == pytest.approx(1.0)


def test_no_gain_to_keep_leaves_the_adapter_as_trained(peft_model):
    model, tok = peft_model
    with model.disable_adapter():  # references the base model answers: the adapter can only lose
        task = answered_by(model, tok)
    result = shrink.shrink(model, tok, task, 0.95, batch_size=4, max_new_tokens=NEW_TOKENS)
    assert result["scale"] == 1.0 and list(result["rougeL_f1"]) == [1.0]


@pytest.mark.parametrize("kwargs,message", [
    ({"shrink_to_gain": -0.1}, "--shrink-to-gain must be in [0, 1]"),
    ({"shrink_to_gain": 1.5}, "--shrink-to-gain must be in [0, 1]"),
    ({"shrink_to_gain": float("nan")}, "--shrink-to-gain must be in [0, 1]"),
    ({"shrink_to_gain": 0.9, "method": "ia3"}, "--shrink-to-gain scales LoRA's B matrices: it needs --method lora"),
    ({"shrink_to_gain": 0.9, "use_dora": True}, "without --use-dora"),
])
def test_bad_shrink_specs(kwargs, message):
    with pytest.raises(InvalidArgument) as e:
        TrainingSpec(name="x", **kwargs)
    assert message in str(e.value)
