"""Composition root of the churn service: settings -> model, domain, store, routes, background jobs."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import date, timedelta

from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from contracts import topics
from services.churn import bgnbd
from services.churn import model as risk_model
from services.churn.bootstrap import bootstrap_model
from services.churn.domain import ChurnDomain, history
from services.churn.settings import ChurnSettings
from services.churn.store import ChurnStore
from services.runtime import held, versions
from services.runtime.clock import EPOCH, Clock
from services.runtime.http import require_token
from services.runtime.metrics import TallyCollector
from services.runtime.service import ServiceHost, ServiceSpec
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)

# The topics this service reads. Unit tests check that the AsyncAPI document's consumers
# (contracts/generate.py) agree, and that every event type the domain wants is on one of them.
CONSUMES = (topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS, topics.CRM_PROFILE, topics.CRM_TIERS)


def customer_view(cid: str, state: dict, domain: ChurnDomain, today: date) -> dict:
    """The stored assessment, and the signals as they stand today under the current model."""
    view = {
        "customer_id": cid,
        "risk": state.get("risk"),
        "ladder": state.get("ladder"),
        "value_tier": state.get("value_tier"),
        "loyalty_tier": state.get("loyalty_tier"),
        "model_version": domain.model.version,
        # Events newer than the clock, applied in event-time order once it passes them (docs/churn.md).
        "waiting": held.listing(state.get("held")),
    }
    if state.get("first"):
        s = domain.model.signals(history(state), today)
        view["signals"] = {k: getattr(s, k) for k in s.__dataclass_fields__} | {"recency_ratio": s.recency_ratio}
    return view


def routes(host: ServiceHost, store: ChurnStore, domain: ChurnDomain, token: str) -> list[Route]:
    @require_token(token)
    async def get_customer(request: Request) -> JSONResponse:
        cid = request.path_params["customer_id"]
        state = await store.read(cid)
        if state is None:
            return JSONResponse({"error": "unknown customer"}, status_code=404)
        return JSONResponse(customer_view(cid, state, domain, host.clock.now().date()))

    @require_token(token)
    async def get_models(_: Request) -> JSONResponse:
        return JSONResponse(
            {"in_use": domain.model.version, "fits": await store.model_history(), **await store.counts()}
        )

    return [Route("/customers/{customer_id}", get_customer), Route("/models", get_models)]


class LadderMetrics:
    """Retention steps taken and customers won back per ladder step, and the win-back rate."""

    def __init__(self, registry) -> None:
        self.steps = Counter(
            "crm_churn_retention_steps_total", "Retention ladder steps taken", ["step", "kind"], registry=registry
        )
        self.won_back = Counter(
            "crm_churn_won_back_total",
            "At-risk customers who bought again, by ladder step",
            ["step"],
            registry=registry,
        )
        self.rate = Gauge(
            "crm_churn_winback_rate",
            "Won back / reached, per ladder step, since this process started",
            ["step"],
            registry=registry,
        )
        self._reached: dict[str, float] = {}
        self._won: dict[str, float] = {}

    def __call__(self, ev) -> None:
        if ev.type == "RetentionRequested":
            self._step(str(ev.data.step), ev.data.kind)
        elif ev.type == "RetentionTaskCreated":
            self._step("3", "task")
        elif ev.type == "CustomerWonBack":
            step = str(ev.data.ladder_step)
            self.won_back.labels(step).inc()
            self._won[step] = self._won.get(step, 0) + 1
            self._update(step)

    def _step(self, step: str, kind: str) -> None:
        self.steps.labels(step, kind).inc()
        self._reached[step] = self._reached.get(step, 0) + 1
        self._update(step)

    def _update(self, step: str) -> None:
        if self._reached.get(step):
            self.rate.labels(step).set(self._won.get(step, 0) / self._reached[step])


class ModelMaintenance:
    """Refits the risk model now and then (event time) and adopts other replicas' fits.

    A new model is not pushed through every customer at once: each customer meets it at
    their next event or scheduled check (at most 60 days of clock time away).
    """

    def __init__(self, store: ChurnStore, domain: ChurnDomain, settings: ChurnSettings):
        self.store = store
        self.domain = domain
        self.settings = settings
        self._last_wall = 0.0

    async def __call__(self, host: ServiceHost) -> None:
        version = Gauge("crm_churn_model_version", "Risk model version in use", registry=host.registry)
        ll = Gauge(
            "crm_churn_model_log_likelihood", "BG/NBD log-likelihood of the model in use", registry=host.registry
        )
        latest = await self.store.latest_model()
        if latest is not None:
            self.domain.model = latest

        async def step() -> None:
            await self.step(host)
            version.set(self.domain.model.version)
            ll.set(self.domain.model.params.log_likelihood)

        await versions.maintain(
            "model maintenance", step, interval_s=min(5.0, max(self.settings.refit_min_wall_s, 1.0))
        )

    async def step(self, host: ServiceHost) -> None:
        now = host.clock.now()
        current = self.domain.model
        latest = await self.store.latest_model()
        if latest is not None and latest.version > current.version:
            self._adopt(latest)
        elif now > EPOCH and self._refit_due(current, now.date()):
            self._last_wall = time.monotonic()
            histories = await self.store.histories()
            started = time.monotonic()
            try:
                fitted = await asyncio.to_thread(
                    risk_model.fit,
                    histories,
                    now.date(),
                    version=max(current.version, latest.version if latest else 0) + 1,
                    min_customers=self.settings.refit_min_customers,
                )
            except bgnbd.FitError as exc:
                log.warning("risk model refit failed, version %d stays in use: %s", current.version, exc)
                return
            if fitted is None:
                log.info(
                    "risk model refit skipped: fewer than %d customers with 90 days of history",
                    self.settings.refit_min_customers,
                )
                return
            log.info("risk model refit on %d customers in %.1f s", len(histories), time.monotonic() - started)
            self._adopt(await self.store.insert_model(fitted))

    def _refit_due(self, current: risk_model.RiskModel, today: date) -> bool:
        if self._last_wall and time.monotonic() - self._last_wall < self.settings.refit_min_wall_s:
            return False
        if current.version == 0 or current.fitted_on is None:
            return True  # still on the bootstrap model
        return today - date.fromisoformat(current.fitted_on) >= timedelta(days=self.settings.refit_days)

    def _adopt(self, m: risk_model.RiskModel) -> None:
        self.domain.model = m
        p = m.params
        log.info(
            "risk model version %d in use: r=%.4f alpha=%.4f a=%.4f b=%.4f LL=%.1f train AUC %s",
            m.version,
            p.r,
            p.alpha,
            p.a,
            p.b,
            p.log_likelihood,
            f"{m.train_auc:.3f}" if m.train_auc is not None else "n/a",
        )


def build(
    common: CommonSettings | None = None, settings: ChurnSettings | None = None, clock: Clock | None = None
) -> ServiceHost:
    common = common or CommonSettings()
    settings = settings or ChurnSettings()
    domain = ChurnDomain(bootstrap_model(), settings.band_rules(), settings.ladder_rules())
    spec = ServiceSpec(
        name="churn",
        consumes=CONSUMES,
        domain=domain,
        make_store=lambda db, codec: ChurnStore(db, codec),
    )
    host = ServiceHost(
        spec,
        common,
        settings,
        clock=clock,
        routes=lambda h: routes(h, h.store, domain, settings.api_token.get_secret_value()),  # type: ignore[arg-type]
    )
    host.metrics.on_derived.append(LadderMetrics(host.registry))
    host.background.append(ModelMaintenance(host.store, domain, settings))  # type: ignore[arg-type]
    host.registry.register(
        TallyCollector(
            "crm_churn_customers", "Customers per risk band", host.store.tally, dimension="bands", label="band"
        )
    )
    return host
