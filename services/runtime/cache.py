"""The Redis client: hot, short-lived state (caps, deferrals, wake-ups). Every key carries our prefix.

Nothing kept only here is irreplaceable: losing Redis may delay a message, never lose or duplicate one.
"""

from __future__ import annotations

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
        removed = 0
        async for key in self.redis.scan_iter(match=self.prefix.replace("*", r"\*") + "*", count=500):
            removed += await self.redis.delete(key)
        return removed

    async def close(self) -> None:
        await self.redis.aclose()
