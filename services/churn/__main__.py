import asyncio
import sys

from pydantic import ValidationError

from services.churn.app import build


async def main() -> None:
    try:
        host = build()  # inside the loop: the Kafka clients bind to it
    except ValidationError as exc:
        sys.exit(f"churn: invalid settings (CRM_CHURN_* / CRM_*): {exc}")
    await host.run()


asyncio.run(main())
