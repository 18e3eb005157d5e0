"""Training beside serving: the workers pause while the server has requests to serve.

On a machine whose cores (or accelerator) inference and training share, niceness and fewer
threads are not enough: on 2 CPU cores a training worker at nice 19 still took a served
request's p95 time per output token to 5.6x that of the idle server (bench/train.py
--latency), because every decode step waits for its slowest thread. So the worker is
stopped outright (SIGSTOP to its process group, at the end of nothing: it resumes exactly
where it was) whenever a request is running or waiting, and continued (SIGCONT) once the
server has been idle for `idle_s`. A paused job keeps its memory and loses nothing.

`share` keeps training from starving under steady traffic: while busy, the worker still
runs `share` of every `window_s` (share 0: only in the gaps between requests; share 1:
never paused, training and inference compete as before).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Pacer:
    def __init__(self, busy: Callable[[], bool], pids: Callable[[], list[int]], *, share: float = 0.0,
                 idle_s: float = 0.2, window_s: float = 10.0, interval_s: float = 0.01):
        """`busy()`: whether inference has requests now; `pids()`: the running workers'
        process ids (each leads its own process group)."""
        self.busy, self.pids = busy, pids
        self.share, self.idle_s, self.window_s, self.interval_s = share, idle_s, window_s, interval_s
        self._paused: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-pacer", daemon=True)
        self.pauses = 0  # how many times workers were paused (tests, logs)

    def start(self) -> Pacer:
        if self.share < 1:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._resume()

    def _run(self) -> None:
        idle_since = time.monotonic()
        paused_at = None  # when the current pause began
        run_until = 0.0  # a share slot: the workers run until then though the server is busy
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            if self.busy():
                idle_since = now
                if now < run_until:
                    continue
                if paused_at is not None and self.share > 0 and now - paused_at >= self.window_s * (1 - self.share):
                    self._resume()
                    paused_at, run_until = None, now + self.window_s * self.share
                    continue
                if self._pause() and paused_at is None:
                    paused_at = now
            elif now - idle_since >= self.idle_s and self._paused:
                self._resume()
                paused_at = None

    def _pause(self) -> bool:
        """Stop every running worker not stopped yet; whether any is paused now."""
        for pid in self.pids():
            if pid not in self._paused and _signal(pid, signal.SIGSTOP):
                self._paused.add(pid)
                self.pauses += 1
        return bool(self._paused)

    def _resume(self) -> None:
        for pid in list(self._paused):
            _signal(pid, signal.SIGCONT)
        self._paused.clear()


def _signal(pid: int, sig: signal.Signals) -> bool:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the worker runs in its own session: its group is its pid
        return True
    return False
