"""Topic names. Every topic has a `<topic>.dlq` twin for dead letters."""

SHOP_PURCHASES = "shop.purchases"
SHOP_INTERACTIONS = "shop.interactions"
CRM_PROFILE = "crm.profile"
CRM_LOYALTY = "crm.loyalty"
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
    CRM_LOYALTY,
    CRM_REFERRALS,
    CRM_CHURN,
    CRM_CARE,
    CRM_RETENTION,
    CRM_NOTIFICATIONS,
)


def dlq(topic: str) -> str:
    return f"{topic}.dlq"
