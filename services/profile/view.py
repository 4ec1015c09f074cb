"""The customer 360 as support and marketing see it: derived from the state, nothing stored twice."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from services.profile.domain import ProfileRules, cadence, days_since_last, net_spend, top_categories, window_counts
from services.runtime import held


def customer_view(customer_id: str, state: dict[str, Any], now: datetime, rules: ProfileRules) -> dict[str, Any]:
    p = state["purchases"]
    spend = {}
    for cur, s in state["spend"].items():
        orders_net = max(s["orders"] - s.get("refunded_orders", 0), 0)
        net = net_spend(state, cur)
        spend[cur] = {
            "total": s["gross"],
            "refunded": s["refunded"],
            "net": str(net),
            "orders": s["orders"],
            "average_order_value": str((net / orders_net).quantize(Decimal("0.01"))) if orders_net else None,
        }
    survey = state["survey"]
    since = days_since_last(state, now)
    return {
        "customer_id": customer_id,
        "erased": bool(state.get("erased_at")),
        "erased_at": state.get("erased_at"),
        "registered_at": state.get("registered_at"),
        "contact": {k: state["contact"].get(k) for k in ("name", "email", "phone")},
        "profile": state["profile"],
        "consent": state["consent"],
        "consent_history": state["consent_history"],
        "purchases": {
            "first": p["first"],
            "last": p["last"],
            "orders": p["orders"],
            "fully_refunded_orders": sum(s.get("refunded_orders", 0) for s in state["spend"].values()),
            "purchase_days": p["days"],
            "days_since_last": round(since, 1) if since is not None else None,
            "cadence_days": round(cadence(state, rules), 1) if p["days"] >= 2 else None,
        },
        "spend": spend,
        "categories": {
            c: {"items": v["n"], "spend": v["s"]}
            for c, v in sorted(state["categories"].items(), key=lambda kv: -kv[1]["n"])
        },
        "top_categories": top_categories(state, rules.top_categories),
        "interactions": {
            "totals": state["interactions"]["totals"],
            "windows": window_counts(state, now, rules.interaction_windows),
        },
        "complaints": {"open": state["complaints"]["open"], "total": state["complaints"]["total"]},
        "survey": {
            "last": survey["last"],
            "mean": round(survey["sum"] / survey["count"], 2) if survey["count"] else None,
            "count": survey["count"],
        },
        "rfm": state["rfm"],
        "segment": (state["rfm"] or {}).get("segment"),
        "value_tier": state["value_tier"],
        "lifecycle_stage": state["stage"],
        "recent_events": list(reversed(state["recent"])),
        # Read but not yet applied: they wait for the event clock (see ProfileDomain.apply).
        "waiting": held.listing(state.get("held")),
        "unapplied": [
            {"occurred_at": at, "event_id": eid, "type": kind, "error": error}
            for at, eid, kind, error in state.get("unapplied") or []
        ],
        "as_of": now.isoformat(),
    }
