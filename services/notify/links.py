"""Signed one-click unsubscribe links (RFC 8058): the token proves the link came from us."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlencode


class LinkSigner:
    def __init__(self, key: str, public_url: str):
        if len(key) < 16:
            raise ValueError("CRM_NOTIFY_LINK_KEY must be at least 16 characters (use `crm keys`)")
        self._key = key.encode()
        self.public_url = public_url.rstrip("/")

    def token(self, customer_id: str, channel: str) -> str:
        mac = hmac.new(self._key, f"unsubscribe\n{customer_id}\n{channel}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def valid(self, customer_id: str, channel: str, token: str) -> bool:
        return hmac.compare_digest(self.token(customer_id, channel).encode(), (token or "").encode())

    def unsubscribe_path(self, customer_id: str, channel: str = "email") -> str:
        query = urlencode({"c": customer_id, "ch": channel, "t": self.token(customer_id, channel)})
        return f"/unsubscribe?{query}"

    def unsubscribe_url(self, customer_id: str, channel: str = "email") -> str:
        return self.public_url + self.unsubscribe_path(customer_id, channel)
