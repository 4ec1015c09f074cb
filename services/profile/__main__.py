import asyncio
import sys

from services.profile.app import build
from services.runtime.crypto import KeyConfigError


async def main() -> None:
    try:
        host = build()  # inside the loop: the Kafka clients bind to it
    except KeyConfigError as exc:
        sys.exit(f"profile: {exc}")
    await host.run()


asyncio.run(main())
