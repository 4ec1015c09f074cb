"""JSON logs that carry `event_id` and `customer_id`, with personal data masked.

Masking is applied to the rendered message and to every extra field, so a
careless `log.info("sent to %s", email)` still cannot leak an address.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

event_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)
customer_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("customer_id", default=None)

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_PHONE = re.compile(r"\+\d{3,}(\d{4})\b")
PII_KEYS = frozenset({"name", "email", "phone", "to", "address", "recipient"})
_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def mask_text(text: str) -> str:
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    return _PHONE.sub(lambda m: f"+***{m.group(1)}", text)


def mask_value(key: str, value: Any) -> Any:
    if key in PII_KEYS and value:
        s = str(value)
        return mask_text(s) if ("@" in s or s.startswith("+")) else s[:1] + "***"
    if isinstance(value, str):
        return mask_text(value)
    return value


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": mask_text(record.getMessage()),
        }
        if (eid := event_id_var.get()) is not None:
            out["event_id"] = eid
        if (cid := customer_id_var.get()) is not None:
            out["customer_id"] = cid
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = mask_value(key, value)
        if record.exc_info:
            out["exc"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_text(super().format(record))


def configure(service: str, level: str = "INFO", as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(service)
        if as_json
        else TextFormatter(f"%(asctime)s {service} %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every rebalance step at INFO; keep the useful part.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
