"""A service host running inside a test: HTTP served, consuming, stopped cleanly, with an API client."""

from __future__ import annotations

import asyncio

import httpx


class RunningService:
    """`async with` a built ServiceHost; `api` carries the read-API token."""

    def __init__(self, host, common, token: str):
        self.host = host
        self.common = common
        self.settings = host.settings
        self.api = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{host.settings.http_port}", headers={"Authorization": f"Bearer {token}"}
        )

    async def __aenter__(self):
        self._http = asyncio.create_task(self.host.http.serve())
        await self.host.start()
        return self

    async def __aexit__(self, *exc):
        await self.api.aclose()
        await self.host.stop()
        self.host.http.should_exit = True
        await self._http
