import asyncio
import sys

from pydantic import ValidationError

from services.loyalty.app import build
from services.loyalty.rules import RulesError


async def main() -> None:
    try:
        host = build()  # inside the loop: the Kafka clients bind to it
    except (ValidationError, RulesError) as exc:
        sys.exit(f"loyalty: invalid settings or rules (CRM_LOYALTY_* / CRM_*): {exc}")
    await host.run()


asyncio.run(main())
