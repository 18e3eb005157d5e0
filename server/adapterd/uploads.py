"""Uploads in progress: how many may run at once, and how long one may go quiet.

A push (PushAdapter) holds a staging file and directory, a training job's upload
(CreateJob) holds its dataset in memory, for as long as its client keeps the stream open.
Without limits, a client that sends a header and then nothing holds them for ever, and a
few hundred such clients fill the disk or the memory. So every upload

    takes a place:  at most --max-uploads-per-tenant of one tenant and --max-uploads in all
                    (RESOURCE_EXHAUSTED beyond, at once, before any byte is stored)
    keeps moving:   a stream that sends nothing for --upload-idle-timeout seconds is ended
                    with RESOURCE_EXHAUSTED, and what it stored is removed

One `Uploads` per server, shared by both services, on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator

from adapterd.config import UploadConfig
from adapterd.errors import ResourceExhausted


class Uploads:
    def __init__(self, config: UploadConfig | None = None):
        self.config = config or UploadConfig()
        self._lock = threading.Lock()
        self._by_tenant: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, tenant: str, what: str):
        """A place for one upload of `tenant` for the block; RESOURCE_EXHAUSTED if there is none."""
        c = self.config
        with self._lock:
            if self._by_tenant[tenant] >= c.max_uploads_per_tenant:
                raise ResourceExhausted(
                    f"{what}: you have {self._by_tenant[tenant]} uploads in progress, the most one tenant may "
                    f"have at once (--max-uploads-per-tenant {c.max_uploads_per_tenant}); let one finish first"
                )
            if sum(self._by_tenant.values()) >= c.max_uploads:
                raise ResourceExhausted(
                    f"{what}: the server has {c.max_uploads} uploads in progress, the most it takes at once "
                    "(--max-uploads); retry shortly"
                )
            self._by_tenant[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._by_tenant[tenant] -= 1
                if self._by_tenant[tenant] <= 0:
                    del self._by_tenant[tenant]

    async def messages(self, request_iterator, what: str) -> AsyncIterator:
        """The stream's messages, ending it with RESOURCE_EXHAUSTED when one takes longer than
        the idle timeout to arrive."""
        timeout = self.config.idle_timeout_s
        iterator = aiter(request_iterator)
        while True:
            try:
                message = await asyncio.wait_for(anext(iterator, None), timeout)
            except asyncio.TimeoutError:
                raise ResourceExhausted(
                    f"{what}: nothing arrived for {timeout:g} s (--upload-idle-timeout); the server does not "
                    "hold an idle upload: send it again, without pauses"
                ) from None
            if message is None:
                return
            yield message
