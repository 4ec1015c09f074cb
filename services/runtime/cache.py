"""The Redis client: hot, short-lived state (caps, deferrals, wake-ups). Every key carries our prefix.

Nothing kept only here is irreplaceable: losing Redis may delay a message, never lose or duplicate one.
"""

from __future__ import annotations

import re

from redis.asyncio import Redis

from services.runtime.settings import CommonSettings


class Cache:
    def __init__(self, settings: CommonSettings, namespace: str):
        self.redis: Redis = Redis.from_url(settings.redis_url, decode_responses=False, health_check_interval=30)
        self.prefix = f"{settings.redis_prefix}{namespace}:"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def delete_own_keys(self) -> int:
        """Remove this namespace's keys, and only those (never FLUSHDB: the server may be shared)."""
        return await delete_keys(self.redis, self.prefix)

    async def close(self) -> None:
        await self.redis.aclose()


async def delete_keys(redis: Redis, prefix: str) -> int:
    """Delete the keys that start with `prefix` (every glob character in it taken literally)."""
    if not prefix:
        raise ValueError("no prefix: that would be every key on the server")
    removed = 0
    async for key in redis.scan_iter(match=re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*", count=500):
        removed += await redis.delete(key)
    return removed
