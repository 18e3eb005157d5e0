"""Training data: every bad dataset is INVALID_ARGUMENT naming its line; good ones encode
with the loss on the completion only and EOS at the end."""

from __future__ import annotations

import json

import pytest
from adapterd.engine.demo import build_tokenizer
from adapterd.errors import InvalidArgument
from adapterd.training.data import (
    IGNORE_INDEX,
    check_size,
    encode,
    parse_jsonl,
    split_validation,
)
from adapterd.training.spec import TrainingSpec


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def parse(tok, data: bytes, max_seq_len: int = 256, max_bytes: int | None = None):
    return parse_jsonl(data, what="training file", tokenizer=tok, max_seq_len=max_seq_len, max_bytes=max_bytes)


GOOD = {"prompt": "Q: 1+1?\nA: ", "completion": "2"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (jsonl(GOOD, GOOD, '{"prompt": "x", "completion": '), "training file line 3: not valid JSON"),
        (jsonl(GOOD, {"question": "q", "answer": "a"}), "training file line 2: unknown format"),
        (jsonl(GOOD, "[1, 2]"), "training file line 2: expected a JSON object"),
        (jsonl(GOOD, {"text": "plain"}), "training file line 2: format text differs from line 1's prompt-completion"),
        (jsonl(GOOD, {"prompt": "p", "completion": 3}), 'training file line 2: "completion" must be a string'),
        (jsonl({"prompt": "p", "completion": ""}), 'training file line 1: "completion" is empty'),
        (jsonl({"text": ""}), 'training file line 1: "text" is empty'),
        (jsonl({"messages": [{"role": "user", "content": "hi"}]}), "training file line 1: \"messages\" must be a list"),
        (jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}),
         "training file line 1: the last message must be the assistant's"),
        (jsonl({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]}),
         "training file line 1: messages[0] must be"),
        (b"", "training file is empty"),
        (b"\n  \n\n", "training file is empty"),
        (jsonl(GOOD) + b"\n" + b'{"text": "\xff\xfe"}', "training file line 2: not UTF-8"),
    ],
    ids=["bad-json", "unknown-format", "not-object", "mixed-formats", "wrong-type", "empty-completion", "empty-text",
         "one-message", "last-not-assistant", "bad-role", "empty-file", "blank-file", "not-utf8"],
)
def test_bad_dataset_names_the_line(tok, data, message):
    with pytest.raises(InvalidArgument) as e:
        parse(tok, data)
    assert message in str(e.value)
    assert e.value.code == "INVALID_ARGUMENT"


def test_example_longer_than_max_seq_len_names_the_line(tok):
    data = jsonl(GOOD, GOOD, {"prompt": "x" * 40, "completion": "y" * 40}, GOOD)
    with pytest.raises(InvalidArgument, match=r"training file line 3: the example is 81 tokens, longer than --max-seq-len 64"):
        parse(tok, data, max_seq_len=64)
    assert len(parse(tok, data, max_seq_len=81)) == 4  # 40 + 40 + EOS fits exactly


def test_file_over_max_bytes_names_the_line(tok):
    line = b'{"text": "' + b"x" * 28 + b'"}\n'  # 40 bytes: line 3 ends at byte 120
    data = line * 10
    with pytest.raises(InvalidArgument, match=r"larger than --max-dataset-bytes \(100 bytes\): line 3 passes the limit"):
        parse(tok, data, max_bytes=100)
    check_size(data, len(data), "training file")  # at the limit is fine


def test_prompt_completion_labels_only_the_completion_and_eos(tok):
    (example,) = parse(tok, jsonl(GOOD))
    ids, labels = encode(example, tok)
    prompt_ids = tok(GOOD["prompt"])["input_ids"]
    assert ids == prompt_ids + tok("2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert (example.eval_prompt, example.reference) == (GOOD["prompt"], "2")


def test_text_is_all_labelled_and_evaluated_from_its_first_half(tok):
    (example,) = parse(tok, jsonl({"text": "import numpy as np and then more words"}))
    ids, labels = encode(example, tok)
    assert ids == labels and ids[-1] == tok.eos_token_id
    assert example.eval_prompt + example.reference == "import numpy as np and then more words"
    assert example.eval_prompt == "import numpy as np "  # cut at the last space before the middle


def test_messages_use_the_chat_template_and_label_the_last_reply(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Zeros?"},
                {"role": "assistant", "content": "np.zeros(3)"}]
    (example,) = parse(tok, jsonl({"messages": messages}))
    assert example.chat
    assert example.eval_prompt == tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert example.reference == "np.zeros(3)"
    ids, labels = encode(example, tok)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "np.zeros(3)<|end|>\n<|eos|>"


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tok):
    data = b"\n" + jsonl(GOOD) + b"\n\n" + b"{oops"
    with pytest.raises(InvalidArgument, match="training file line 4: not valid JSON"):
        parse(tok, data)


def test_validation_split_is_deterministic_and_disjoint(tok):
    examples = parse(tok, jsonl(*[{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(30)]))
    train, val = split_validation(examples, 0.1, seed=7)
    assert len(val) == 3 and len(train) == 27
    assert {e.line for e in train}.isdisjoint({e.line for e in val})
    assert split_validation(examples, 0.1, seed=7) == (train, val)
    assert split_validation(examples, 0.1, seed=8)[1] != val
    assert split_validation(examples, 0.0, seed=7) == (examples, [])
    assert len(split_validation(examples[:2], 0.1, seed=7)[1]) == 1  # at least one held out


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"name": ""}, "--name"), ({"name": "My Adapter"}, "--name 'My Adapter' is not valid"), ({"epochs": 0}, "--epochs"), ({"learning_rate": -1}, "--lr"),
        ({"rank": 0}, "--rank"), ({"dropout": 1.0}, "--dropout"), ({"batch_size": 0}, "--batch-size"),
        ({"grad_accum": 0}, "--grad-accum"), ({"max_seq_len": 4}, "--max-seq-len"), ({"val_split": 1.0}, "--val-split"),
        ({"target_modules": ("all-linear", "q_proj")}, "--target-modules"), ({"target_modules": ()}, "--target-modules"),
    ],
)
def test_spec_errors_name_the_flag(kwargs, flag):
    with pytest.raises(InvalidArgument, match=flag):
        TrainingSpec(**{"name": "x", **kwargs})


def test_spec_defaults_are_the_hosted_ones_and_round_trip():
    spec = TrainingSpec(name="x")
    assert (spec.epochs, spec.learning_rate, spec.rank, spec.alpha, spec.dropout) == (3, 2e-4, 16, 32, 0.05)
    assert spec.peft_target_modules == "all-linear" and spec.early_stopping and spec.val_split == 0.1
    assert TrainingSpec.from_json(spec.to_json()) == spec
    assert TrainingSpec(name="x", target_modules=["q_proj", "v_proj"]).peft_target_modules == ["q_proj", "v_proj"]
