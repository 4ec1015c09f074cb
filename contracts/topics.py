"""Topic names. Every topic has a `<topic>.dlq` twin for dead letters."""

SHOP_PURCHASES = "shop.purchases"
SHOP_INTERACTIONS = "shop.interactions"
# What a consumer of the profile or the ledger needs is on a topic with nothing else: churn and
# notify read every profile snapshot, churn every tier change. When segment and stage changes
# shared crm.profile and tier changes crm.loyalty, churn parsed and skipped two records of every
# three it read (docs/benchmarks-history.md).
CRM_PROFILE = "crm.profile"  # profile snapshots and erasures
CRM_SEGMENTS = "crm.segments"  # segment and lifecycle-stage changes (campaigns, analytics)
CRM_LOYALTY = "crm.loyalty"  # the points ledger's movements
CRM_TIERS = "crm.tiers"  # tier changes
# Loyalty's hand-over of a referrer's reward to the replica that owns the referrer: a topic of its
# own, so that loyalty does not read its whole output (every ledger event) to find them.
CRM_REFERRALS = "crm.referrals"
CRM_CHURN = "crm.churn"
CRM_CARE = "crm.care"
CRM_RETENTION = "crm.retention"
CRM_NOTIFICATIONS = "crm.notifications"

ALL = (
    SHOP_PURCHASES,
    SHOP_INTERACTIONS,
    CRM_PROFILE,
    CRM_SEGMENTS,
    CRM_LOYALTY,
    CRM_TIERS,
    CRM_REFERRALS,
    CRM_CHURN,
    CRM_CARE,
    CRM_RETENTION,
    CRM_NOTIFICATIONS,
)


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


# Topics that event types left for a topic of their own: referral hand-overs crm.loyalty ->
# crm.referrals (dbfa1cd), segment and stage changes crm.profile -> crm.segments and tier changes
# crm.loyalty -> crm.tiers (0e276fb). A stored outbox entry names its topic, and one stored before
# the move names the old one, whose readers would dead-letter it or which no service reads: the
# runtime sends an entry stored under one of these to its type's topic instead
# (services/runtime/statestore.py, `current_topic`).
LEFT_BY_TYPES = frozenset({CRM_PROFILE, CRM_LOYALTY})
