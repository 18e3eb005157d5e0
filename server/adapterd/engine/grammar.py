"""Structured output: a JSON schema (or "any JSON object") compiled into a token grammar,
and a per-row matcher that says which tokens may come next.

    GrammarCompiler(tokenizer, vocab_size, stop_ids)    once per engine (lazy: it takes a
      .compile(ResponseFormat) -> Grammar               while on a real vocabulary), any thread
    Grammar.matcher() -> Matcher                        one per row (sampling.RowSampler)
    allowed_mask(matchers, vocab) -> (n, V) bool        batched, at sampling

The library is xgrammar: its mask per token is fast on the byte-level demo tokenizer and on
a real vocabulary alike, where llguidance is as fast on the real one but takes a slow path
on the byte tokenizer, which rules it out for the demo model and the tests (README,
"Figures"); outlines-core builds a full index per schema up front (seconds on a real
vocabulary). When the grammar is complete only the stop tokens (the engine's EOS set)
are allowed, so a finished JSON value ends its row as EOS does, with no engine change.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from adapterd.errors import InvalidArgument

KINDS = ("json_object", "json_schema")
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")  # xgrammar's "[11:13:26] /project/cpp/x.cc:94: "


@dataclass(frozen=True)
class ResponseFormat:
    """What the output must be: any JSON object, or JSON valid against `schema` (JSON text)."""

    kind: str  # "json_object" | "json_schema"
    schema: str = ""


class Matcher:
    """One row's position in its grammar. Engine thread only."""

    __slots__ = ("_m", "vocab_size")

    def __init__(self, matcher, vocab_size: int):
        self._m = matcher
        self.vocab_size = vocab_size

    @property
    def done(self) -> bool:
        """The grammar accepted a stop token: nothing constrains this row any more."""
        return self._m.is_terminated()

    def accept(self, token: int) -> None:
        if not self._m.is_terminated():
            self._m.accept_token(token)


class Grammar:
    """A compiled grammar (shared by rows; compiled once per schema)."""

    __slots__ = ("_compiled", "vocab_size")

    def __init__(self, compiled, vocab_size: int):
        self._compiled = compiled
        self.vocab_size = vocab_size

    def matcher(self) -> Matcher:
        import xgrammar as xgr

        return Matcher(xgr.GrammarMatcher(self._compiled), self.vocab_size)


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: Iterable[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info)  # caches compiled grammars by schema
            return self._compiler

    def compile(self, fmt: ResponseFormat) -> Grammar:
        """InvalidArgument naming the problem when the schema cannot be compiled."""
        if fmt.kind not in KINDS:
            raise InvalidArgument(f"response_format.type must be one of {', '.join(KINDS)} or text; got {fmt.kind!r}")
        schema = '{"type": "object"}' if fmt.kind == "json_object" else fmt.schema
        try:
            parsed = json.loads(schema)
        except ValueError as e:
            raise InvalidArgument(f"response_format.json_schema is not valid JSON: {e}") from e
        if not isinstance(parsed, (dict, bool)):
            raise InvalidArgument("response_format.json_schema must be a JSON Schema object")
        try:
            # Compact JSON (no free whitespace): a model cannot pad its answer until max_tokens.
            compiled = self._get().compile_grammar(_strict_json_ebnf(schema))
        except (RuntimeError, ValueError, TypeError) as e:
            message = _CPP_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise InvalidArgument(f"response_format.json_schema cannot be compiled: {message}") from e
        return Grammar(compiled, self._vocab_size)


# xgrammar 0.2's rule for a string with maxLength/minLength lets raw control characters in
# (invalid JSON, which the random test model found at once); its plain string rule does not.
_LOOSE_CHAR = r'[^\"\\\r\n]'
_STRICT_CHAR = r'[^\0-\x1f\"\\]'


def _strict_json_ebnf(schema: str) -> str:
    """The schema's grammar as EBNF, compact (no free whitespace: a model cannot pad its
    answer until max_tokens), with strings that are valid JSON."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    return ebnf.replace(_LOOSE_CHAR, _STRICT_CHAR)


def allowed_mask(matchers: Sequence[Matcher], vocab: int, device: torch.device) -> torch.Tensor:
    """(n, vocab) bool: the tokens each matcher allows next. Tokens past the grammar's
    vocabulary (a padded lm_head) are never allowed."""
    n, words = len(matchers), (matchers[0].vocab_size + 31) // 32
    bitmask = torch.zeros(n, words, dtype=torch.int32)  # (n, W): bit j of word w = token 32w + j
    for i, m in enumerate(matchers):
        m._m.fill_next_token_bitmask(bitmask, i)
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # (n, W, 32)
    allowed = bits.reshape(n, words * 32).bool()  # (n, 32W)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))  # pads with False
    return allowed[:, :vocab].to(device)  # (n, V)
