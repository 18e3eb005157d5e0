"""Streaming detokenization and stop sequences, with the demo's byte-level tokenizer."""

from __future__ import annotations

import pytest
from adapterd.engine.demo import build_tokenizer
from adapterd.engine.text import TextStream


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _stream(tok, text: str, stop=()):
    ts = TextStream(tok, tuple(stop))
    out, hit_at = [], None
    for i, t in enumerate(tok.encode(text)):
        delta, hit = ts.push(t)
        out.append(delta)
        if hit:
            hit_at = i
            break
    return ts, out, hit_at


def test_multibyte_characters_are_released_whole(tok):
    ts, out, _ = _stream(tok, "naïve ☃ ok")
    assert "".join(out) + ts.flush() == "naïve ☃ ok"
    assert all("\ufffd" not in d for d in out)
    assert out[2] == "" and out[3] == "ï", "the first byte of ï is held until the second arrives"


def test_stop_sequence_is_cut_and_never_streamed(tok):
    ts, out, hit_at = _stream(tok, "answer: 42\n###\nmore", stop=["###"])
    assert hit_at is not None
    assert "".join(out) == "answer: 42\n"
    assert "#" not in "".join(out)


def test_partial_stop_prefix_is_held_then_released(tok):
    ts, out, hit_at = _stream(tok, "a#b##c", stop=["###"])
    assert hit_at is None
    assert "".join(out) + ts.flush() == "a#b##c"
    assert out[1] == "", "'#' could start '###', so it is held back"


def test_earliest_of_several_stops_wins(tok):
    _, out, hit_at = _stream(tok, "one END two STOP", stop=["STOP", "END"])
    assert "".join(out) == "one "


def test_invalid_bytes_are_released_not_dropped(tok):
    ts = TextStream(tok, ())
    ids = [0x8D, 0xA9, 0xA9, 0xA9, 0xA9, 0xA9, 0xA9]  # continuation bytes: never a character
    out = [ts.push(t)[0] for t in ids]
    text = "".join(out) + ts.flush()
    assert text == tok.decode(ids) and text.count("\ufffd") >= 1
    assert "".join(out), "invalid bytes are released during the stream, not held to the end"
