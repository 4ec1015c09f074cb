"""Store turns: the services on one machine send the embedded store one request at a time.

SecantusDB (the embedded default store) serves its connections from threads of one Python
process. Measured on this project's 2-core machines, four clients writing bulk upserts at the
same time got 596-706 documents/s out of it, against 1,056-1,532 for one client alone and
1,146-1,222 for the same four clients taking turns (docs/BENCHMARKS.md, "Store turns"). So
when `CRM_STORE_TURNS_FILE` is set, every service holds an exclusive `flock` on that file for
each of its hot-path store requests. A real MongoDB serves concurrent requests well: leave it
unset there (the default), and the turns cost nothing.

An flock belongs to an open file and dies with its process, so a service killed while holding
its turn (kill -9) releases it; nothing is left to clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path


class StoreTurns:
    def __init__(self, path: Path | None = None):
        self.path = path
        # Tasks of one process queue here first, so a process waits on the file with one thread.
        self._local = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self.path is None:
            yield
            return
        async with self._local:
            fd = await _lock(self.path)
            try:
                yield
            finally:
                os.close(fd)  # closing the file releases the lock


async def _lock(path: Path) -> int:
    """Open the file and wait for its exclusive lock in a worker thread; the descriptor holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    waiting = asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
    try:
        await asyncio.shield(waiting)
    except BaseException:
        # Cancelled while the thread still waits: it gets the lock later, and must let it go then.
        waiting.add_done_callback(lambda _f: os.close(fd))
        raise
    return fd
