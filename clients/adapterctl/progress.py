"""adapterctl's progress display, one for every long command (train --wait and jobs watch,
push, export):

    step 40/240 [####....................]  17% loss 2.2370 lr 2.9e-03 1165 tok/s eta 0:17
    received 120.5/513.2 MiB [#####...................]  23% 41.2 MiB/s

On a terminal the line is redrawn in place, and a note (a validation loss, a phase of the
work) goes on a line of its own above it. Elsewhere (a log, a pipe) it is one line per
tenth of the work and the last, so a log shows the progress without a line per update.
"""

from __future__ import annotations

import time


def size(n: float) -> str:
    """Bytes for people: 512 B, 12.0 KiB, 3.4 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Progress:
    """The line `{before} [######..........]  42% {after}` on `out`, drawn by show()."""

    WIDTH = 24
    MIN_REDRAW_S = 0.0  # on a terminal, the least time between redraws (the last always drawn)

    def __init__(self, out):
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.started = time.monotonic()
        self.line = ""
        self.shown = False
        self._last_tenth = -1
        self._last_draw = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def show(self, frac: float, before: str, after: str) -> None:
        """Draws the line at `frac` of the work (1: done, always drawn)."""
        frac = min(max(frac, 0.0), 1.0)
        filled = int(frac * self.WIDTH)
        self.line = f"{before} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac:4.0%} {after}"
        final = frac >= 1.0
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < self.MIN_REDRAW_S and not final and self.shown:
                return
            self._last_draw = now
            self.out.write("\r\x1b[K" + self.line)
            self.shown = True
        elif int(frac * 10) > self._last_tenth:  # done is the tenth tenth
            self._last_tenth = int(frac * 10)
            self.out.write(self.line + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        """A line of its own, above the bar."""
        if self.tty and self.shown:
            self.out.write("\r\x1b[K" + text + "\n" + self.line)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        """Ends the bar's line on a terminal."""
        if self.tty and self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False
