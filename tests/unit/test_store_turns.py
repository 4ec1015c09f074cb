"""Store turns: one request at a time across processes sharing the lock file."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import textwrap

import pytest

from services.runtime.turns import StoreTurns


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


async def test_without_a_file_turns_are_free():
    turns = StoreTurns()
    async with turns.turn(), turns.turn():  # not even a process-local lock: nothing waits
        pass


async def test_a_turn_holds_the_file_lock_and_releases_it(tmp_path):
    path = tmp_path / "store.turns"
    turns = StoreTurns(path)
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
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        turns = StoreTurns(path)

        async def wait_for_turn() -> None:
            async with turns.turn():
                pytest.fail("the turn came while another process held the lock")

        waiter = asyncio.create_task(wait_for_turn())
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)
        # The abandoned thread got the lock once the holder left, and let it go at once.
        for _ in range(100):
            if not _held_elsewhere(path):
                break
            await asyncio.sleep(0.05)
        assert not _held_elsewhere(path)
        async with turns.turn():
            pass
    finally:
        holder.kill()


async def test_a_killed_holder_releases_its_turn(tmp_path):
    path = tmp_path / "store.turns"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, time
            fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        turns = StoreTurns(path)
        waiter = asyncio.create_task(_take(turns))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        holder.kill()  # kill -9: the kernel drops the lock with the process
        await asyncio.wait_for(waiter, 10)
    finally:
        holder.kill()


async def _take(turns: StoreTurns) -> None:
    async with turns.turn():
        pass
