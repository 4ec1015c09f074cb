"""Composition root of the profile service: settings -> domain, store, routes, background jobs."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from contracts import topics
from services.profile import rfm
from services.profile.domain import ProfileDomain, ProfileRules
from services.profile.lifecycle import LifecycleRules
from services.profile.settings import ProfileSettings
from services.profile.store import ProfileStore
from services.profile.view import customer_view
from services.runtime import versions
from services.runtime.clock import EPOCH, Clock
from services.runtime.crypto import ContactCodec, LookupHasher, make_cipher
from services.runtime.http import require_token
from services.runtime.metrics import TallyCollector
from services.runtime.service import ServiceHost, ServiceSpec
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)

# The topics this service reads; a unit test checks that the AsyncAPI document's consumers
# (contracts/generate.py) agree. Profile wants every event on them.
CONSUMES = (topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS)


def rules_from(s: ProfileSettings) -> ProfileRules:
    return ProfileRules(
        followup_days=s.followup_days,
        followup_min_gap_days=s.followup_min_gap_days,
        followup_expiry_days=s.followup_expiry_days,
        birthday_hour=s.birthday_hour,
        top_categories=s.top_categories,
        currency_rates=dict(s.currency_rates),
        lifecycle=LifecycleRules(
            default_cadence_days=s.default_cadence_days,
            mature_min_days=s.mature_min_days,
            declining_factor=s.declining_factor,
            declining_min_days=s.declining_min_days,
            lost_factor=s.lost_factor,
            lost_min_days=s.lost_min_days,
        ),
    )


def routes(host: ServiceHost, store: ProfileStore, rules: ProfileRules, token: str) -> list[Route]:
    @require_token(token)
    async def get_customer(request: Request) -> JSONResponse:
        cid = request.path_params["customer_id"]
        state = await store.read(cid)
        if state is None:
            return JSONResponse({"error": "unknown customer"}, status_code=404)
        return JSONResponse(customer_view(cid, state, host.clock.now(), rules))

    @require_token(token)
    async def find_customer(request: Request) -> JSONResponse:
        email, phone = request.query_params.get("email"), request.query_params.get("phone")
        if not email and not phone:
            return JSONResponse({"error": "give ?email= or ?phone="}, status_code=400)
        cid = await store.find_by_contact(email=email, phone=phone)
        if cid is None:
            return JSONResponse({"error": "no customer with that contact"}, status_code=404)
        state = await store.read(cid)
        return JSONResponse(customer_view(cid, state, host.clock.now(), rules))

    @require_token(token)
    async def get_segments(_: Request) -> JSONResponse:
        counts = await store.counts()
        bp = host.spec.domain.breakpoints
        return JSONResponse(
            {**counts, "breakpoints": {k: v for k, v in bp.to_doc().items() if k != "_id"} | {"version": bp.version}}
        )

    return [
        Route("/customers", find_customer),
        Route("/customers/{customer_id}", get_customer),
        Route("/segments", get_segments),
    ]


class SegmentMaintenance:
    """Recomputes RFM breakpoints now and then and adopts other replicas' versions."""

    def __init__(self, store: ProfileStore, domain: ProfileDomain, settings: ProfileSettings):
        self.store = store
        self.domain = domain
        self.settings = settings
        self._last_wall = 0.0

    async def __call__(self, host: ServiceHost) -> None:
        latest = await self.store.latest_breakpoints()
        if latest is not None:
            self.domain.breakpoints = latest
        await versions.maintain(
            "segment maintenance",
            lambda: self.step(host),
            interval_s=min(5.0, max(self.settings.rfm_refresh_min_wall_s, 1.0)),
        )

    async def step(self, host: ServiceHost) -> None:
        now = host.clock.now()
        current = self.domain.breakpoints
        latest = await self.store.latest_breakpoints()
        if latest is not None and latest.version > current.version:
            await self._adopt(host, latest, now)
        elif now > EPOCH and self._refresh_due(current, now):
            self._last_wall = time.monotonic()
            rows, history_days = await self.store.population(now)
            bp = rfm.compute_breakpoints(
                rows,
                history_days=history_days,
                min_history_days=self.settings.rfm_min_history_days,
                version=max(current.version, latest.version if latest else 0) + 1,
                now=now,
                tier_quantiles=self.settings.value_tier_quantiles,
                min_customers=self.settings.rfm_min_customers,
            )
            if bp is not None:
                await self._adopt(host, await self.store.insert_breakpoints(bp), now)

    def _refresh_due(self, current: rfm.Breakpoints, now) -> bool:
        if time.monotonic() - self._last_wall < self.settings.rfm_refresh_min_wall_s and self._last_wall:
            return False
        if current.computed_at is None:
            return True
        return now - datetime.fromisoformat(current.computed_at) >= timedelta(days=self.settings.rfm_refresh_days)

    async def _adopt(self, host: ServiceHost, bp: rfm.Breakpoints, now) -> None:
        async with host.pipeline.lock:
            self.domain.breakpoints = bp
            # Every owned customer is re-scored against the new cut points by the next sweeps.
            self.store.schedule.touch_all(now)
        log.info("RFM breakpoints version %d in use (%d customers)", bp.version, bp.customers)


class UnappliedEvents:
    """Logs and counts the waiting events that could not be applied (ProfileDomain keeps them in
    the customer's `unapplied`): the operator's view of what a dead letter would have shown."""

    def __init__(self) -> None:
        self.counter: Counter | None = None

    def register(self, registry) -> None:
        self.counter = Counter(
            "crm_profile_events_unapplied_total",
            "Waiting shop events that could not be applied (see the customer's unapplied list)",
            ["type"],
            registry=registry,
        )

    def __call__(self, event_type: str, event_id: str, error: str) -> None:
        log.error("waiting %s %s could not be applied and is skipped: %s", event_type, event_id, error)
        if self.counter is not None:
            self.counter.labels(event_type).inc()


def build(
    common: CommonSettings | None = None, settings: ProfileSettings | None = None, clock: Clock | None = None
) -> ServiceHost:
    common = common or CommonSettings()
    settings = settings or ProfileSettings()
    codec = ContactCodec(make_cipher(settings.encryption_keys.get_secret_value()))
    hasher = LookupHasher(settings.lookup_key.get_secret_value())
    rules = rules_from(settings)
    unapplied = UnappliedEvents()
    domain = ProfileDomain(rules, on_unapplied=unapplied)
    spec = ServiceSpec(
        name="profile",
        consumes=CONSUMES,
        domain=domain,
        codec=codec,
        make_store=lambda db, c: ProfileStore(db, c, hasher),
    )
    host = ServiceHost(
        spec,
        common,
        settings,
        clock=clock,
        routes=lambda h: routes(h, h.store, rules, settings.api_token.get_secret_value()),
    )
    unapplied.register(host.registry)
    host.background.append(SegmentMaintenance(host.store, domain, settings))  # type: ignore[arg-type]
    host.registry.register(
        TallyCollector(
            "crm_profile_customers", "Customers per segment, lifecycle stage and value tier", host.store.tally
        )
    )
    return host
