"""Where the integration tests find their servers (`CRM_TEST_BACKEND`).

- embedded (default): the project's own embedded stack, on free ports, in a temp dir;
- containers: testcontainers (Kafka in KRaft mode, MongoDB, Redis), where a Docker engine exists;
- external: the URLs in CRM_TEST_KAFKA_BOOTSTRAP, CRM_TEST_MONGO_URL, CRM_TEST_REDIS_URL.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backend:
    kind: str
    kafka_bootstrap: str
    mongo_url: str
    redis_url: str
    # The embedded store's: its services take turns at it (services/runtime/turns.py).
    store_turns_file: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded(var_dir: Path) -> Iterator[Backend]:
    from services.stack.servers import Stack, StackSettings

    settings = StackSettings(
        kafka_port=free_port(),
        mongo_port=free_port(),
        valkey_port=free_port(),
        smtp_port=free_port(),
        sms_port=free_port(),
        var_dir=var_dir,
    )
    stack = Stack(settings, log=lambda _msg: None)
    try:
        state = stack.up()
        yield Backend("embedded", state.kafka_bootstrap, state.mongo_url, state.redis_url, state.store_turns_file)
    finally:
        stack.down()


@contextlib.contextmanager
def containers() -> Iterator[Backend]:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.mongodb import MongoDbContainer
    from testcontainers.community.redis import RedisContainer

    with KafkaContainer().with_kraft() as kafka, MongoDbContainer("mongo:7") as mongo, RedisContainer() as redis:
        host, port = redis.get_container_host_ip(), redis.get_exposed_port(6379)
        yield Backend(
            "containers", kafka.get_bootstrap_server(), mongo.get_connection_url(), f"redis://{host}:{port}/0"
        )


@contextlib.contextmanager
def external() -> Iterator[Backend]:
    missing = [
        v for v in ("CRM_TEST_KAFKA_BOOTSTRAP", "CRM_TEST_MONGO_URL", "CRM_TEST_REDIS_URL") if not os.environ.get(v)
    ]
    if missing:
        raise RuntimeError(f"CRM_TEST_BACKEND=external needs {', '.join(missing)}")
    yield Backend(
        "external",
        os.environ["CRM_TEST_KAFKA_BOOTSTRAP"],
        os.environ["CRM_TEST_MONGO_URL"],
        os.environ["CRM_TEST_REDIS_URL"],
    )


def open_backend(kind: str, var_dir: Path):
    if kind == "embedded":
        return embedded(var_dir)
    if kind == "containers":
        return containers()
    if kind == "external":
        return external()
    raise RuntimeError(f"unknown CRM_TEST_BACKEND {kind!r}: use embedded, containers or external")
