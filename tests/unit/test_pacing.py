"""The training pacer on a real process: stopped while the server is busy, continued once
it has been idle a moment, given its share of a window under steady traffic, never paused
with share 1."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from adapterd.training.pacing import Pacer


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # R, S, T, ...


def _until(condition, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def worker():
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.005)"],
                            start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_paused_while_busy_and_continued_when_idle(worker):
    busy = [False]
    pacer = Pacer(lambda: busy[0], lambda: [worker.pid], idle_s=0.1).start()
    try:
        assert _until(lambda: _state(worker.pid) in "RS")
        busy[0] = True
        assert _until(lambda: _state(worker.pid) == "T"), "a busy server pauses the worker"
        time.sleep(0.3)
        assert _state(worker.pid) == "T"  # stays paused as long as requests keep coming
        busy[0] = False
        assert _until(lambda: _state(worker.pid) in "RS"), "an idle server lets it run"
        assert pacer.pauses == 1
    finally:
        pacer.close()


def test_a_share_of_each_window_under_steady_traffic(worker):
    pacer = Pacer(lambda: True, lambda: [worker.pid], share=0.5, window_s=0.4).start()
    try:
        assert _until(lambda: _state(worker.pid) == "T")
        assert _until(lambda: _state(worker.pid) in "RS", timeout=1.0), "its share: it runs again while busy"
        assert _until(lambda: _state(worker.pid) == "T", timeout=1.0), "and is paused again after it"
    finally:
        pacer.close()
    assert _until(lambda: _state(worker.pid) in "RS"), "closing the pacer continues every worker"


def test_share_one_never_pauses(worker):
    pacer = Pacer(lambda: True, lambda: [worker.pid], share=1.0).start()
    time.sleep(0.2)
    assert _state(worker.pid) in "RS" and pacer.pauses == 0
    pacer.close()
