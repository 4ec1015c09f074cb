"""Which service reads which topic, against what the domains want and what the contracts say.

Moving an event type to another topic (as segment and tier changes moved off crm.profile and
crm.loyalty) must not leave a service waiting for events that no longer reach it.
"""

from __future__ import annotations

import pytest

from contracts import EVENTS_BY_TOPIC, crm, shop
from contracts.generate import CONSUMERS
from services.churn.app import CONSUMES as CHURN
from services.churn.bootstrap import bootstrap_model
from services.churn.domain import ChurnDomain
from services.loyalty.app import CONSUMES as LOYALTY
from services.loyalty.domain import LoyaltyDomain
from services.loyalty.rules import load_rules
from services.notify.app import CONSUMES as NOTIFY
from services.notify.domain import NotifyDomain, NotifyRules
from services.profile.app import CONSUMES as PROFILE

READS = {"profile": PROFILE, "loyalty": LOYALTY, "churn": CHURN, "notify": NOTIFY}
ALL_TYPES = {m for models in EVENTS_BY_TOPIC.values() for m in models}


def _wanted(domain) -> set[type]:
    # `wants` looks at the event's type only; an unvalidated instance is enough to ask it.
    return {m for m in ALL_TYPES if domain.wants(m.model_construct())}


def test_the_asyncapi_consumers_are_the_topics_the_services_read():
    assert set(CONSUMERS) == set(EVENTS_BY_TOPIC)
    readers = {t: sorted(s for s, read in READS.items() if t in read) for t in EVENTS_BY_TOPIC}
    assert readers == {t: sorted(CONSUMERS[t]) for t in EVENTS_BY_TOPIC}


# Domains are built in the test, not when the module is collected (churn's loads its model).
@pytest.mark.parametrize(
    ("service", "make_domain", "skipped"),
    [
        ("loyalty", lambda: LoyaltyDomain(load_rules()), {shop.InteractionRecorded, shop.ConsentChanged}),
        (
            "churn",
            lambda: ChurnDomain(bootstrap_model()),
            {
                shop.CustomerRegistered,
                shop.CustomerUpdated,
                shop.ConsentChanged,
                shop.PointsRedemptionRequested,
                shop.PurchaseRefunded,
            },
        ),
        ("notify", lambda: NotifyDomain(NotifyRules()), {crm.RetentionTaskCreated}),
    ],
)
def test_every_event_a_service_wants_is_on_a_topic_it_reads(service, make_domain, skipped):
    on_its_topics = {m for t in READS[service] for m in EVENTS_BY_TOPIC[t]}
    wanted = _wanted(make_domain())
    assert wanted, service
    assert wanted <= on_its_topics, sorted(m.__name__ for m in wanted - on_its_topics)
    # What it skips among what it reads: each costs a fetch and a parse, but no write.
    assert on_its_topics - wanted == skipped
