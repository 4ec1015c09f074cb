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
from services.loyalty.domain import LoyaltyDomain, next_seq
from services.loyalty.rules import Rules
from services.loyalty.settings import LoyaltySettings
from services.loyalty.store import LoyaltyStore
from services.runtime import held
from services.runtime.clock import Clock
from services.runtime.http import require_token
from services.runtime.metrics import TallyCollector
from services.runtime.service import ServiceHost, ServiceSpec
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)

# The topics this service reads. Unit tests check that the AsyncAPI document's consumers
# (contracts/generate.py) agree, and that every event type the domain wants is on one of them.
CONSUMES = (topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS, topics.CRM_REFERRALS)


def account_view(cid: str, state: dict, domain: LoyaltyDomain, today: date, recent: list[dict]) -> dict:
    """The account as the read API shows it; `recent` are its last entries, from its closed pages too."""
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
        "entries": recent,
        "entries_total": next_seq(state) - 1,
        # Ledger events the event clock has not reached (replays only): not in the balance yet.
        "waiting": held.listing(state.get("held")),
        # Ledger events refused after they had been accepted (domain.LedgerRejection), the last 50.
        "rejected": [
            {"occurred_at": at, "event_id": eid, "type": kind, "reason": reason}
            for at, eid, kind, reason in state.get("rejected") or []
        ],
    }


def routes(host: ServiceHost, domain: LoyaltyDomain, token: str) -> list[Route]:
    store: LoyaltyStore = host.store  # type: ignore[assignment]

    @require_token(token)
    async def account(request: Request) -> JSONResponse:
        cid = request.path_params["customer_id"]
        state = await store.read(cid)
        if state is None:
            return JSONResponse({"error": "unknown customer"}, status_code=404)
        recent = await store.entries(state, next_seq(state), domain.rules.recent_entries)
        return JSONResponse(account_view(cid, state, domain, host.clock.now().date(), recent))

    @require_token(token)
    async def entries(request: Request) -> JSONResponse:
        """The whole ledger, back from the newest entry: `?before=SEQ&limit=N` (at most 500) answers the
        `limit` entries before `before`, oldest first, and `next_before` continues further back."""
        cid = request.path_params["customer_id"]
        try:
            before = int(request.query_params["before"]) if "before" in request.query_params else None
            limit = int(request.query_params.get("limit", 100))
        except ValueError:
            return JSONResponse({"error": "before and limit must be integers"}, status_code=400)
        if not 1 <= limit <= MAX_ENTRIES or (before is not None and before < 1):
            return JSONResponse({"error": f"limit must be 1 to {MAX_ENTRIES}, before at least 1"}, status_code=400)
        state = await store.read(cid)
        if state is None:
            return JSONResponse({"error": "unknown customer"}, status_code=404)
        out = await store.entries(state, next_seq(state) if before is None else before, limit)
        older = out[0]["seq"] if out and out[0]["seq"] > 1 else None
        return JSONResponse({"customer_id": cid, "entries": out, "next_before": older})

    return [Route("/accounts/{customer_id}", account), Route("/accounts/{customer_id}/entries", entries)]


MAX_ENTRIES = 500


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
        consumes=CONSUMES,
        domain=domain,
        make_store=lambda db, _codec: LoyaltyStore(db, settings.ledger_page_entries),
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
