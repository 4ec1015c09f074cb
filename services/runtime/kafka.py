"""Kafka connection options, topic creation and the raw aiokafka helpers the tools use."""

from __future__ import annotations

import logging
import ssl
from collections import Counter
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
    """Create the topics that do not exist yet; returns the ones created.

    `CRM_TOPIC_PARTITIONS` applies when none of the main topics exists. A topic added to a
    running deployment (a new version's) gets the partition count of the main topics already
    there (shop.purchases's when they differ): consumed topics must be co-partitioned (see
    `check_copartitioned`). Dead-letter twins do not count: nothing consumes them in a group."""
    names = names or all_topics(settings.topic_prefix)
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in names if n not in existing]
        if wanted:
            main = [settings.topic(t) for t in topic_names.ALL if settings.topic(t) in existing]
            # (An empty list would describe every topic of the cluster.)
            counts = _partition_counts(await admin.describe_topics(main)) if main else {}
            anchor = counts.get(settings.topic(topic_names.SHOP_PURCHASES))
            partitions = anchor or (
                Counter(counts.values()).most_common(1)[0][0] if counts else settings.topic_partitions
            )
            try:
                await admin.create_topics(
                    [NewTopic(n, partitions, settings.topic_replication_factor) for n in wanted], timeout_ms=10_000
                )
            except TopicAlreadyExistsError:
                pass  # another replica won the race
            log.info(
                "created topics %s with %d partitions, replication factor %d",
                ", ".join(wanted),
                partitions,
                settings.topic_replication_factor,
            )
        return wanted
    finally:
        await admin.close()


class NotCopartitioned(RuntimeError):
    """Topics a service consumes have different partition counts."""


def _partition_counts(metadata: list[dict]) -> dict[str, int]:
    return {t["topic"]: len(t["partitions"]) for t in metadata if not t["error_code"] and t["partitions"]}


async def partition_counts(settings: CommonSettings, names: list[str]) -> dict[str, int]:
    """The partition count of each of these topics that exists."""
    if not names:
        return {}  # an empty list would describe every topic of the cluster
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        return _partition_counts(await admin.describe_topics(names))
    finally:
        await admin.close()


async def check_copartitioned(settings: CommonSettings, names: list[str]) -> dict[str, int]:
    """The partition counts of these topics (those that exist); raises when they differ.

    A customer's events on every consumed topic must land in the same partition number, so that
    one replica owns the customer: the producers' partitioner maps the key to a partition by the
    topic's partition count, so the counts must be equal (a referral reward on a topic with
    another count would reach a replica that does not own the referrer)."""
    counts = await partition_counts(settings, names)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sorted(counts.items()))
        raise NotCopartitioned(
            f"the topics this service consumes must have the same number of partitions ({listed}); "
            "they are co-partitioned by customer id. An empty topic can be deleted and created again with "
            "the others' count; adding partitions to a topic in use moves customers' keys, so stop its "
            "producers and let every consumer's lag reach 0 first."
        )
    return counts


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
