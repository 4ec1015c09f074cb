import asyncio
import sys

from pydantic import ValidationError

from services.notify.app import build
from services.runtime.crypto import KeyConfigError


async def main() -> None:
    try:
        host = build()  # inside the loop: the Kafka clients bind to it
    except (ValidationError, KeyConfigError, ValueError) as exc:
        sys.exit(f"notify: invalid settings (CRM_NOTIFY_* / CRM_*): {exc}")
    await host.run()


asyncio.run(main())
