"""Topic names. Every topic has a `<topic>.dlq` twin for dead letters."""

SHOP_PURCHASES = "shop.purchases"
SHOP_INTERACTIONS = "shop.interactions"
CRM_PROFILE = "crm.profile"
CRM_LOYALTY = "crm.loyalty"
CRM_CHURN = "crm.churn"
CRM_CARE = "crm.care"
CRM_RETENTION = "crm.retention"
CRM_NOTIFICATIONS = "crm.notifications"

ALL = (
    SHOP_PURCHASES,
    SHOP_INTERACTIONS,
    CRM_PROFILE,
    CRM_LOYALTY,
    CRM_CHURN,
    CRM_CARE,
    CRM_RETENTION,
    CRM_NOTIFICATIONS,
)


def dlq(topic: str) -> str:
    return f"{topic}.dlq"
