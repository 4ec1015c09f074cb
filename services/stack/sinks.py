"""The embedded stack's delivery endpoints: a real SMTP server and a local SMS gateway.

    smtp  (aiosmtpd) on 127.0.0.1:2525: every accepted message is stored as a .eml file
          under var/mail/; recipients in the reserved .invalid domain are refused with 550.
    sms   (HTTP) on 127.0.0.1:2526: POST /messages (JSON) or the Twilio form API; every accepted
          message is appended to var/sms.jsonl as {to, body, customer_id, request_id, ...}.
          An Idempotency-Key (or I-Twilio-Idempotency-Token) seen before is acknowledged
          without a second line, as a production gateway with idempotency keys does.
          Numbers starting with +999 are refused as invalid (HTTP 422 / Twilio code 21211).

Run as `python -m services.stack.sinks smtp|sms ...` by `crm stack up`; tests start them in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from email import message_from_bytes
from email.policy import default as default_policy
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger(__name__)
INVALID_PHONE_PREFIX = "+999"


class MailDir:
    """aiosmtpd handler: one .eml file per accepted message."""

    def __init__(self, directory: Path, accept: Callable[[Envelope], str | None] | None = None):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count()
        # Tests: return an SMTP reply to refuse a message, None to take it (or an awaitable of either).
        self.accept = accept

    async def handle_RCPT(self, server, session: Session, envelope: Envelope, address: str, options) -> str:
        if address.rsplit("@", 1)[-1].lower().endswith(".invalid"):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:
        reply = self.accept(envelope) if self.accept is not None else None
        if inspect.isawaitable(reply):
            reply = await reply  # tests: a slow server
        if reply is not None:
            return reply
        name = f"{time.time_ns()}-{os.getpid()}-{next(self._seq)}.eml"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(envelope.original_content or envelope.content)
        tmp.rename(self.directory / name)  # readers never see half a message
        return "250 Message accepted"


def read_mail(directory: Path) -> list:
    """The stored messages, parsed, oldest first."""
    return [
        message_from_bytes(p.read_bytes(), policy=default_policy)
        for p in sorted(directory.glob("*.eml"), key=lambda p: p.name)
    ]


async def start_smtp(host: str, port: int, directory: Path, accept=None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    handler = MailDir(directory, accept)
    return await loop.create_server(
        partial(SMTP, handler, enable_SMTPUTF8=True, hostname="crm-local-smtp"), host=host, port=port
    )


class SmsLog:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set[str] = set()
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    key = json.loads(line).get("idempotency_key")
                except (ValueError, AttributeError):
                    continue  # a line cut short by a crash
                if key:
                    self.keys.add(key)

    def append(self, entry: dict) -> bool:
        key = entry.get("idempotency_key")
        if key and key in self.keys:
            return False
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if key:
            self.keys.add(key)
        return True


def read_sms(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sms_app(path: Path) -> Starlette:
    log_ = SmsLog(path)

    async def messages(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            to, text = str(body["to"]), str(body["body"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected JSON {to, body, customer_id, request_id}"}, status_code=400)
        if to.startswith(INVALID_PHONE_PREFIX):
            return JSONResponse({"error": "invalid number"}, status_code=422)
        entry = {
            "to": to,
            "body": text,
            "customer_id": body.get("customer_id"),
            "request_id": body.get("request_id"),
            "idempotency_key": request.headers.get("idempotency-key"),
            "received_at": time.time(),
        }
        created = log_.append(entry)
        return JSONResponse({"status": "accepted", "duplicate": not created}, status_code=201 if created else 200)

    async def twilio(request: Request) -> JSONResponse:
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        form = {k: v[0] for k, v in fields.items()}
        to, text = form.get("To", ""), form.get("Body", "")
        if not to or not text:
            return JSONResponse({"code": 21604, "message": "To and Body are required"}, status_code=400)
        if to.startswith(INVALID_PHONE_PREFIX):
            return JSONResponse({"code": 21211, "message": "invalid 'To' phone number"}, status_code=400)
        key = request.headers.get("i-twilio-idempotency-token")
        entry = {
            "to": to,
            "body": text,
            "from": form.get("From", ""),
            "customer_id": None,
            "request_id": key.rsplit(":", 1)[0] if key else None,
            "idempotency_key": key,
            "received_at": time.time(),
        }
        log_.append(entry)
        sid = request.path_params["sid"]
        return JSONResponse({"sid": f"SM{time.time_ns():032x}"[:34], "account_sid": sid, "status": "queued"}, 201)

    return Starlette(
        routes=[
            Route("/messages", messages, methods=["POST"]),
            Route("/2010-04-01/Accounts/{sid}/Messages.json", twilio, methods=["POST"]),
        ]
    )


def sms_server(host: str, port: int, path: Path) -> uvicorn.Server:
    config = uvicorn.Config(sms_app(path), host=host, port=port, log_level="warning", lifespan="off")
    return uvicorn.Server(config)


async def _serve(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.stack.sinks")
    sub = parser.add_subparsers(dest="kind", required=True)
    smtp = sub.add_parser("smtp", help="SMTP server storing .eml files")
    smtp.add_argument("--host", default="127.0.0.1")
    smtp.add_argument("--port", type=int, default=2525)
    smtp.add_argument("--dir", type=Path, default=Path("var/mail"))
    sms = sub.add_parser("sms", help="HTTP SMS gateway appending JSON lines")
    sms.add_argument("--host", default="127.0.0.1")
    sms.add_argument("--port", type=int, default=2526)
    sms.add_argument("--file", type=Path, default=Path("var/sms.jsonl"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def run_smtp(stop: asyncio.Event) -> None:
        server = await start_smtp(args.host, args.port, args.dir)
        log.info("SMTP sink on %s:%d storing to %s", args.host, args.port, args.dir)
        await stop.wait()
        server.close()
        await server.wait_closed()

    if args.kind == "sms":
        log.info("SMS gateway on %s:%d appending to %s", args.host, args.port, args.file)
        sms_server(args.host, args.port, args.file).run()  # uvicorn handles SIGTERM/SIGINT itself
        return
    asyncio.run(_serve(run_smtp))


if __name__ == "__main__":
    main()
