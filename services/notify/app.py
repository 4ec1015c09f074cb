"""Composition root of the notify service: settings -> domain, store, providers, delivery rounds, routes."""

from __future__ import annotations

import hmac
import logging
import uuid
from urllib.parse import parse_qs

import httpx
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from contracts import topics
from contracts.shop import ConsentChanged, ConsentChangedData
from services.notify.channels import ChannelSender, make_provider
from services.notify.delivery import Deliverer, NotifyStore, WakeIndex
from services.notify.domain import NotifyDomain, contact_of
from services.notify.links import LinkSigner
from services.notify.render import Renderer
from services.notify.settings import NotifySettings
from services.runtime.cache import Cache
from services.runtime.clock import Clock
from services.runtime.crypto import ContactCodec, LookupHasher, make_cipher
from services.runtime.http import require_token
from services.runtime.service import ServiceHost, ServiceSpec
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)

# The topics this service reads. Unit tests check that the AsyncAPI document's consumers
# (contracts/generate.py) agree, and that every event type the domain wants is on one of them.
CONSUMES = (topics.CRM_CARE, topics.CRM_RETENTION, topics.CRM_PROFILE)

# Replies that opt a number out of SMS (carriers' usual keywords, and the Chinese 退订 / TD).
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "退订", "TD"})


class NotifyMetrics:
    def __init__(self, registry) -> None:
        self.outcomes = Counter(
            "crm_notify_notifications_total",
            "Notification outcomes by channel, kind and outcome (sent, failed, suppressed)",
            ["channel", "kind", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "crm_notify_send_retries_total", "Transient send errors retried", ["channel", "provider"], registry=registry
        )
        self.send_seconds = Histogram(
            "crm_notify_send_seconds", "Time to hand a message to its provider, retries included", ["channel"],
            registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "crm_notify_e2e_latency_seconds",
            "From the originating shop event (or the end of a deferral) to the send; wall clock only",
            ["channel"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.scheduled = Gauge(
            "crm_notify_scheduled_customers", "Customers with a pending message (owned partitions)", registry=registry
        )

    def __call__(self, ev) -> None:
        outcome = {"NotificationSent": "sent", "NotificationFailed": "failed", "NotificationSuppressed": "suppressed"}
        if ev.type in outcome:
            self.outcomes.labels(ev.data.channel or "none", ev.data.kind, outcome[ev.type]).inc()


async def publish_consent(host: ServiceHost, cid: str, channel: str, source: str, event_id: uuid.UUID) -> None:
    """Consent lives in the profile: notify reports the opt-out as a shop interaction, like any other."""
    ev = ConsentChanged(
        event_id=event_id,
        occurred_at=host.clock.now(),
        producer="notify",
        customer_id=cid,
        data=ConsentChangedData(channel=channel, granted=False, source=source),
    )
    await host.publisher.send_many([(host.common.topic(topics.SHOP_INTERACTIONS), ev.key(), ev.to_bytes(), ())])
    log.info("opt-out on %s published for %s (source %s)", channel, cid, source)


def routes(host: ServiceHost, settings: NotifySettings, links: LinkSigner) -> list[Route]:
    store: NotifyStore = host.store  # type: ignore[assignment]
    inbound_token = settings.inbound_token.get_secret_value()

    def _link(request: Request) -> tuple[str, str, str] | None:
        q = request.query_params
        cid, channel, token = q.get("c", ""), q.get("ch", "email"), q.get("t", "")
        if not cid or channel not in ("email", "sms") or not links.valid(cid, channel, token):
            return None
        return cid, channel

    async def unsubscribe(request: Request) -> Response:
        link = _link(request)
        if link is None:
            return HTMLResponse("<p>This unsubscribe link is not valid.</p>", status_code=400)
        cid, channel = link
        if request.method == "GET":
            # A GET never unsubscribes: mail scanners follow links (RFC 8058 asks for a POST). No
            # action: the form posts back to this very link, whatever path prefix a proxy put before it.
            return HTMLResponse(
                "<form method='post'>"
                "<input type='hidden' name='List-Unsubscribe' value='One-Click'>"
                f"<button>Unsubscribe from {channel} messages / 退订</button></form>"
            )
        await publish_consent(host, cid, channel, "one_click_unsubscribe", uuid.uuid4())
        return HTMLResponse("<p>You are unsubscribed. 您已退订。</p>")

    async def sms_inbound(request: Request) -> Response:
        given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not inbound_token or not hmac.compare_digest(given.encode(), inbound_token.encode()):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
                sender, text, msg_id = str(body["from"]), str(body["body"]), body.get("id")
            except (ValueError, KeyError, TypeError):
                return JSONResponse({"error": "expected JSON {from, body[, id]}"}, status_code=400)
        else:  # the Twilio webhook form
            form = parse_qs((await request.body()).decode("utf-8", "replace"))
            sender, text = form.get("From", [""])[0], form.get("Body", [""])[0]
            msg_id = form.get("MessageSid", [None])[0]
        if text.strip().upper() not in STOP_WORDS:
            return JSONResponse({"action": "ignored"})
        cid = await store.find_by_contact(phone=sender)
        if cid is None:
            log.info("STOP from a number no customer has")
            return JSONResponse({"action": "unknown_number"})
        # The gateway's message id makes a retried webhook the same event (profile dedups it).
        eid = uuid.uuid5(uuid.NAMESPACE_URL, f"sms-inbound/{msg_id}") if msg_id else uuid.uuid4()
        await publish_consent(host, cid, "sms", "sms_stop", eid)
        return JSONResponse({"action": "opted_out", "customer_id": cid})

    @require_token(settings.api_token.get_secret_value())
    async def customer(request: Request) -> JSONResponse:
        cid = request.path_params["customer_id"]
        state = await store.read(cid)
        if state is None:
            return JSONResponse({"error": "unknown customer"}, status_code=404)
        c = contact_of(state)
        return JSONResponse(
            {
                "customer_id": cid,
                "erased": bool(state.get("erased")),
                "known": state["profile"].get("known", False),
                "channels": {
                    ch: {
                        "consent": bool(c.consents.get(ch)),
                        "address": bool(c.address(ch)),
                        "unreachable": ch in c.unreachable,
                    }
                    for ch in ("email", "sms")
                },
                "preferred_channel": c.preferred_channel,
                "locale": c.locale,
                "timezone": c.timezone,
                "marketing_sent": state["marketing_sent"],
                "pending": [
                    {k: j.get(k) for k in ("rid", "kind", "purpose", "status", "channel", "reason", "wake")}
                    for j in state["jobs"].values()
                ],
            }
        )  # fmt: skip

    return [
        Route("/unsubscribe", unsubscribe, methods=["GET", "POST"]),
        Route("/sms/inbound", sms_inbound, methods=["POST"]),
        Route("/customers/{customer_id}", customer),
    ]


def senders(settings: NotifySettings, client: httpx.AsyncClient) -> dict[str, ChannelSender]:
    out = {}
    for channel in ("email", "sms"):
        urls = [getattr(settings, f"{channel}_{rank}").get_secret_value() for rank in ("primary", "secondary")]
        providers = [make_provider(u, client, settings.send_timeout_s) for u in urls if u]
        out[channel] = ChannelSender(
            channel,
            providers,
            attempts=settings.send_attempts,
            base_delay=settings.send_base_delay_s,
            max_delay=settings.send_max_delay_s,
        )
    return out


def build(
    common: CommonSettings | None = None, settings: NotifySettings | None = None, clock: Clock | None = None
) -> ServiceHost:
    common = common or CommonSettings()
    settings = settings or NotifySettings()
    codec = ContactCodec(make_cipher(settings.encryption_keys.get_secret_value(), "CRM_NOTIFY_ENCRYPTION_KEYS"))
    hasher = LookupHasher(settings.lookup_key.get_secret_value(), "CRM_NOTIFY_LOOKUP_KEY")
    links = LinkSigner(settings.link_key.get_secret_value(), settings.public_url)
    domain = NotifyDomain(settings.rules())
    client = httpx.AsyncClient(timeout=settings.send_timeout_s)
    channel_senders = senders(settings, client)
    spec = ServiceSpec(
        name="notify",
        consumes=CONSUMES,
        domain=domain,
        codec=codec,
        make_store=lambda db, c: NotifyStore(db, c, hasher),
    )
    host = ServiceHost(spec, common, settings, clock=clock, routes=lambda h: routes(h, settings, links))
    metrics = NotifyMetrics(host.registry)
    host.metrics.on_derived.append(metrics)
    for s in channel_senders.values():
        s.on_retry = lambda provider, exc, ch=s.channel: metrics.retries.labels(ch, provider.name).inc()
    cache = Cache(common, "notify")
    deliverer = Deliverer(
        domain,
        channel_senders,
        Renderer(),
        links,
        WakeIndex(cache.redis, cache.key("wake") + ":"),
        email_from=settings.email_from,
        concurrency=settings.send_concurrency,
        round_size=settings.round_size,
        interval_s=common.sweep_interval_s,
        metrics=metrics,
    )
    host.background.append(deliverer)
    closers = [p.close for sender in channel_senders.values() for p in sender.providers if hasattr(p, "close")]
    host.on_stop.extend([*closers, client.aclose, cache.close])
    return host
