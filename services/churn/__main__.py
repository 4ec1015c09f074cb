import asyncio

from services.churn.app import build


async def main() -> None:
    host = build()  # inside the loop: the Kafka clients bind to it
    await host.run()


asyncio.run(main())
