"""Store turns: one request at a time across processes sharing the lock file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.runtime.turns import StoreTurns, TurnsUnavailable


def _held_elsewhere(path) -> bool:
    """Whether another open file holds the lock (a fresh descriptor cannot take it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _someone_waits(path) -> bool:
    """Whether a blocked flock on this file is queued (/proc/locks marks waiters with `->`)."""
    inode = os.stat(path).st_ino
    return any("->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines())


async def _until(condition, limit_s: float = 10.0) -> bool:
    for _ in range(int(limit_s / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


@contextlib.contextmanager
def _holder(path):
    """Another process in its turn until the block ends (or it is killed)."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.readline()
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout.readline().strip() == "held"
            yield p
        finally:
            p.kill()


async def _take(turns: StoreTurns) -> None:
    async with turns.turn():
        pass


async def test_without_a_file_turns_are_free():
    turns = StoreTurns()
    turns.check()
    async with turns.turn(), turns.turn():  # not even a process-local lock: nothing waits
        pass


async def test_a_turn_holds_the_file_lock_and_releases_it(tmp_path):
    path = tmp_path / "store.turns"
    turns = StoreTurns(path)
    turns.check()
    async with turns.turn():
        assert _held_elsewhere(path)
    assert not _held_elsewhere(path)


async def test_two_holders_of_the_same_file_take_turns(tmp_path):
    path = tmp_path / "store.turns"
    a, b = StoreTurns(path), StoreTurns(path)  # two services: two open files
    inside, most = 0, 0

    async def request(turns: StoreTurns) -> None:
        nonlocal inside, most
        async with turns.turn():
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(request(t) for t in (a, b, a, b, a, b)))
    assert most == 1


async def test_a_waiter_cancelled_before_its_turn_does_not_keep_the_lock(tmp_path):
    path = tmp_path / "store.turns"
    turns = StoreTurns(path)
    with _holder(path) as holder:
        waiter = asyncio.create_task(_take(turns))
        assert await _until(lambda: _someone_waits(path))  # blocked in flock, not before it
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)
        # The abandoned wait got the lock once the holder left, and let it go at once.
        assert await _until(lambda: not _held_elsewhere(path))
    await asyncio.wait_for(_take(turns), 5)


async def test_a_turn_that_does_not_come_in_time_is_gone_without(tmp_path, caplog):
    path = tmp_path / "store.turns"
    turns = StoreTurns(path, wait_limit_s=0.3)
    with _holder(path) as holder:
        await asyncio.wait_for(_take(turns), 5)  # a stopped holder does not stop this service
        assert "no turn at the store within" in caplog.text
        # While that holder keeps the turn, requests go ahead at once: no second waiting thread.
        turns._warned_at = None
        for _ in range(3):
            await asyncio.wait_for(_take(turns), 5)
        assert turns._threads == 1 and "still held by another process" in caplog.text
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)
        assert await _until(lambda: not _held_elsewhere(path))
        assert await _until(lambda: turns._threads == 0)
    async with turns.turn():
        assert _held_elsewhere(path)  # turns again once the holder let go


async def test_a_killed_holder_releases_its_turn(tmp_path):
    path = tmp_path / "store.turns"
    turns = StoreTurns(path)
    with _holder(path) as holder:
        waiter = asyncio.create_task(_take(turns))
        assert await _until(lambda: _someone_waits(path))
        holder.kill()  # kill -9: the kernel drops the lock with the process
        await asyncio.wait_for(waiter, 10)


def test_an_unusable_file_is_refused_at_start_up(tmp_path):
    with pytest.raises(TurnsUnavailable, match="CRM_STORE_TURNS_FILE"):
        StoreTurns(tmp_path / "missing-dir" / "store.turns").check()


async def test_a_file_gone_bad_later_lets_requests_go_ahead(tmp_path, caplog):
    turns = StoreTurns(tmp_path / "missing-dir" / "store.turns")
    await asyncio.wait_for(_take(turns), 5)
    assert "cannot open" in caplog.text


class _RecordingTurns:
    def __init__(self):
        self.taken = 0

    @contextlib.asynccontextmanager
    async def turn(self):
        self.taken += 1
        yield


class _Collection:
    def __init__(self, docs=()):
        self.docs = {d["_id"]: d for d in docs}

    async def bulk_write(self, ops, ordered):
        from types import SimpleNamespace

        for op in ops:
            if hasattr(op, "_doc"):
                self.docs[op._filter["_id"]] = op._doc
        return SimpleNamespace(modified_count=len(ops))

    def find(self, query, projection=None):
        wanted = set(query["_id"]["$in"])

        async def scan():
            for d in list(self.docs.values()):
                if d["_id"] in wanted:
                    yield d

        return scan()


async def test_the_state_store_takes_a_turn_for_each_hot_path_request():
    from datetime import UTC, datetime

    from services.runtime.statestore import ClockMarks, StateStore

    store, turns = StateStore(_Collection()), _RecordingTurns()
    store.turns = turns
    docs = await store.load(["c1", "c2"])  # not known to be complete: one read
    assert turns.taken == 1
    for doc in docs.values():
        doc.state, doc.dirty = {"n": 1}, True
    await store.write_beside(_Collection(), [], docs.values())
    assert turns.taken == 2
    assert await store.save(docs.values()) == 2
    assert turns.taken == 3
    await store.clear_outboxes(docs.values())
    assert turns.taken == 4
    store.complete = True
    await store.load(["c3"])  # complete: nothing is read, no turn
    assert turns.taken == 4
    marks = ClockMarks(_Collection(), turns)
    await marks.save({("shop.purchases", 0): (datetime(1997, 1, 1, tzinfo=UTC), None)})
    assert turns.taken == 5


def test_the_embedded_stack_hands_its_turns_file_to_the_services(tmp_path):
    from services.runtime.settings import CommonSettings
    from services.stack.servers import StackState

    state = StackState("k:1", "mongodb://m", "redis://r", True, store_turns_file=str(tmp_path / "mongo.turns"))
    env = state.env()
    assert env["CRM_STORE_TURNS_FILE"] == str(tmp_path / "mongo.turns")
    assert CommonSettings(store_turns_file=env["CRM_STORE_TURNS_FILE"]).store_turns_file == tmp_path / "mongo.turns"
    assert CommonSettings(store_turns_file="").store_turns_file is None  # set but empty: no turns
    assert "CRM_STORE_TURNS_FILE" not in StackState("k:1", "mongodb://m", "redis://r", True).env()
    # A state file written by another version of the stack still loads.
    saved = tmp_path / "stack.json"
    saved.write_text('{"kafka_bootstrap": "k:1", "mongo_url": "m", "redis_url": "r", "redis_embedded": true, "x": 1}')
    assert StackState.load(saved).kafka_bootstrap == "k:1"
