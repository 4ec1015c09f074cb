"""Personal data at rest: Fernet-encrypted contact fields and sealed outbox entries, keyed lookups.

Shared by the services that hold contact details (profile, notify).

The state in memory holds plaintext (the service needs it to publish or send);
everything written to MongoDB goes through `ContactCodec`, so neither a service's
customer documents nor their outbox hold a readable e-mail, phone number or name.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

ENCRYPTED_FIELDS = ("name", "email", "phone")


class KeyConfigError(ValueError):
    """A missing or malformed key in the settings."""


def make_cipher(keys: str, setting: str = "CRM_PROFILE_ENCRYPTION_KEYS") -> MultiFernet:
    parts = [k.strip() for k in keys.split(",") if k.strip()]
    if not parts:
        raise KeyConfigError(
            f"{setting} is empty: personal data must be encrypted at rest. "
            "Generate a key with `crm keys` and set it (comma-separate several to rotate)."
        )
    try:
        return MultiFernet([Fernet(k.encode()) for k in parts])
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(f"{setting} holds an invalid Fernet key: {exc}") from None


def normalise_email(email: str) -> str:
    return unicodedata.normalize("NFKC", email).strip().lower()


class LookupHasher:
    """HMAC-SHA256 of a normalised contact: equal inputs meet, the store learns nothing readable."""

    def __init__(self, key: str, setting: str = "CRM_PROFILE_LOOKUP_KEY"):
        if len(key) < 16:
            raise KeyConfigError(f"{setting} must be at least 16 characters (use `crm keys`)")
        self._key = key.encode()

    def email(self, email: str) -> str:
        return "e:" + hmac.new(self._key, normalise_email(email).encode(), hashlib.sha256).hexdigest()

    def phone(self, phone: str) -> str:
        return "p:" + hmac.new(self._key, phone.strip().encode(), hashlib.sha256).hexdigest()

    def keys_of(self, state: dict[str, Any] | None) -> set[str]:
        contact = (state or {}).get("contact") or {}
        out = set()
        if contact.get("email"):
            out.add(self.email(contact["email"]))
        if contact.get("phone"):
            out.add(self.phone(contact["phone"]))
        return out


class ContactCodec:
    """The store codec for states with a `contact` dict (see services.runtime.statestore.Codec)."""

    def __init__(self, cipher: MultiFernet):
        self.cipher = cipher

    def encode(self, state: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """`meta` is the document's unpersisted bookkeeping (CustomerDoc.meta): the tokens written
        last are kept there, and a field whose plaintext has not changed keeps its token. Every
        write re-encrypted every field before: 8 % of profile's CPU in the bench. A token is only
        ever reused for the document it was made for, so equal plaintexts of two customers still
        differ at rest; what an observer of successive writes learns is that a field did not change.
        The memo is not persisted: after a restart (for example with a new primary key) the first
        write of each document encrypts afresh."""
        contact = state.get("contact")
        if not contact:
            if meta is not None:
                meta.pop("sealed", None)  # erased: the memo's plaintexts go too
            return state
        memo = meta.setdefault("sealed", {}) if meta is not None else {}
        sealed = {}
        for k, v in contact.items():
            if k not in ENCRYPTED_FIELDS or not v:
                sealed[k] = v
                continue
            known = memo.get(k)
            if known is None or known[0] != v:
                known = memo[k] = (v, self.cipher.encrypt(v.encode()).decode())
            sealed[k] = known[1]
        return {**state, "contact": sealed}

    def decode(self, state: dict[str, Any]) -> dict[str, Any]:
        contact = state.get("contact")
        if not contact:
            return state
        try:
            opened = {
                k: (self.cipher.decrypt(v.encode()).decode() if k in ENCRYPTED_FIELDS and v else v)
                for k, v in contact.items()
            }
        except InvalidToken:
            raise KeyConfigError("stored contact data does not decrypt with any configured key") from None
        return {**state, "contact": opened}

    def seal(self, value: bytes) -> bytes:
        return self.cipher.encrypt(value)

    def unseal(self, value: bytes) -> bytes:
        return self.cipher.decrypt(value)
