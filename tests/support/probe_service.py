"""A minimal service on the shared runtime, for testing the runtime itself.

It counts purchases per customer and asks for a thank-you after the first one:
enough to show dedup, the outbox, dead letters and offset commits end to end,
with no business logic that could hide a runtime bug.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from pydantic_settings import SettingsConfigDict

from contracts import derive, topics
from contracts.crm import CareRequested, CareRequestedData
from contracts.shop import PurchaseCompleted
from services.runtime.service import ServiceHost, ServiceSpec
from services.runtime.settings import CommonSettings, ServiceSettings


class ProbeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_PROBE_", extra="ignore")
    http_port: int = 8199
    group_id: str = "crm-probe"
    database: str = "probe"


class ProbeDomain:
    def apply(self, state, event, now):
        state = dict(state or {"purchases": 0, "spend": "0"})
        derived = []
        if isinstance(event, PurchaseCompleted):
            state["purchases"] += 1
            state["spend"] = str(Decimal(state["spend"]) + event.data.total)
            if state["purchases"] == 1:
                derived.append(
                    derive(
                        CareRequested,
                        event,
                        CareRequestedData(
                            kind="first_purchase_thanks",
                            purpose="transactional",
                            template_data={"order_id": event.data.order_id},
                        ),
                        producer="probe",
                    )
                )
        return state, derived


def build(common: CommonSettings | None = None, settings: ProbeSettings | None = None) -> ServiceHost:
    spec = ServiceSpec(name="probe", consumes=[topics.SHOP_PURCHASES], domain=ProbeDomain())
    return ServiceHost(spec, common or CommonSettings(), settings or ProbeSettings())


async def main() -> None:
    await build().run()


if __name__ == "__main__":
    asyncio.run(main())
