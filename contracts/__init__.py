"""The event contracts: envelope, shop events, crm events, and per-topic registries."""

from contracts import crm, shop, topics
from contracts.envelope import Event, InvalidMessage, Registry, derive, derived_id, scheduled

EVENTS_BY_TOPIC: dict[str, tuple[type[Event], ...]] = {
    topics.SHOP_PURCHASES: shop.PURCHASE_EVENTS,
    topics.SHOP_INTERACTIONS: shop.INTERACTION_EVENTS,
    topics.CRM_PROFILE: crm.PROFILE_EVENTS,
    topics.CRM_SEGMENTS: crm.SEGMENT_EVENTS,
    topics.CRM_LOYALTY: crm.LOYALTY_EVENTS,
    topics.CRM_TIERS: crm.TIER_EVENTS,
    topics.CRM_REFERRALS: crm.REFERRAL_EVENTS,
    topics.CRM_CHURN: crm.CHURN_EVENTS,
    topics.CRM_CARE: crm.CARE_EVENTS,
    topics.CRM_RETENTION: crm.RETENTION_EVENTS,
    topics.CRM_NOTIFICATIONS: crm.NOTIFICATION_EVENTS,
}


# Where each event type is published now (every type lives on one topic; a unit test checks that
# each model's TOPIC agrees).
TOPIC_OF_TYPE: dict[str, str] = {m.__name__: t for t, models in EVENTS_BY_TOPIC.items() for m in models}


def registry_for(*topic_names: str, max_bytes: int = 1_000_000) -> Registry:
    models = [m for t in topic_names for m in EVENTS_BY_TOPIC[t]]
    return Registry.of(*models, max_bytes=max_bytes)


__all__ = [
    "EVENTS_BY_TOPIC",
    "TOPIC_OF_TYPE",
    "Event",
    "InvalidMessage",
    "Registry",
    "crm",
    "derive",
    "derived_id",
    "registry_for",
    "scheduled",
    "shop",
    "topics",
]
