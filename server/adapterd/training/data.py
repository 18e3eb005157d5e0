"""Training data: JSONL in the formats users already have, checked line by line.

    {"text": "..."}                                  loss on the whole text
    {"prompt": "...", "completion": "..."}           loss on the completion only
    {"messages": [{"role": "user", "content": ...},  rendered with the base tokenizer's chat
                  {"role": "assistant", ...}]}       template; loss on the last assistant turn

Every example ends with the tokenizer's EOS token, so the adapter learns to stop. The whole
file is checked before a job is queued, and the first problem is reported with its line
number (InvalidArgument): malformed JSON, an unknown or mixed format, an empty file, a
file over --max-dataset-bytes, an example longer than --max-seq-len.

Each example also carries what evaluation needs: the prompt to generate from and the
reference to score the generation against (ROUGE). For {"text"} that is the first half of
the text and the rest.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from adapterd_rules import quote

from adapterd.engine import chat
from adapterd.engine.chat import ROLES
from adapterd.errors import InvalidArgument

IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch's cross-entropy default)
FORMAT_HELP = (
    'expected {"text": ...}, {"prompt": ..., "completion": ...} or '
    '{"messages": [{"role": ..., "content": ...}, ...]}'
)


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line in the file it came from
    prompt: str  # context the loss ignores ("" for {"text"})
    completion: str  # what the loss is on; EOS is appended at encoding
    eval_prompt: str  # what evaluation generates from
    reference: str  # what evaluation scores the generation against
    chat: bool = False  # the prompt was rendered by the chat template, special tokens included
    # encode()'s result, kept from the check of the example's length: tokenized once, at creation
    input_ids: tuple[int, ...] = ()
    labels: tuple[int, ...] = ()


def check_size(data: bytes, max_bytes: int, what: str) -> None:
    """InvalidArgument when `data` (the file, or as much of it as was received) is over
    max_bytes, naming the line at which the limit is passed."""
    if len(data) > max_bytes:
        line = data.count(b"\n", 0, max_bytes) + 1
        raise InvalidArgument(
            f"{what} is larger than --max-dataset-bytes ({max_bytes} bytes): "
            f"line {line} passes the limit; split the file or raise the server's --max-dataset-bytes"
        )


def parse_jsonl(data: bytes, *, what: str, tokenizer, max_seq_len: int, max_bytes: int | None = None) -> list[Example]:
    """Parse and check a whole JSONL file. `what` names the file in errors ("training file")."""
    if max_bytes is not None:
        check_size(data, max_bytes, what)
    examples: list[Example] = []
    first_format: tuple[str, int] | None = None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{what} line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        except RecursionError as e:  # e.g. 100,000 '[': deeper than the parser recurses
            raise InvalidArgument(f"{where}: its JSON nests arrays or objects too deeply") from e
        fmt = detect_format(obj, where)
        if first_format is None:
            first_format = (fmt, number)
        elif fmt != first_format[0]:
            raise InvalidArgument(
                f"{where}: format {fmt} differs from line {first_format[1]}'s {first_format[0]}; "
                "use one format for the whole file"
            )
        example = _example(obj, fmt, number, where, tokenizer)
        input_ids, labels = encode(example, tokenizer)
        length = len(input_ids)
        if length > max_seq_len:
            raise InvalidArgument(
                f"{where}: the example is {length} tokens, longer than --max-seq-len {max_seq_len}; "
                "shorten it or raise --max-seq-len"
            )
        examples.append(replace(example, input_ids=tuple(input_ids), labels=tuple(labels)))
    if not examples:
        raise InvalidArgument(f"{what} is empty: it must hold one JSON object per line, {FORMAT_HELP}")
    return examples


def detect_format(obj, where: str) -> str:
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: expected a JSON object, got {type(obj).__name__}; {FORMAT_HELP}")
    keys = set(obj)
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    raise InvalidArgument(f"{where}: unknown format with keys {quote(sorted(keys))}; {FORMAT_HELP}")


def _example(obj: dict, fmt: str, line: int, where: str, tokenizer) -> Example:
    if fmt == "text":
        text = _string(obj, "text", where)
        eval_prompt, reference = _halves(text)
        return Example(line, "", text, eval_prompt, reference)
    if fmt == "prompt-completion":
        prompt = _string(obj, "prompt", where, allow_empty=True)
        completion = _string(obj, "completion", where)
        return Example(line, prompt, completion, prompt, completion)
    return _chat_example(obj["messages"], line, where, tokenizer)


def _chat_example(messages, line: int, where: str, tokenizer) -> Example:
    if not isinstance(messages, list) or len(messages) < 2:
        raise InvalidArgument(f'{where}: "messages" must be a list of at least two messages, the last from the assistant')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidArgument(
                f'{where}: messages[{i}] must be {{"role": one of {"/".join(ROLES)}, "content": a string}}'
            )
    if messages[-1]["role"] != "assistant":
        raise InvalidArgument(f"{where}: the last message must be the assistant's: it is what the adapter learns")
    if not messages[-1]["content"]:
        raise InvalidArgument(f"{where}: the last (assistant) message is empty")
    if not chat.has_template(tokenizer):
        raise InvalidArgument(
            f'{where}: {{"messages"}} is rendered with the base model\'s chat template, and its tokenizer has '
            'none; use {"prompt", "completion"} instead'
        )
    # Rendered as the server renders GenerateRequest.messages: what the adapter learns to
    # answer is exactly what it is sent when served.
    history = [chat.Message(m["role"], m["content"]) for m in messages]
    prompt = chat.render(tokenizer, history[:-1], add_generation_prompt=True, field=f"{where}: messages")
    full = chat.render(tokenizer, history, add_generation_prompt=False, field=f"{where}: messages")
    # The completion is what the template adds for the last turn (its end-of-turn marker
    # included), when the template renders the prompt as a prefix of the whole; else the
    # reply itself.
    completion = full[len(prompt):] if full.startswith(prompt) else history[-1].content
    return Example(line, prompt, completion, prompt, history[-1].content, chat=True)


def _string(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise InvalidArgument(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    if not value and not allow_empty:
        raise InvalidArgument(f'{where}: "{key}" is empty')
    return value


def _halves(text: str) -> tuple[str, str]:
    """Split a text near its middle at a space, for evaluating {"text"} examples."""
    mid = len(text) // 2
    cut = text.rfind(" ", 0, mid)
    cut = cut + 1 if cut > 0 else mid
    return text[:cut], text[cut:]


def encode(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens are IGNORE_INDEX in labels, EOS ends the completion.

    Prompt and completion are tokenized apart, as inference sees the prompt alone. A chat
    prompt already holds the template's special tokens; a plain prompt, or a {"text"}
    example, gets the tokenizer's own (e.g. BOS), as the server's tokenization does.
    """
    if example.prompt:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=not example.chat)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = []
        completion_ids = tokenizer(example.completion)["input_ids"]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def instruction(text: str, tokenizer, line: int = 0) -> Example:
    """A general instruction with no reference yet (the built-in retention and replay
    sets): one user turn in the base model's chat template, as the server renders
    GenerateRequest.messages; a plain prompt where the tokenizer has no template."""
    if chat.has_template(tokenizer):
        prompt = chat.render(tokenizer, [chat.Message("user", text)], add_generation_prompt=True)
        return Example(line, prompt, "", prompt, "", chat=True)
    prompt = f"{text}\n"
    return Example(line, prompt, "", prompt, "")


def answered(example: Example, tokenizer, answer_ids: list[int], answer: str) -> Example:
    """The example with `answer` (generated as `answer_ids`, its end-of-turn or EOS token
    included when it stopped) as its reference and the completion the loss is on: the
    exact tokens, not a re-tokenization of the text."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=not example.chat)["input_ids"]
    return replace(example, completion=answer, reference=answer, input_ids=tuple(prompt_ids + answer_ids),
                   labels=tuple([IGNORE_INDEX] * len(prompt_ids) + answer_ids))


def tokens(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the example: those kept at its check, else encoded now."""
    if example.input_ids:
        return list(example.input_ids), list(example.labels)
    return encode(example, tokenizer)


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least one when fraction > 0 and n >= 2),
    chosen by `seed`; the rest train. Both keep file order."""
    n = len(examples)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n >= 2 else 0
    held = set(random.Random(seed).sample(range(n), k))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def write_examples(path: Path, examples: Iterable[Example]) -> None:
    """The checked examples, for the worker process (one JSON object a line)."""
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(asdict(e), ensure_ascii=False) + "\n")


def read_examples(path: Path) -> list[Example]:
    if not path.exists():
        return []
    examples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                obj["input_ids"], obj["labels"] = tuple(obj.get("input_ids", ())), tuple(obj.get("labels", ()))
                examples.append(Example(**obj))
    return examples


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-pad (input_ids, labels) pairs into a training batch of tensors."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
