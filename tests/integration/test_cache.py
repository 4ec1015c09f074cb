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


async def test_a_prefix_with_glob_characters_matches_only_itself(namespace, common):
    import pytest

    from services.runtime.cache import delete_keys

    r = Redis.from_url(common.redis_url)
    ours, theirs = f"t:{namespace}:a?[b]*", f"t:{namespace}:aXbY"
    try:
        await r.set(ours + "k", b"1")
        await r.set(theirs + "k", b"1")  # what the prefix would match as a glob
        assert await delete_keys(r, ours) == 1
        assert await r.get(theirs + "k") == b"1"
        with pytest.raises(ValueError):
            await delete_keys(r, "")
    finally:
        await r.delete(ours + "k", theirs + "k")
        await r.aclose()
