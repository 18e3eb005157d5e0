"""Echoing input in a message, and free text shown to other users."""

from __future__ import annotations

import unicodedata

from adapterd_rules.errors import InvalidText

QUOTE_CHARS = 120
MAX_DESCRIPTION_CHARS = 4096


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """`value` as an error message may echo it: repr() (so control characters come out
    escaped), cut to `limit` characters. A message never carries a whole hostile input: a
    100,000-character name must not become a 100 KB status message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


def control_character(text: str) -> tuple[int, str] | None:
    """(position, character) of the first character that a terminal would act on instead of
    showing (C0 and C1 controls, DEL, line and paragraph separators), or None."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return i, ch
    return None


def check_text(text: str, field: str, max_chars: int = MAX_DESCRIPTION_CHARS) -> str:
    """A free-text field shown to other users (a description): bounded, and one line of
    printable text, so it cannot move another user's cursor, retitle or clear a terminal."""
    if len(text) > max_chars:
        raise InvalidText(f"{field} is {len(text)} characters; at most {max_chars} are allowed")
    found = control_character(text)
    if found is not None:
        i, ch = found
        raise InvalidText(
            f"{field} holds a control character (U+{ord(ch):04X} at position {i}); "
            "use one line of printable text"
        )
    return text
