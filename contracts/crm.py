"""Events the services publish on the `crm.*` topics.

Unlike shop events these tolerate unknown fields: a newer producer may add a
field (additive evolution within a schema version) before every consumer has
been redeployed, and that must not dead-letter anything.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, StrictInt

from contracts import topics
from contracts.envelope import Event, Payload
from contracts.shop import ChannelName
from contracts.types import (
    CalendarDate,
    CustomerId,
    Email,
    Locale,
    Phone,
    ShortText,
    SignedMoney,
    Timestamp,
    TimezoneName,
)


class CrmPayload(Payload):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CrmEvent(Event):
    pass


# crm.profile and crm.segments ------------------------------------------------

ValueTier = Literal["vip", "high", "medium", "low"]
LifecycleStage = Literal["new", "growing", "mature", "declining", "lost"]


class ChannelConsents(CrmPayload):
    email: bool = False
    sms: bool = False


class ProfileUpdatedData(CrmPayload):
    """The snapshot other services need; carries contact details, so crm.profile is a PII topic."""

    name: ShortText | None = None
    email: Email | None = None
    phone: Phone | None = None
    locale: Locale = "en"
    timezone: TimezoneName = "UTC"
    preferred_channel: ChannelName = "email"
    consents: ChannelConsents = Field(default_factory=ChannelConsents)
    birthday: CalendarDate | None = None
    top_categories: list[ShortText] = Field(default_factory=list)
    value_tier: ValueTier | None = None
    # When this registration began: after an erasure, a snapshot of a registration newer than the
    # erasure is of a new customer (a snapshot's own time is its cause's, which may be later than
    # the erasure request's without being a new registration).
    registered_at: Timestamp | None = None


class ProfileUpdated(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_PROFILE
    type: Literal["ProfileUpdated"] = "ProfileUpdated"
    schema_version: Literal[1] = 1
    data: ProfileUpdatedData


class SegmentChangedData(CrmPayload):
    from_segment: ShortText | None = None  # None: the first segment
    to_segment: ShortText
    recency_score: StrictInt = Field(ge=1, le=5)
    frequency_score: StrictInt = Field(ge=1, le=5)
    monetary_score: StrictInt = Field(ge=1, le=5)
    breakpoints_version: StrictInt = 0


class SegmentChanged(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_SEGMENTS
    type: Literal["SegmentChanged"] = "SegmentChanged"
    schema_version: Literal[1] = 1
    data: SegmentChangedData


class LifecycleStageChangedData(CrmPayload):
    from_stage: LifecycleStage | None = None  # None: the first stage
    to_stage: LifecycleStage


class LifecycleStageChanged(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_SEGMENTS
    type: Literal["LifecycleStageChanged"] = "LifecycleStageChanged"
    schema_version: Literal[1] = 1
    data: LifecycleStageChangedData


class CustomerErasedData(CrmPayload):
    request_id: ShortText


class CustomerErased(CrmEvent):
    """Personal data is gone from the profile; every other service erases its copy."""

    TOPIC: ClassVar[str] = topics.CRM_PROFILE
    type: Literal["CustomerErased"] = "CustomerErased"
    schema_version: Literal[1] = 1
    data: CustomerErasedData


# crm.care and crm.retention -------------------------------------------------

CareKind = Literal[
    "welcome",
    "first_purchase_thanks",
    "complaint_acknowledgement",
    "satisfaction_follow_up",
    "birthday_greeting",
    "tier_upgrade",
    "tier_downgrade_warning",
    "points_expiring",
    "birthday_bonus",
]
Purpose = Literal["transactional", "marketing"]


class CareRequestedData(CrmPayload):
    kind: CareKind
    purpose: Purpose
    # What the template needs (name, tier, points, categories...), JSON values only.
    template_data: dict[str, Any] = Field(default_factory=dict)
    not_before: Timestamp | None = None
    # After this the message is pointless (a birthday greeting after the day): it is not sent.
    not_after: Timestamp | None = None


class CareRequested(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_CARE
    type: Literal["CareRequested"] = "CareRequested"
    schema_version: Literal[1] = 1
    data: CareRequestedData


RiskBand = Literal["low", "medium", "high", "lost"]


class RetentionRequestedData(CrmPayload):
    step: StrictInt = Field(ge=1)
    kind: Literal["care", "offer"]
    purpose: Purpose = "marketing"
    band: RiskBand
    value_tier: ValueTier | None = None
    reasons: list[str] = Field(default_factory=list)
    template_data: dict[str, Any] = Field(default_factory=dict)


class RetentionRequested(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_RETENTION
    type: Literal["RetentionRequested"] = "RetentionRequested"
    schema_version: Literal[1] = 1
    data: RetentionRequestedData


class RetentionTaskCreatedData(CrmPayload):
    risk_score: float = Field(ge=0, le=1)
    value_tier: ValueTier | None = None
    reasons: list[str] = Field(default_factory=list)


class RetentionTaskCreated(CrmEvent):
    """A VIP at high risk: a human account manager takes over."""

    TOPIC: ClassVar[str] = topics.CRM_RETENTION
    type: Literal["RetentionTaskCreated"] = "RetentionTaskCreated"
    schema_version: Literal[1] = 1
    data: RetentionTaskCreatedData


# crm.loyalty, crm.tiers and crm.referrals -------------------------------------


class PointsEarnedData(CrmPayload):
    order_id: ShortText | None = None
    reason: ShortText
    points: StrictInt
    balance: StrictInt
    expires_on: CalendarDate | None = None


class PointsEarned(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_LOYALTY
    type: Literal["PointsEarned"] = "PointsEarned"
    schema_version: Literal[1] = 1
    data: PointsEarnedData


class PointsRedeemedData(CrmPayload):
    redemption_id: ShortText
    reward: ShortText
    points: StrictInt
    balance: StrictInt


class PointsRedeemed(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_LOYALTY
    type: Literal["PointsRedeemed"] = "PointsRedeemed"
    schema_version: Literal[1] = 1
    data: PointsRedeemedData


class PointsExpiredData(CrmPayload):
    lot_id: ShortText
    points: StrictInt
    balance: StrictInt


class PointsExpired(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_LOYALTY
    type: Literal["PointsExpired"] = "PointsExpired"
    schema_version: Literal[1] = 1
    data: PointsExpiredData


class PointsReversedData(CrmPayload):
    order_id: ShortText
    refund_id: ShortText
    points: StrictInt
    balance: StrictInt


class PointsReversed(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_LOYALTY
    type: Literal["PointsReversed"] = "PointsReversed"
    schema_version: Literal[1] = 1
    data: PointsReversedData


class TierChangedData(CrmPayload):
    from_tier: ShortText | None = None  # None: the first tier
    to_tier: ShortText
    reason: ShortText
    qualifying_spend: SignedMoney | None = None


class TierChanged(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_TIERS
    type: Literal["TierChanged"] = "TierChanged"
    schema_version: Literal[1] = 1
    data: TierChangedData


class RedemptionRejectedData(CrmPayload):
    redemption_id: ShortText
    reward: ShortText
    points: StrictInt
    reason: Literal["insufficient_balance", "unknown_reward", "duplicate_redemption_id"]


class RedemptionRejected(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_LOYALTY
    type: Literal["RedemptionRejected"] = "RedemptionRejected"
    schema_version: Literal[1] = 1
    data: RedemptionRejectedData


class ReferralQualifiedData(CrmPayload):
    """A referred customer made a first purchase: the referrer (this event's customer) earns the reward."""

    referee_id: CustomerId
    order_id: ShortText


class ReferralQualified(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_REFERRALS
    type: Literal["ReferralQualified"] = "ReferralQualified"
    schema_version: Literal[1] = 1
    data: ReferralQualifiedData


# crm.churn -----------------------------------------------------------------


class ChurnRiskChangedData(CrmPayload):
    from_band: RiskBand | None = None  # None: the first band
    to_band: RiskBand
    risk_score: float = Field(ge=0, le=1)
    p_alive: float | None = Field(None, ge=0, le=1)
    reasons: list[str] = Field(default_factory=list)


class ChurnRiskChanged(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_CHURN
    type: Literal["ChurnRiskChanged"] = "ChurnRiskChanged"
    schema_version: Literal[1] = 1
    data: ChurnRiskChangedData


class CustomerWonBackData(CrmPayload):
    ladder_step: StrictInt = Field(ge=0)
    days_at_risk: float = Field(ge=0)
    order_id: ShortText | None = None


class CustomerWonBack(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_CHURN
    type: Literal["CustomerWonBack"] = "CustomerWonBack"
    schema_version: Literal[1] = 1
    data: CustomerWonBackData


# crm.notifications ---------------------------------------------------------


class NotificationSentData(CrmPayload):
    request_id: ShortText
    kind: ShortText
    channel: ChannelName
    provider: ShortText
    latency_ms: float | None = Field(None, ge=0)


class NotificationSent(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_NOTIFICATIONS
    type: Literal["NotificationSent"] = "NotificationSent"
    schema_version: Literal[1] = 1
    data: NotificationSentData


class NotificationFailedData(CrmPayload):
    request_id: ShortText
    kind: ShortText
    channel: ChannelName
    error: ShortText
    permanent: bool


class NotificationFailed(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_NOTIFICATIONS
    type: Literal["NotificationFailed"] = "NotificationFailed"
    schema_version: Literal[1] = 1
    data: NotificationFailedData


class NotificationSuppressedData(CrmPayload):
    request_id: ShortText
    kind: ShortText
    reason: ShortText
    channel: ChannelName | None = None


class NotificationSuppressed(CrmEvent):
    TOPIC: ClassVar[str] = topics.CRM_NOTIFICATIONS
    type: Literal["NotificationSuppressed"] = "NotificationSuppressed"
    schema_version: Literal[1] = 1
    data: NotificationSuppressedData


PROFILE_EVENTS = (ProfileUpdated, CustomerErased)
SEGMENT_EVENTS = (SegmentChanged, LifecycleStageChanged)
CARE_EVENTS = (CareRequested,)
RETENTION_EVENTS = (RetentionRequested, RetentionTaskCreated)
LOYALTY_EVENTS = (
    PointsEarned,
    PointsRedeemed,
    PointsExpired,
    PointsReversed,
    RedemptionRejected,
)
TIER_EVENTS = (TierChanged,)
REFERRAL_EVENTS = (ReferralQualified,)
CHURN_EVENTS = (ChurnRiskChanged, CustomerWonBack)
NOTIFICATION_EVENTS = (NotificationSent, NotificationFailed, NotificationSuppressed)
