import os
import uuid

import pytest

from tests.support.backends import Backend, open_backend


@pytest.fixture(scope="session")
def backend(tmp_path_factory) -> Backend:
    with open_backend(os.environ.get("CRM_TEST_BACKEND", "embedded"), tmp_path_factory.mktemp("stack")) as b:
        yield b


@pytest.fixture
def namespace() -> str:
    """A fresh prefix per test: its own topics, consumer groups, databases and Redis keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def common(backend, namespace):
    from services.runtime.kafka import ensure_topics
    from services.runtime.settings import CommonSettings

    settings = CommonSettings(
        kafka_bootstrap=backend.kafka_bootstrap,
        mongo_url=backend.mongo_url,
        redis_url=backend.redis_url,
        topic_prefix=f"{namespace}.",
        db_prefix=f"{namespace}_",
        redis_prefix=f"crm-test:{namespace}:",
        batch_timeout_ms=50,
        # A fresh group waits about half the session timeout for members; keep tests quick.
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=500,
        retry_base_delay_s=0.05,
    )
    await ensure_topics(settings)
    return settings


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
