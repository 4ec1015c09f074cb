"""Contact data at rest: encrypted fields, sealed outbox, key rotation, keyed lookups."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from services.runtime.crypto import ContactCodec, KeyConfigError, LookupHasher, make_cipher

STATE = {"contact": {"name": "王芳", "email": "fang@example.com", "phone": "+8613800138000"}, "stage": "new"}


def test_contact_fields_are_encrypted_and_round_trip():
    codec = ContactCodec(make_cipher(Fernet.generate_key().decode()))
    stored = codec.encode(STATE)
    text = repr(stored)
    assert "fang@example.com" not in text and "13800138000" not in text and "王芳" not in text
    assert stored["stage"] == "new"
    assert codec.decode(stored) == STATE
    assert STATE["contact"]["email"] == "fang@example.com"  # the input is not modified


def test_rotation_new_key_first_still_reads_old_data():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stored = ContactCodec(make_cipher(old)).encode(STATE)
    assert ContactCodec(make_cipher(f"{new},{old}")).decode(stored) == STATE
    with pytest.raises(KeyConfigError, match="does not decrypt"):
        ContactCodec(make_cipher(new)).decode(stored)


def test_missing_or_bad_keys_are_explained():
    with pytest.raises(KeyConfigError, match="CRM_PROFILE_ENCRYPTION_KEYS is empty"):
        make_cipher("")
    with pytest.raises(KeyConfigError, match="invalid Fernet key"):
        make_cipher("not-a-key")
    with pytest.raises(KeyConfigError, match="at least 16"):
        LookupHasher("short")


def test_lookup_hash_is_keyed_and_normalises_email():
    a, b = LookupHasher("k" * 32), LookupHasher("j" * 32)
    assert a.email("Fang@Example.com ") == a.email("fang@example.com")
    assert a.email("fang@example.com") != b.email("fang@example.com")
    assert "fang" not in a.email("fang@example.com")
    assert a.keys_of(STATE) == {a.email("fang@example.com"), a.phone("+8613800138000")}


def test_outbox_payloads_are_sealed():
    codec = ContactCodec(make_cipher(Fernet.generate_key().decode()))
    payload = b'{"email": "fang@example.com"}'
    sealed = codec.seal(payload)
    assert b"fang" not in sealed and codec.unseal(sealed) == payload


def test_a_document_keeps_its_tokens_while_its_fields_do_not_change():
    codec = ContactCodec(make_cipher(Fernet.generate_key().decode()))
    meta_a, meta_b = {}, {}
    first = codec.encode(STATE, meta_a)["contact"]
    again = codec.encode(STATE, meta_a)["contact"]
    assert again == first  # nothing re-encrypted
    moved = {**STATE, "contact": {**STATE["contact"], "email": "fang@example.org"}}
    after = codec.encode(moved, meta_a)["contact"]
    assert after["email"] != first["email"] and after["name"] == first["name"] and after["phone"] == first["phone"]
    assert codec.decode({"contact": after})["contact"] == moved["contact"]
    # Another customer with the same contact never gets the first one's tokens.
    other = codec.encode(STATE, meta_b)["contact"]
    assert all(other[k] != first[k] for k in ("name", "email", "phone"))
    # Erased (no contact any more): the memo, which holds the plaintexts, goes too.
    codec.encode({"contact": {}}, meta_a)
    assert "sealed" not in meta_a
    # Without a memo every call encrypts afresh.
    assert codec.encode(STATE)["contact"]["email"] != codec.encode(STATE)["contact"]["email"]
