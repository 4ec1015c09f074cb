"""Notify's rendering, MIME, provider URLs and error classification (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default as default_policy

import aiosmtplib
import httpx
import pytest

from services.notify.channels import (
    AddressError,
    ChannelSender,
    JsonSmsProvider,
    Outgoing,
    RejectedError,
    SmtpProvider,
    TransientError,
    TwilioSmsProvider,
    UnsupportedError,
    _http_error,
    _raise_classified,
    make_provider,
    mime,
)
from services.notify.links import LinkSigner
from services.notify.render import Renderer, RenderError


def test_locale_fallback_and_a_missing_kind():
    r = Renderer()
    assert r.render("welcome", "zh-TW", {}).locale == "zh-CN"
    assert r.render("welcome", "fr-FR", {}).locale == "en"
    with pytest.raises(RenderError, match="no template for kind 'nonsense'"):
        r.render("nonsense", "en", {})


def test_html_part_escapes_what_the_customer_controls():
    out = Renderer().render("welcome", "en", {"name": "<script>x</script>"}, "https://x/unsubscribe?c=1&t=2")
    assert "<script>" not in out.html and "&lt;script&gt;" in out.html
    assert 'href="https://x/unsubscribe?c=1&amp;t=2"' in out.html
    assert "<script>x</script>" in out.text  # the text part is plain text


def test_mime_has_both_parts_a_utf8_subject_and_one_click_unsubscribe():
    msg = Outgoing(
        channel="email",
        to="wang@example.com",
        customer_id="c-1",
        request_id="r-1",
        subject="生日快乐，王芳！",
        text="祝您生日快乐！",
        html="<p>祝您生日快乐！</p>",
        sms="",
        sender="Care <care@shop.example>",
        message_id="<r-1.email@crm.notify>",
        unsubscribe_url="https://crm.example/unsubscribe?c=c-1",
        sent_at=datetime(1997, 3, 4, 1, 0, tzinfo=UTC),
    )
    raw = mime(msg)
    assert b"=?utf-8?" in raw.lower()  # RFC 2047 encoded subject on the wire
    parsed = message_from_bytes(raw, policy=default_policy)
    assert str(parsed["Subject"]) == "生日快乐，王芳！"
    assert parsed["List-Unsubscribe"] == "<https://crm.example/unsubscribe?c=c-1>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["From"] == "Care <care@shop.example>" and parsed["Message-ID"] == "<r-1.email@crm.notify>"
    assert parsed.get_body(("plain",)).get_content().strip() == "祝您生日快乐！"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>祝您生日快乐！</p>"


@pytest.mark.parametrize(
    "status,body,error",
    [
        (503, {}, TransientError),
        (429, {}, TransientError),
        (408, {}, TransientError),
        (422, {"error": "invalid number"}, AddressError),
        (400, {"code": 21211}, AddressError),
        (400, {"code": 20003}, RejectedError),
        (401, ["not", "an", "object"], RejectedError),
    ],
)
def test_http_errors_are_classified(status, body, error):
    resp = httpx.Response(status, json=body)
    assert isinstance(_http_error(resp, {21211}), error)


def test_provider_urls():
    client = httpx.AsyncClient()
    smtp = make_provider("smtp://user:p%40ss@mail.example.com:587?starttls=true", client)
    assert isinstance(smtp, SmtpProvider)
    assert (smtp.host, smtp.port, smtp.username, smtp.password, smtp.start_tls) == (
        "mail.example.com",
        587,
        "user",
        "p@ss",
        True,
    )
    assert smtp.name == "smtp://mail.example.com:587"  # no credentials in names (logs, metrics)
    gw = make_provider("https://:tok@sms.example.com/v1/messages", client)
    assert isinstance(gw, JsonSmsProvider) and gw.token == "tok" and gw.url == "https://sms.example.com/v1/messages"
    tw = make_provider("twilio://AC1:secret@api.twilio.com?from=%2B15550001111", client)
    assert isinstance(tw, TwilioSmsProvider) and tw.sender == "+15550001111"
    # As the README writes it: a raw "+" is the number's, not a form-encoded space.
    assert make_provider("twilio://AC1:secret@api.twilio.com?from=+15550001111", client).sender == "+15550001111"
    assert tw.url == "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json"
    with pytest.raises(ValueError, match="needs \\?from="):
        make_provider("twilio://AC1:secret@api.twilio.com", client)
    with pytest.raises(ValueError, match="unknown provider scheme 'ftp'"):
        make_provider("ftp://x", client)


def test_unsubscribe_links_are_signed_per_customer_and_channel():
    links = LinkSigner("k" * 32, "https://crm.example/")
    url = links.unsubscribe_url("c&1", "email")
    assert url.startswith("https://crm.example/unsubscribe?c=c%261&ch=email&t=")
    token = links.token("c&1", "email")
    assert links.valid("c&1", "email", token)
    assert not links.valid("c&1", "sms", token) and not links.valid("c&2", "email", token)
    assert not links.valid("c&1", "email", "ünïcode")  # no crash on non-ASCII input
    with pytest.raises(ValueError, match="at least 16"):
        LinkSigner("short", "https://x")


@pytest.mark.parametrize(
    "code,message,error",
    [
        (550, "5.1.1 <x@example.com>: Recipient address rejected: User unknown", AddressError),
        (550, "No such user here", AddressError),  # no enhanced code: the basic reply names the mailbox
        (554, "5.7.1 <x@example.com>: Relay access denied", RejectedError),
        (550, "5.7.1 Message rejected due to blocklisting", RejectedError),
        (552, "5.2.2 Mailbox full", RejectedError),
        (450, "4.2.0 Mailbox busy", TransientError),
    ],
)
def test_a_refused_recipient_is_an_address_error_only_when_the_address_is_wrong(code, message, error):
    refused = aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(code, message, "x@example.com")])
    with pytest.raises(error):
        _raise_classified(refused)


def test_marketing_sms_say_how_to_opt_out():
    r = Renderer()
    ctx = {"name": "Ann", "offer_percent": 15}
    assert r.render("retention_offer", "en", ctx, sms_opt_out=True).sms.endswith("Reply STOP to opt out.")
    assert r.render("retention_offer", "zh-CN", ctx, sms_opt_out=True).sms.endswith("回复TD退订")
    assert "STOP" not in r.render("retention_offer", "en", ctx).sms


def test_an_internationalised_address_keeps_its_headers_whole():
    url = "https://crm.example/unsubscribe?c=cdnow-00001&ch=email&t=" + "a" * 64
    msg = Outgoing(
        "email", "王芳@例子.中国", "c-1", "r-1", "主题", "你好", "<p>你好</p>", "",
        sender="Care <care@shop.example>", message_id="<r-1.email@crm.notify>", unsubscribe_url=url,
    )  # fmt: skip
    parsed = message_from_bytes(mime(msg), policy=default_policy)
    assert parsed["To"] == "王芳@例子.中国" and parsed["Subject"] == "主题"
    assert parsed["List-Unsubscribe"] == f"<{url}>"  # not folded into encoded words


class _Provider:
    def __init__(self, name, error=None):
        self.name, self.error, self.calls = name, error, 0

    async def send(self, msg):
        self.calls += 1
        if self.error is not None:
            raise self.error


async def test_a_provider_that_cannot_carry_an_address_fails_over_and_none_can_is_an_address_error():
    msg = Outgoing("email", "王芳@例子.中国", "c-1", "r-1", "s", "t", "h", "")
    plain, able = _Provider("plain", UnsupportedError("no SMTPUTF8")), _Provider("able")
    sender = ChannelSender("email", [plain, able], attempts=3, base_delay=0.0, max_delay=0.0)
    assert await sender.send(msg) == "able" and plain.calls == 1
    neither = ChannelSender("email", [plain, _Provider("other", UnsupportedError("no SMTPUTF8"))],
                            attempts=3, base_delay=0.0, max_delay=0.0)  # fmt: skip
    with pytest.raises(AddressError, match="no provider can carry"):
        await neither.send(msg)
