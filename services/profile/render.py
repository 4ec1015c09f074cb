"""Terminal rendering of the read API's answers (`crm customer`, `crm segments`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_customer(view: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    c, prof, p = view["contact"], view["profile"], view["purchases"]
    title = f"[bold]{view['customer_id']}[/bold]" + ("  [red](erased)[/red]" if view["erased"] else "")
    console.print(title)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row("name", c.get("name") or "-")
    head.add_row("e-mail / phone", f"{c.get('email') or '-'}  /  {c.get('phone') or '-'}")
    consent = ", ".join(f"{ch}: {'yes' if v['granted'] else 'no'} ({v['source']})" for ch, v in view["consent"].items())
    head.add_row("consent", consent or "-")
    head.add_row(
        "locale / timezone / channel",
        f"{prof.get('locale')} / {prof.get('timezone')} / {prof.get('preferred_channel')}",
    )
    head.add_row("birthday", prof.get("birthday") or "-")
    rfm = view["rfm"] or {}
    head.add_row(
        "segment",
        f"[bold]{view['segment'] or '-'}[/bold]"
        + (f"  (R{rfm['r']} F{rfm['f']} M{rfm['m']}, breakpoints v{rfm['version']})" if rfm else ""),
    )
    head.add_row("lifecycle stage", f"[bold]{view['lifecycle_stage'] or '-'}[/bold]")
    head.add_row("value tier", view["value_tier"] or "-")
    head.add_row(
        "purchases",
        f"{p['orders']} orders on {p['purchase_days']} days, first {(p['first'] or '-')[:10]}, "
        f"last {(p['last'] or '-')[:10]}"
        + (f" ({p['days_since_last']} days ago)" if p["days_since_last"] is not None else "")
        + (f", every {p['cadence_days']} days on average" if p["cadence_days"] else ""),
    )
    for cur, s in view["spend"].items():
        head.add_row(
            f"spend {cur}",
            f"net {s['net']} (total {s['total']}, refunded {s['refunded']}), average order {s['average_order_value']}",
        )
    head.add_row("top categories", ", ".join(view["top_categories"]) or "-")
    survey = view["survey"]
    head.add_row(
        "service",
        f"{len(view['complaints']['open'])} open complaint(s) of {view['complaints']['total']}; "
        f"survey last {survey['last'] or '-'}, mean {survey['mean'] or '-'} ({survey['count']})",
    )
    for label, key in (("waiting for the clock", "waiting"), ("failed when applied", "unapplied")):
        if view.get(key):
            head.add_row(label, ", ".join(f"{e['type']} of {e['occurred_at'][:16]}" for e in view[key]))
    console.print(head)
    if view["recent_events"]:
        events = Table(title="last events", show_edge=False)
        events.add_column("when")
        events.add_column("event")
        events.add_column("what")
        for e in view["recent_events"]:
            events.add_row(e["at"][:16].replace("T", " "), e["type"], e["summary"])
        console.print(events)


def render_segments(counts: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for dim in ("segments", "stages", "value_tiers"):
        values = counts.get(dim, {})
        total = sum(values.values()) or 1
        table = Table(title=dim.replace("_", " "), show_edge=False)
        table.add_column(dim[:-1])
        table.add_column("customers", justify="right")
        table.add_column("share", justify="right")
        for name, n in values.items():
            table.add_row(name, f"{n:,}", f"{100 * n / total:.1f}%")
        console.print(table)
    bp = counts.get("breakpoints") or {}
    console.print(
        f"breakpoints v{bp.get('version')} from {bp.get('customers', 0):,} customers, computed at "
        f"{bp.get('computed_at') or 'never (bootstrap values)'}; recency days {bp.get('recency_days')}, "
        f"frequency {bp.get('frequency')}"
    )
