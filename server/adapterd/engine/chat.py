"""Conversations: messages rendered with the base model's chat template (generation prompt
added), and the template's end-of-turn token, which ends generation as EOS does.

Serving (GenerateRequest.messages) and training ({"messages"} datasets, training/data.py)
both render here, so an adapter trained on conversations is served the same text.

A rendered conversation already holds the template's special tokens (BOS included where
the template writes it): tokenize it with add_special_tokens=False, as transformers'
apply_chat_template(tokenize=True) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adapterd.errors import InvalidArgument

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages: Sequence[Message], field: str = "messages") -> None:
    if not messages:
        raise InvalidArgument(f"{field} must not be empty")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"{field}[{i}].role must be one of {', '.join(ROLES)}; got {m.role!r}")


def render(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           field: str = "messages") -> str:
    """The conversation as the base model's template writes it; with the generation prompt,
    the text the model's answer continues."""
    if not has_template(tokenizer):
        raise InvalidArgument(
            f"{field}: the base model has no chat template, so a conversation cannot be rendered; send prompt instead"
        )
    check_messages(messages, field)
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False, add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
        raise InvalidArgument(f"{field}: the base model's chat template refused them: {e}") from e


def prompt_text(tokenizer, prompt: str, messages: Sequence[Message]) -> tuple[str, bool]:
    """(the text to tokenize, whether it is a rendered conversation) for a request that
    sets exactly one of `prompt` and `messages`."""
    if prompt and messages:
        raise InvalidArgument("set either prompt or messages, not both")
    if messages:
        return render(tokenizer, messages), True
    if not prompt:
        raise InvalidArgument("prompt must not be empty (or send messages instead)")
    return prompt, False


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the template writes right after a reply (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>), or None: found by rendering a reply
    and reading what follows it."""
    if not has_template(tokenizer):
        return None
    marker = "\x00reply\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this has no end-of-turn to find
        return None
    if marker not in text:
        return None
    after = tokenizer(text.rsplit(marker, 1)[1], add_special_tokens=False)["input_ids"]
    if not after:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return after[0] if after[0] in added and added[after[0]].special else None


def eos_token_ids(model, tokenizer) -> set[int]:
    """Tokens that end generation: the model's and the tokenizer's EOS, and the chat
    template's end-of-turn token."""
    ids: set[int] = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
