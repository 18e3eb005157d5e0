"""adapterctl's one progress display (progress.py) as push and export draw it; train's is
in test_adapterctl_train.py."""

from __future__ import annotations

import io

from adapterctl.adapters import UploadBar
from adapterctl.export import ByteBar
from adapterctl.progress import size


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_upload_in_a_log_is_a_line_per_tenth_and_the_last():
    out = io.StringIO()
    bar = UploadBar(out, 100 * 2**20)
    for _ in range(100):
        bar.advance(2**20)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in out.getvalue()
    assert lines[0].startswith("sent 1.0 MiB/100.0 MiB [") and "   1% " in lines[0]
    assert lines[-1].startswith("sent 100.0 MiB/100.0 MiB [########################] 100% ")
    assert lines[-1].endswith("/s")


def test_upload_on_a_terminal_redraws_at_most_ten_times_a_second_and_always_the_end():
    out = Terminal()
    bar = UploadBar(out, 1000)
    for _ in range(10):
        bar.advance(100)  # all within far less than 0.1 s
    bar.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 2  # the first chunk and the last
    assert "sent 1000 B/1000 B [########################] 100%" in text and text.endswith("\n")


def test_export_bar_shows_mib_received_and_notes_above_it():
    out = Terminal()
    bar = ByteBar(out)
    bar.update(0, 4 * 2**20)
    bar.note("merging a@1 into the base model on the server...")
    bar.update(2**20, 4 * 2**20)
    bar.close()
    text = out.getvalue()
    assert "\r\x1b[Kmerging a@1 into the base model on the server...\nreceived 0.0/4.0 MiB" in text
    assert "received 1.0/4.0 MiB [######..................]  25% " in text


def test_sizes_for_people():
    assert [size(n) for n in (512, 12 * 1024, 3.5 * 2**20, 2**40)] == ["512 B", "12.0 KiB", "3.5 MiB", "1024.0 GiB"]
