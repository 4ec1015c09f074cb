"""Kafka connection options, topic creation and the raw aiokafka helpers the tools use."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from contracts import topics as topic_names
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)


def client_options(settings: CommonSettings) -> dict[str, Any]:
    """aiokafka connection options: SASL and TLS are configuration, never code."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    return opts


def all_topics(prefix: str = "") -> list[str]:
    names = [*topic_names.ALL, *(topic_names.dlq(t) for t in topic_names.ALL)]
    return [prefix + n for n in names]


async def ensure_topics(settings: CommonSettings, names: list[str] | None = None) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    names = names or all_topics(settings.topic_prefix)
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in names if n not in existing]
        if wanted:
            try:
                await admin.create_topics(
                    [NewTopic(n, settings.topic_partitions, 1) for n in wanted], timeout_ms=10_000
                )
            except TopicAlreadyExistsError:
                pass  # another replica won the race
            log.info("created topics %s", ", ".join(wanted))
        return wanted
    finally:
        await admin.close()


class TopicNotFound(LookupError):
    pass


async def assign_whole_topic(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of `topic` to a started consumer (no group rebalance involved)."""
    # aiokafka has no public call that refreshes the consumer's own metadata for one topic.
    await consumer._client.force_metadata_update()
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TopicNotFound(f"topic {topic!r} does not exist")
    parts = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(parts)
    return parts
