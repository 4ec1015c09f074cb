"""Messages from Jinja2 templates: one file per kind and locale, with subject, text and SMS blocks.

    templates/<locale>/<kind>.txt   {% block subject %} {% block text %} {% block sms %}
    templates/layout.html           the HTML part, built from the text's paragraphs (autoescaped)

A customer's locale is used when a template exists for it, else another
region of the same language (zh-TW -> zh-CN), else English.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, TemplateError, select_autoescape

TEMPLATES = Path(__file__).parent / "templates"
FALLBACK = "en"
_SPACE = re.compile(r"\s+")

UNSUBSCRIBE_LABEL = {"en": "Unsubscribe from these e-mails", "zh": "退订此类邮件"}
# Marketing SMS say how to opt out (carrier rules in the US, 回T退订 in China); the keywords are
# among those notify's inbound webhook honours (services/notify/app.py, STOP_WORDS).
SMS_OPT_OUT = {"en": "Reply STOP to opt out.", "zh": "回复TD退订"}


class RenderError(ValueError):
    """A template is missing or broken: an operator fixes it, restarts notify (templates are read
    once per process), then replays the dead letter."""


@dataclass(frozen=True)
class Rendered:
    locale: str
    subject: str
    text: str
    html: str
    sms: str


class Renderer:
    def __init__(self, directory: Path = TEMPLATES):
        self.env = Environment(
            loader=FileSystemLoader(directory),
            autoescape=select_autoescape(["html"], default_for_string=False),
            trim_blocks=True,
            lstrip_blocks=True,
            # Templates are read once: checking their files' times on every render (Jinja2's
            # default) was two stat calls per message; a template change needs a restart.
            auto_reload=False,
        )
        self.locales = sorted(p.name for p in directory.iterdir() if p.is_dir())

    def locale_for(self, locale: str | None) -> str:
        if locale in self.locales:
            return locale
        lang = (locale or "").split("-")[0].lower()
        same = [x for x in self.locales if x.split("-")[0].lower() == lang]
        return same[0] if same else FALLBACK

    def render(
        self,
        kind: str,
        locale: str | None,
        ctx: dict[str, Any],
        unsubscribe_url: str | None = None,
        sms_opt_out: bool = False,
    ) -> Rendered:
        loc = self.locale_for(locale)
        try:
            tmpl = self.env.get_template(f"{loc}/{kind}.txt")
        except TemplateError:
            if loc == FALLBACK:
                raise RenderError(f"no template for kind {kind!r} (looked in {loc}/)") from None
            loc = FALLBACK
            try:
                tmpl = self.env.get_template(f"{loc}/{kind}.txt")
            except TemplateError:
                raise RenderError(f"no template for kind {kind!r} in {locale} or {FALLBACK}") from None
        try:
            blocks = {name: "".join(tmpl.blocks[name](tmpl.new_context(ctx))) for name in ("subject", "text", "sms")}
            subject = _SPACE.sub(" ", blocks["subject"]).strip()  # one line: a header must not break
            text = blocks["text"].strip()
            paragraphs = [_SPACE.sub(" ", p).strip() for p in text.split("\n\n") if p.strip()]
            html = self.env.get_template("layout.html").render(
                lang=loc,
                subject=subject,
                paragraphs=paragraphs,
                unsubscribe_url=unsubscribe_url,
                unsubscribe_label=UNSUBSCRIBE_LABEL.get(loc.split("-")[0], UNSUBSCRIBE_LABEL["en"]),
            )
        except (TemplateError, KeyError, TypeError, ValueError) as exc:
            raise RenderError(f"template {loc}/{kind}.txt failed: {type(exc).__name__}: {exc}") from None
        if not subject or not text:
            raise RenderError(f"template {loc}/{kind}.txt rendered an empty subject or text")
        sms = _SPACE.sub(" ", blocks["sms"]).strip()
        if sms_opt_out:
            lang = loc.split("-")[0]
            sms = f"{sms}{' ' if lang == 'en' else ''}{SMS_OPT_OUT.get(lang, SMS_OPT_OUT['en'])}"
        return Rendered(loc, subject, text, html, sms)
