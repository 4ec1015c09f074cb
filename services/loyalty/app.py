"""Composition root of the loyalty service: settings and rules -> domain, store, routes, metrics."""

from __future__ import annotations

import logging
from datetime import date
from decimal import Decimal

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from contracts import topics
from services.loyalty.domain import LoyaltyDomain
from services.loyalty.rules import Rules
from services.loyalty.settings import LoyaltySettings
from services.loyalty.store import LoyaltyStore
from services.runtime.clock import Clock
from services.runtime.http import require_token
from services.runtime.metrics import TallyCollector
from services.runtime.service import ServiceHost, ServiceSpec
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)


def account_view(cid: str, state: dict, domain: LoyaltyDomain, today: date) -> dict:
    rules: Rules = domain.rules
    qualifying = domain.qualifying(state, today)
    nxt = rules.next_tier(state["tier"]) if state["tier"] else None
    return {
        "customer_id": cid,
        "balance": state["balance"],
        "debt": state["debt"],
        "tier": state["tier"],
        "progress": {
            "qualify_by": rules.qualify_by,
            "qualifying": f"{qualifying:.2f}",
            "next_tier": nxt.name if nxt else None,
            "needed": f"{max(nxt.threshold - qualifying, Decimal(0)):.2f}" if nxt else None,
        },
        "downgrade": state["downgrade"],
        "lots": [
            {k: lot[k] for k in ("id", "earned_on", "expires_on", "points", "remaining")} for lot in state["lots"]
        ],
        "entries": state["entries"][-rules.recent_entries :],
        "entries_total": len(state["entries"]),
        # Ledger events the event clock has not reached (replays only): not in the balance yet.
        "waiting": [{"occurred_at": at, "type": kind} for at, _id, kind, _body in state.get("held") or []],
    }


def routes(host: ServiceHost, domain: LoyaltyDomain, token: str) -> list[Route]:
    store: LoyaltyStore = host.store  # type: ignore[assignment]

    @require_token(token)
    async def account(request: Request) -> JSONResponse:
        cid = request.path_params["customer_id"]
        state = await store.read(cid)
        if state is None:
            return JSONResponse({"error": "unknown customer"}, status_code=404)
        return JSONResponse(account_view(cid, state, domain, host.clock.now().date()))

    return [Route("/accounts/{customer_id}", account)]


KINDS = {
    "PointsEarned": "earned",
    "PointsRedeemed": "redeemed",
    "PointsExpired": "expired",
    "PointsReversed": "reversed",
}


class LoyaltyMetrics:
    def __init__(self, registry) -> None:
        self.points = Counter(
            "crm_loyalty_points_total", "Points issued, redeemed, expired and reversed", ["kind"], registry=registry
        )
        self.rejected = Counter(
            "crm_loyalty_redemptions_rejected_total", "Redemptions refused, by reason", ["reason"], registry=registry
        )

    def __call__(self, ev) -> None:
        kind = KINDS.get(ev.type)
        if kind is not None:
            self.points.labels(kind).inc(ev.data.points)
        elif ev.type == "RedemptionRejected":
            self.rejected.labels(ev.data.reason).inc()


def build(
    common: CommonSettings | None = None, settings: LoyaltySettings | None = None, clock: Clock | None = None
) -> ServiceHost:
    common = common or CommonSettings()
    settings = settings or LoyaltySettings()
    domain = LoyaltyDomain(settings.rules())
    spec = ServiceSpec(
        name="loyalty",
        consumes=[topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS, topics.CRM_LOYALTY],
        domain=domain,
        make_store=lambda db, _codec: LoyaltyStore(db),
    )
    host = ServiceHost(
        spec, common, settings, clock=clock, routes=lambda h: routes(h, domain, settings.api_token.get_secret_value())
    )
    metrics = LoyaltyMetrics(host.registry)
    host.metrics.on_derived.append(metrics)
    host.registry.register(
        TallyCollector("crm_loyalty_accounts", "Accounts per tier", host.store.tally, dimension="tier", label="tier")
    )
    return host
