"""Events shops publish. This is the external contract: strict, closed, versioned."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictInt, model_validator

from contracts import topics
from contracts.envelope import Event, Payload
from contracts.types import (
    CalendarDate,
    Currency,
    CustomerId,
    Email,
    Locale,
    LongText,
    Money,
    Phone,
    ShortText,
    TimezoneName,
)

ChannelName = Literal["sms", "email"]


class PurchaseLine(Payload):
    sku: ShortText
    category: ShortText
    quantity: StrictInt = Field(ge=0, le=100_000)
    unit_price: Money


class PurchaseCompletedData(Payload):
    order_id: ShortText
    store_id: ShortText
    channel: Literal["online", "offline"]
    currency: Currency
    total: Money
    lines: list[PurchaseLine] = Field(default_factory=list, max_length=1000)


class PurchaseCompleted(Event):
    TOPIC: ClassVar[str] = topics.SHOP_PURCHASES
    type: Literal["PurchaseCompleted"] = "PurchaseCompleted"
    schema_version: Literal[1] = 1
    data: PurchaseCompletedData


class PurchaseRefundedData(Payload):
    order_id: ShortText
    refund_id: ShortText
    currency: Currency
    amount: Money


class PurchaseRefunded(Event):
    TOPIC: ClassVar[str] = topics.SHOP_PURCHASES
    type: Literal["PurchaseRefunded"] = "PurchaseRefunded"
    schema_version: Literal[1] = 1
    data: PurchaseRefundedData


class Consents(Payload):
    email: bool = False
    sms: bool = False


class CustomerRegisteredData(Payload):
    name: ShortText
    email: Email | None = None
    phone: Phone | None = None
    birthday: CalendarDate | None = None
    gender: ShortText | None = None
    locale: Locale = "en"
    timezone: TimezoneName = "UTC"
    preferred_channel: ChannelName = "email"
    consents: Consents = Field(default_factory=Consents)
    referred_by: CustomerId | None = None


class CustomerRegistered(Event):
    TOPIC: ClassVar[str] = topics.SHOP_INTERACTIONS
    type: Literal["CustomerRegistered"] = "CustomerRegistered"
    schema_version: Literal[1] = 1
    data: CustomerRegisteredData


class CustomerUpdatedData(Payload):
    """Any subset of the registration fields except consents (they change through ConsentChanged).
    A field sent as null is cleared; locale, timezone and preferred channel go back to the
    registration's defaults, and a null name changes nothing."""

    name: ShortText | None = None
    email: Email | None = None
    phone: Phone | None = None
    birthday: CalendarDate | None = None
    gender: ShortText | None = None
    locale: Locale | None = None
    timezone: TimezoneName | None = None
    preferred_channel: ChannelName | None = None
    referred_by: CustomerId | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> CustomerUpdatedData:
        if not self.model_fields_set:
            raise ValueError("CustomerUpdated must change at least one field")
        return self


class CustomerUpdated(Event):
    TOPIC: ClassVar[str] = topics.SHOP_INTERACTIONS
    type: Literal["CustomerUpdated"] = "CustomerUpdated"
    schema_version: Literal[1] = 1
    data: CustomerUpdatedData


class ConsentChangedData(Payload):
    channel: ChannelName
    granted: bool
    source: ShortText


class ConsentChanged(Event):
    TOPIC: ClassVar[str] = topics.SHOP_INTERACTIONS
    type: Literal["ConsentChanged"] = "ConsentChanged"
    schema_version: Literal[1] = 1
    data: ConsentChangedData


class InteractionRecordedData(Payload):
    kind: Literal["page_view", "cart", "support_ticket", "complaint", "feedback", "survey"]
    channel: ShortText
    score: StrictInt | None = Field(None, ge=1, le=5)
    text: LongText | None = None
    ticket_id: ShortText | None = None
    # For complaints and support tickets: "resolved" closes the ticket named by ticket_id.
    ticket_status: Literal["open", "resolved"] | None = None

    @model_validator(mode="after")
    def _survey_has_score(self) -> InteractionRecordedData:
        if self.kind == "survey" and self.score is None:
            raise ValueError("a survey needs a score from 1 to 5")
        if self.ticket_status == "resolved" and not self.ticket_id:
            raise ValueError("resolving a ticket needs its ticket_id")
        return self


class InteractionRecorded(Event):
    TOPIC: ClassVar[str] = topics.SHOP_INTERACTIONS
    type: Literal["InteractionRecorded"] = "InteractionRecorded"
    schema_version: Literal[1] = 1
    data: InteractionRecordedData


class PointsRedemptionRequestedData(Payload):
    redemption_id: ShortText
    points: StrictInt = Field(gt=0, le=100_000_000)
    reward: ShortText


class PointsRedemptionRequested(Event):
    TOPIC: ClassVar[str] = topics.SHOP_INTERACTIONS
    type: Literal["PointsRedemptionRequested"] = "PointsRedemptionRequested"
    schema_version: Literal[1] = 1
    data: PointsRedemptionRequestedData


class CustomerErasureRequestedData(Payload):
    request_id: ShortText
    reason: ShortText


class CustomerErasureRequested(Event):
    TOPIC: ClassVar[str] = topics.SHOP_INTERACTIONS
    type: Literal["CustomerErasureRequested"] = "CustomerErasureRequested"
    schema_version: Literal[1] = 1
    data: CustomerErasureRequestedData


PURCHASE_EVENTS: tuple[type[Event], ...] = (PurchaseCompleted, PurchaseRefunded)
INTERACTION_EVENTS: tuple[type[Event], ...] = (
    CustomerRegistered,
    CustomerUpdated,
    ConsentChanged,
    InteractionRecorded,
    PointsRedemptionRequested,
    CustomerErasureRequested,
)
