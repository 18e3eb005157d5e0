"""One running job: its worker process, and the thread that follows it.

The runner starts `python -m adapterd.training.worker JOB_DIR`, hands it its settings on
stdin (the spec as the job's record holds it, the base model, the device, its niceness),
reads its events off a pipe, and settles the job when it exits. It knows nothing of the
store or the registry: the manager gives it callables for what it reports.

    record(type, data, at)        an event of the job, as watchers see it
    progress(fields)              the job's step, total steps and last loss
    publish(adapter_dir, metrics) the trained adapter into the registry -> "name@N"
    finished(state, fields)       the job's final state, once, when the worker is done

On success the adapter is published, unless its retention on the general set falls below
the job's --min-retention (the job fails with the figures, and nothing is published). A
crash or an OOM fails the job with the reason, and inference never notices either.
`cancel()` sends the worker SIGTERM (it stops at the end of its step), then SIGKILL after
the grace period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from adapterd.training.evaluate import flat_metrics, retention_failure
from adapterd.training.store import Job

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 2000  # of the worker's own output, quoted when it dies without a word


class WorkerRun:
    def __init__(self, job: Job, job_dir: Path, settings: dict, *, cancel_grace_s: float,
                 record: Callable[[str, dict, float | None], object], progress: Callable[[dict], None],
                 publish: Callable[[Path, dict], str], finished: Callable[[str, dict], None]):
        self.job = job
        self.dir = job_dir
        self.settings = settings  # the worker's input: spec, base_model, device, compute_dtype, nice
        self.cancel_grace_s = cancel_grace_s
        self.record, self.progress, self.publish, self.finished = record, progress, publish, finished
        self.thread = threading.Thread(target=self._main, name=f"training-{job.id}", daemon=True)
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stop_reason: str | None = None  # set by cancel() or stop()
        self._stopped_state = "cancelled"

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self._signal("cancelled by the user", "cancelled")

    def stop(self, reason: str) -> None:
        """End the job as failed, with `reason` (the server is going away)."""
        self._signal(reason, "failed")

    def kill(self) -> None:
        """SIGKILL the worker and what it started, waiting for nothing."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is its pid

    @property
    def stopping(self) -> bool:
        """Cancelled or stopped: the pacer leaves it running so it can end its step."""
        return self._stop_reason is not None

    def _signal(self, reason: str, state: str) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason, self._stopped_state = reason, state
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the worker stops at the end of its step
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGCONT)  # paused while the server served (pacing.py)
            timer = threading.Timer(self.cancel_grace_s, _kill_if_alive, (proc,))
            timer.daemon = True
            timer.start()

    def _main(self) -> None:
        job = self.job
        try:
            state, fields = self._work()
        except Exception as e:  # a bug here must not leave the job running forever
            log.exception("training job %s: runner failed", job.id)
            state, fields = "failed", {"error": f"the job runner failed: {type(e).__name__}: {e}"}
        shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(self.dir / "adapter", ignore_errors=True)
        log.info("training job %s %s%s", job.id, state, f": {fields['error']}" if fields.get("error") else "")
        self.finished(state, fields)

    def _work(self) -> tuple[str, dict]:
        read_fd, write_fd = os.pipe()
        with open(self.dir / "worker.log", "ab") as log_file:
            with self._lock:
                if self._stop_reason is not None:
                    os.close(read_fd)
                    os.close(write_fd)
                    return self._stopped_state, {"error": self._stop_reason}
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "adapterd.training.worker", str(self.dir), "--events-fd", str(write_fd)],
                    pass_fds=(write_fd,), stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C at the server's terminal is not the worker's
                )
            os.close(write_fd)
            with contextlib.suppress(BrokenPipeError):  # a worker dead at once says why below
                self.proc.stdin.write(json.dumps(self.settings).encode())
                self.proc.stdin.close()
            final: dict | None = None
            with os.fdopen(read_fd, encoding="utf-8", errors="replace") as events:
                for line in events:
                    event = _parse(line)
                    if event is not None and self._on_event(event):
                        final = event
            returncode = self.proc.wait()
        if self._stop_reason is not None:
            return self._stopped_state, {"error": self._stop_reason}
        if final is not None and final["type"] == "error":
            return "failed", {"error": final.get("message", "the worker failed")}
        if final is None or final["type"] != "done" or returncode != 0:
            return "failed", {"error": self._death_reason(returncode)}
        return self._conclude(final)

    def _conclude(self, final: dict) -> tuple[str, dict]:
        """Check the trained adapter's retention, then publish it."""
        training, evaluation = final["training"], final["evaluation"]
        self.record("evaluation", {"evaluation": evaluation}, None)
        done = {"training": training, "evaluation": evaluation}
        failure = retention_failure(evaluation, self.job.spec.min_retention)
        if failure:
            return "failed", {**done, "error": failure}
        self.record("message", {"message": "publishing the adapter to the registry"}, None)
        metrics = {**flat_metrics(evaluation), **_numbers(training, "training.")}
        try:
            ref = self.publish(Path(final["adapter_dir"]), metrics)
        except Exception as e:
            return "failed", {**done, "error": f"the registry refused the trained adapter: {e}"}
        return "succeeded", {**done, "adapter": ref}

    def _on_event(self, event: dict) -> bool:
        """Record one worker event; True for the final ones (done, error, cancelled)."""
        kind, at = event.pop("type"), event.pop("time", None)
        if kind in ("done", "error", "cancelled"):
            event["type"] = kind
            return True
        if kind == "status":
            self.record("message", {"message": event.get("message", "")}, at)
        elif kind in ("started", "step", "eval"):
            self.record(kind, event, at)
            progress = {"total_steps": event["total_steps"]} if "total_steps" in event else {}
            if kind == "step":
                progress.update(step=event["step"], loss=event["loss"])
            if progress:
                self.progress(progress)
        return False

    def _death_reason(self, returncode: int) -> str:
        if returncode < 0:
            name = signal.Signals(-returncode).name
            cause = " (out of memory?)" if returncode == -signal.SIGKILL else ""
            reason = f"the training worker was killed by {name}{cause}"
        else:
            reason = f"the training worker exited with status {returncode} without finishing"
        tail = _tail(self.dir / "worker.log")
        return f"{reason}; its last output: {tail}" if tail else reason


def _parse(line: str) -> dict | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


def _numbers(d: dict, prefix: str) -> dict[str, float]:
    return {prefix + k: float(v) for k, v in d.items() if isinstance(v, int | float)}


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_CHARS))
            return " ".join(f.read().decode("utf-8", "replace").split()[-60:])
    except OSError:
        return ""


def _kill_if_alive(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
