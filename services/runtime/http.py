"""The one HTTP endpoint per service: /metrics, /healthz, /readyz, plus the service's own routes."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route


def make_app(
    registry: CollectorRegistry,
    ready: Callable[[], tuple[bool, dict]],
    routes: Sequence[BaseRoute] = (),
    before_scrape: Callable[[], object] | None = None,
) -> Starlette:
    async def metrics(_: Request) -> Response:
        if before_scrape is not None:
            result = before_scrape()
            if asyncio.iscoroutine(result):
                await result
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        ok, detail = ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz), *routes])


def require_token(token: str):
    """Decorator for read-API endpoints: 401 unless `Authorization: Bearer <token>` matches."""

    def wrap(endpoint):
        async def guarded(request: Request) -> Response:
            given = request.headers.get("authorization", "")
            if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await endpoint(request)

        return guarded

    return wrap


def make_server(app: Starlette, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    # The service handles signals itself and stops the server in order.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    return server
