"""The Redis client keeps to its own keys on a possibly shared server."""

from redis.asyncio import Redis

from services.runtime.cache import Cache


async def test_cache_writes_and_cleans_only_its_own_keys(common, namespace):
    cache = Cache(common, "notify")
    neighbour = Redis.from_url(common.redis_url)
    other_key = f"someone-else:{namespace}"
    try:
        assert await cache.ping()
        await neighbour.set(other_key, b"keep me")
        await cache.redis.set(cache.key("cap", "c-1"), b"1")
        await cache.redis.set(cache.key("cap", "c-2"), b"1")
        assert cache.key("cap", "c-1") == f"crm-test:{namespace}:notify:cap:c-1"
        assert await cache.delete_own_keys() == 2
        assert await cache.redis.get(cache.key("cap", "c-1")) is None
        assert await neighbour.get(other_key) == b"keep me"
    finally:
        await neighbour.delete(other_key)
        await neighbour.aclose()
        await cache.close()
