"""Store turns: the services on one machine send the embedded store one request at a time.

SecantusDB (the embedded default store) serves its connections from threads of one Python
process, and serves several busy clients at once more slowly than one. In `crm bench` on this
project's 2-core machines, four connections writing bulk upserts together got 576.7
documents/s out of it, against 744.3 for one, and 690.9 for the same four taking turns
(docs/benchmarks-history.md, "Store turns"). So when `CRM_STORE_TURNS_FILE` is set (the embedded stack
sets it), every service holds an exclusive `flock` on that file for each of its hot-path store
requests. A real MongoDB serves concurrent requests well: leave it unset there (the default),
and a turn costs nothing.

A turn only saves the store time; it guards no data. So a request goes ahead without its turn
when the turn does not come within `wait_limit_s` (a hung store request elsewhere, a stopped
process holding it) or the file cannot be used, and says so in the log. An flock belongs to an
open file and dies with its process: a service killed in its turn (kill -9) frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_LIMIT_S = 10.0
WARN_EVERY_S = 60.0


class TurnsUnavailable(RuntimeError):
    """The turns file cannot be opened or locked (checked once, at start-up)."""


class StoreTurns:
    def __init__(self, path: Path | None = None, wait_limit_s: float = WAIT_LIMIT_S):
        self.path = path
        self.wait_limit_s = wait_limit_s
        # Tasks of one process queue here first, so a process waits on the file at most once.
        # Not reentrant: a turn must not be taken inside another (it would wait for ever).
        self._local = asyncio.Lock()
        self._warned_at: float | None = None
        # Blocking waits still in their thread (one given up on stays until the lock comes).
        self._threads = 0

    def check(self) -> None:
        """Fail at start-up, with the reason, where every request would otherwise go without."""
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TurnsUnavailable(
                f"CRM_STORE_TURNS_FILE={self.path}: {exc.strerror}. It must be a file this user can create "
                f"or read, in an existing directory; unset it when the store is not the embedded one."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another service is in its turn: the file works
        except OSError as exc:
            raise TurnsUnavailable(f"CRM_STORE_TURNS_FILE={self.path}: flock failed ({exc.strerror})") from exc
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self.path is None:
            yield
            return
        async with self._local:
            fd = await self._take()
            try:
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # closing the file ends the turn

    async def _take(self) -> int | None:
        """A descriptor holding the lock, or None: go ahead without a turn."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)  # type: ignore[arg-type]
        except OSError as exc:
            self._warn(f"cannot open {self.path} ({exc.strerror})")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd  # free: no thread needed
        except BlockingIOError:
            pass
        except OSError as exc:
            os.close(fd)
            self._warn(f"flock on {self.path} failed ({exc.strerror})")
            return None
        if self._threads:
            # An earlier wait was given up on and its holder still has not let go: waiting again
            # would cost every request the whole limit, and a thread and a file each.
            os.close(fd)
            self._warn(f"the store's turn is still held by another process ({self.path})")
            return None
        try:
            granted = self._wait_in_thread(fd)
        except RuntimeError as exc:  # no thread to be had
            os.close(fd)
            self._warn(f"cannot wait for the turn ({exc})")
            return None
        try:
            done, _ = await asyncio.wait({granted}, timeout=self.wait_limit_s)
        except BaseException:
            _abandon(granted)
            raise
        if not done:
            _abandon(granted)
            self._warn(f"no turn at the store within {self.wait_limit_s:.0f}s (a stopped process may hold {self.path})")
            return None
        return granted.result()

    def _wait_in_thread(self, fd: int) -> asyncio.Future:
        """A future for the blocking lock, taken in a daemon thread (a wait that outlives the event
        loop does not hold up the process's exit). Its result is `fd`, locked, or None on an
        error; a lock that comes after the waiter gave up is let go at once."""
        loop = asyncio.get_running_loop()
        granted: asyncio.Future = loop.create_future()

        def settle(ok: bool) -> None:  # in the loop's thread, as is `_abandon`: no race between them
            self._threads -= 1
            if ok and not granted.done():
                granted.set_result(fd)
                return
            os.close(fd)
            if not ok:
                self._warn(f"flock on {self.path} failed")
            if not granted.done():
                granted.set_result(None)

        def wait() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                ok = True
            except OSError:
                ok = False
            try:
                loop.call_soon_threadsafe(settle, ok)
            except RuntimeError:  # the loop is closed: nobody will use the turn
                os.close(fd)

        thread = threading.Thread(target=wait, name="store-turn", daemon=True)
        thread.start()
        self._threads += 1
        return granted

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("store turns: %s; requests go ahead without a turn meanwhile", what)


def _abandon(granted: asyncio.Future) -> None:
    """The waiter gives up: a lock granted meanwhile ends now, a later one when it comes."""
    if granted.done():
        fd = granted.result()
        if fd is not None:
            os.close(fd)
    else:
        granted.cancel()
