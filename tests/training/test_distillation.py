"""Replay as self-distillation (--replay-loss kl): the training loss against a plain reference.

On a tiny Llama with LoRA, prompt or prefix tuning, the DistillationTrainer's loss on a batch of task and replay rows
must equal, computed apart: the cross-entropy of the task rows' completion tokens under the
adapter, plus KL(base || adapter) at every real position of the replay rows, the base's
distribution taken from a separate copy of the model with no adapter, over the count of both
kinds of token. With a fresh adapter (B = 0) the replay rows add nothing; the gradient
reaches the adapter's weights only.
"""

from __future__ import annotations

import pytest
import torch
from adapterd.training.data import IGNORE_INDEX, collate
from adapterd.training.worker import DistillationTrainer
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainingArguments


def batch(pad_id: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((9, 4), (6, 2), (11, 5), (7, 3)):  # rows 0, 2 task; 1, 3 replay
        ids = torch.randint(3, 200, (length,), generator=g).tolist()
        rows.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    out = collate(rows, pad_id)
    out["replay"] = torch.tensor([False, True, False, True])
    return out


def reference_loss(peft_model, base, inputs) -> torch.Tensor:
    ids, mask, labels, replay = inputs["input_ids"], inputs["attention_mask"], inputs["labels"], inputs["replay"]
    student = peft_model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:].float()  # (B, T, V)
    with torch.no_grad():
        teacher = base(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    total, count = torch.zeros(()), 0
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        if replay[row]:
            for t in range(n):
                p = teacher[row, t].softmax(-1)
                total = total + (p * (p.log() - student[row, t].log_softmax(-1))).sum()
            count += n
        else:
            for t in range(1, n):
                if labels[row, t] != IGNORE_INDEX:
                    total = total - student[row, t - 1].log_softmax(-1)[labels[row, t]]
                    count += 1
    return total / count


@pytest.fixture
def models(model_factory):
    src = model_factory("llama")
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    def peft(init: bool, method: str = "lora"):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        torch.manual_seed(1)
        config = {
            "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init,
                                       lora_dropout=0.0),
            "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
            "prefix-tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        }[method]()
        return get_peft_model(model, config)

    return base, peft


def trainer(model, tmp_path) -> DistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return DistillationTrainer(model=model, args=args)


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "prefix-tuning"])
def test_loss_equals_the_plain_reference(models, tmp_path, method):
    base, peft = models
    model = peft(init=False, method=method)  # random weights: the adapter moves the logits
    inputs = batch(pad_id=0)
    loss = trainer(model, tmp_path).compute_loss(model, inputs)
    expected = reference_loss(model, base, inputs)
    assert loss.item() > 0.1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)

    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and set(grads) <= trained  # the base (the teacher too) gets no gradient
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_a_fresh_adapter_has_no_replay_loss(models, tmp_path):
    base, peft = models
    model = peft(init=True)  # B = 0: the adapter is the base
    inputs = batch(pad_id=0)
    loss = trainer(model, tmp_path).compute_loss(model, inputs)
    task_only = {**inputs, "replay": torch.tensor([False, False, False, False])}
    task_only["labels"] = inputs["labels"].masked_fill(inputs["replay"][:, None], IGNORE_INDEX)
    ce = trainer(model, tmp_path).compute_loss(model, task_only)
    n_ce = int((task_only["labels"][:, 1:] != IGNORE_INDEX).sum())
    n_kl = int(inputs["attention_mask"][inputs["replay"]].sum())
    # The replay rows' KL is 0, so the loss is the task's cross-entropy over both counts.
    assert loss.item() == pytest.approx(ce.item() * n_ce / (n_ce + n_kl), rel=1e-5)
    # An evaluation batch (no replay column) is the plain cross-entropy of the model.
    plain = {k: v for k, v in inputs.items() if k != "replay"}
    assert trainer(model, tmp_path).compute_loss(model, plain).item() == pytest.approx(
        model(**plain).loss.item(), rel=1e-5)
