"""Population-wide values shared by every replica (RFM breakpoints, risk models), kept by version.

Each replica computes a new version now and then, stores it under `_id` = version,
and adopts whatever newest version the store holds; `maintain` is the loop that
does it, with one place for the retry-after-failure behaviour.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

log = logging.getLogger(__name__)


async def latest(collection: AsyncCollection) -> dict[str, Any] | None:
    async for d in collection.find().sort("_id", -1).limit(1):
        return d
    return None


async def insert(collection: AsyncCollection, doc: dict[str, Any]) -> dict[str, Any]:
    """Store a new version; if another replica stored that version first, theirs wins."""
    try:
        await collection.insert_one(doc)
        return doc
    except DuplicateKeyError:
        return await collection.find_one({"_id": doc["_id"]}) or doc


async def maintain(what: str, step: Callable[[], Awaitable[None]], *, interval_s: float) -> None:
    """Run `step` every `interval_s`, for ever; a failure is logged and the loop goes on."""
    while True:
        try:
            await step()
        except Exception:
            log.exception("%s failed; retrying", what)
        await asyncio.sleep(interval_s)
