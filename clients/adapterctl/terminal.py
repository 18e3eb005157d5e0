"""Text from the server, made safe to print on a terminal.

Names, descriptions, job messages and error messages come from the server, and through it
from other tenants: a description holding ESC sequences could retitle or clear the terminal
of whoever lists it ("evil\x1b]0;pwned\x07\x1b[2J"). The server refuses control characters
in what it stores, and adapterctl escapes whatever it prints from the server all the same:

    safe("evil\x1b]0;pwned\x07")  ->  'evil\\x1b]0;pwned\\x07'   (visible, inert)
    json_line({...})              ->  JSON whose strings hold no raw control character
"""

from __future__ import annotations

import json
import unicodedata

# Characters a terminal acts on, or that reorder what it shows: C0 and C1 controls and DEL
# (Cc), line and paragraph separators, and the bidirectional embeddings, overrides and
# isolates (a "Trojan source" reordering).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text) -> str:
    """`text` (anything; str() of it) with every unsafe character escaped."""
    text = str(text)
    if not any(_unsafe(ch) for ch in text):
        return text
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)


def json_line(obj) -> str:
    """json.dumps that keeps non-ASCII text readable but escapes, as JSON \\u escapes, the
    characters json.dumps leaves raw (DEL, C1 controls, separators, bidi controls)."""
    text = json.dumps(obj, ensure_ascii=False)
    return "".join(f"\\u{ord(ch):04x}" if _unsafe(ch) else ch for ch in text)
