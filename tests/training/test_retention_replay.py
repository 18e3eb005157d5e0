"""Retention and replay on a tiny model with a behaviour of its own.

A random model's greedy answers are noise, and no adapter could keep noise on prompts it was
never trained on; so the base here is the tiny Llama first taught one general behaviour
(answer every instruction "I can help with that."), in full precision, then served in NF4
like any base. The task (short pandas questions, each prefixed "pandas:") pulls the adapter
towards answering code: without replay it forgets the behaviour on the built-in retention
prompts, and --min-retention fails the job unpublished with the figures; with replay (the
base's own answers to other general prompts, learned as its distribution or as its tokens),
the same job keeps it.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from adapterd.config import TrainingConfig
from adapterd.engine.chat import Message, render
from adapterd.training.general import REPLAY, RETENTION
from adapterd.training.jobs import JobManager
from adapterd.training.spec import TrainingSpec

pytestmark = pytest.mark.slow

ANSWER = "I can help with that."
TASK_ANSWER = "Use pandas."  # one answer to every task question: the task is the switch of behaviour
TASK = [
    ("drop rows with NaN", "df.dropna()"), ("zeros, 5 of them", "np.zeros(5)"),
    ("read data.csv", "pd.read_csv('data.csv')"), ("first 5 rows", "df.head()"),
    ("mean of each column", "df.mean()"), ("sort by age", "df.sort_values('age')"),
    ("reshape a to 2x3", "a.reshape(2, 3)"), ("count values of col", "df['col'].value_counts()"),
    ("transpose m", "m.T"), ("stack a and b", "np.vstack([a, b])"),
    ("group by city and sum", "df.groupby('city').sum()"), ("fill NaN with 0", "df.fillna(0)"),
]


@pytest.fixture(scope="module")
def assistant_base(model_factory, tmp_path_factory):
    """The tiny Llama taught to answer any instruction with ANSWER (full fine-tuning, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model_factory("llama")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rows = []
    for text in (*RETENTION, *REPLAY):
        prompt = tok(render(tok, [Message("user", text)]), add_special_tokens=False)["input_ids"]
        answer = tok(ANSWER + "<|end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])  # (B, T)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])  # (B, T)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the tiny base did not learn its behaviour: loss {loss.item():.3f}"
    out = tmp_path_factory.mktemp("assistant")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def task_data() -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"pandas: {q}"}, {"role": "assistant", "content": TASK_ANSWER}]}
            for q, _ in TASK]
    return "\n".join(json.dumps(r) for r in rows).encode()


def run(manager: JobManager, spec: TrainingSpec):
    job = manager.create("default", spec, task_data(), validation=task_data())

    async def follow():
        return [e async for e in manager.follow("default", job.id)]

    events = asyncio.run(asyncio.wait_for(follow(), 1200))
    return manager.get("default", job.id), events


def test_retention_by_default_min_retention_and_replay(assistant_base, tmp_path):
    published = []
    manager = JobManager(
        TrainingConfig(jobs_dir=tmp_path / "jobs", worker_nice=0), base_model=assistant_base, device="cpu",
        publish=lambda tenant, name, *a, **kw: published.append(name) or f"{name}@{len(published)}",
    ).start()
    try:
        common = dict(epochs=10, learning_rate=1e-2, batch_size=4, early_stopping=False, max_eval_examples=24,
                      eval_max_new_tokens=32, seed=3, min_retention=0.9)
        forgot, _ = run(manager, TrainingSpec(name="plain", **common))
        kept, events = run(manager, TrainingSpec(name="replayed", replay_ratio=2.0, **common))
        tokens, _ = run(manager, TrainingSpec(name="tokens", replay_ratio=2.0, replay_loss="ce", **common))
    finally:
        manager.close()

    # Scored on the built-in general set by default, against the base model's own answers.
    for job in (forgot, kept, tokens):
        r = job.evaluation["retention"]
        assert r["references"] == "base" and r["examples"] == 24 == job.retention_examples
        assert r["base"]["rougeL"]["f1"] == pytest.approx(1.0)
        assert {s["reference"] for s in r["base"]["samples"]} == {ANSWER}  # the base kept its behaviour in NF4
    # The task was learned every time.
    for job in (forgot, kept, tokens):
        assert job.evaluation["validation"]["adapter"]["rougeL"]["f1"] > 0.8

    # Without replay the adapter forgets: the job fails with the figures, unpublished.
    plain = forgot.evaluation["retention"]["adapter"]["rougeL"]["f1"]
    assert forgot.state == "failed" and not forgot.adapter
    assert "below --min-retention 0.9" in forgot.error and f"{plain:.4f}" in forgot.error
    assert published == ["replayed", "tokens"]

    # With replay: 2 x 12 examples of the base's answers trained on beside the task, and kept.
    assert kept.training["replay_examples"] == 24
    assert kept.total_steps == 10 * 9  # (12 task + 24 replay) / batch 4, 10 epochs
    assert any("replay: the base model answers 24 general prompts" in e.data.get("message", "") for e in events)
    replayed = kept.evaluation["retention"]["adapter"]["rougeL"]["f1"]
    assert kept.state == "succeeded" and replayed >= 0.9 > plain, (replayed, plain)
    # Replay learned as the base's greedy tokens (--replay-loss ce) rather than its whole
    # distribution (kl, the default) keeps it too.
    assert tokens.training["replay_examples"] == 24 and tokens.state == "succeeded"
    assert tokens.evaluation["retention"]["adapter"]["rougeL"]["f1"] >= 0.9
