"""The mail templates shipped in the package and what each needs to render.

Each template ``NAME`` is three files under ``fractal/mail/templates/``: ``NAME.subject.txt`` (one line),
``NAME.txt`` (the plain-text part) and ``NAME.html`` (the HTML part, autoescaped). The registry below names
the arguments each one requires; rendering with an unknown name or a missing argument is refused before
anything is sent.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import jinja2

from fractal.errors import UnprocessableError


@dataclass(frozen=True)
class MailTemplate:
    """One shipped template: its name, the arguments it needs and what it is for."""

    name: str
    required_args: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class RenderedMail:
    """A template rendered with its arguments: ready to be put into a message."""

    template: str
    subject: str
    text: str
    html: str


TEMPLATES: dict[str, MailTemplate] = {
    template.name: template
    for template in (
        MailTemplate("welcome", ("name",), "Sent to a new user."),
        MailTemplate(
            "newsletter_confirm",
            ("confirm_url", "unsubscribe_url", "expires_in_hours"),
            "Double opt-in for the newsletter (sent by POST /newsletter/subscribe).",
        ),
    )
}

MAX_SUBJECT_LENGTH = 200


@functools.cache
def _environment() -> jinja2.Environment:
    # Built on first use, not at import. StrictUndefined turns a template referring to an argument the
    # registry forgot into an error instead of a silently blank mail.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fractal.mail", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def list_templates() -> list[MailTemplate]:
    """Every shipped template, by name."""
    return [TEMPLATES[name] for name in sorted(TEMPLATES)]


def template_subject(name: str) -> str:
    """The subject line as the template states it, placeholders unrendered (for listings)."""
    loader = _environment().loader
    assert loader is not None
    source, _filename, _uptodate = loader.get_source(_environment(), f"{name}.subject.txt")
    return " ".join(source.split())


def get_template_or_raise(name: str) -> MailTemplate:
    """The registered template called ``name``, or 422 naming it."""
    template = TEMPLATES.get(name)
    if template is None:
        raise UnprocessableError(
            f"Unknown mail template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}.",
            details={"unknown_template": name, "templates": sorted(TEMPLATES)},
        )
    return template


def render_mail(name: str, args: Mapping[str, str]) -> RenderedMail:
    """Render template ``name`` with ``args``.

    Raises:
        UnprocessableError: unknown template, or required arguments missing (all of them are named).
    """
    template = get_template_or_raise(name)
    missing = [arg for arg in template.required_args if arg not in args]
    if missing:
        raise UnprocessableError(
            f"Mail template {name!r} needs these missing arguments: {', '.join(missing)}.",
            details={"template": name, "missing_args": missing},
        )
    environment = _environment()
    values = {arg: args[arg] for arg in template.required_args}
    # Header injection: a subject is one line whatever the arguments hold.
    subject = " ".join(environment.get_template(f"{name}.subject.txt").render(values).split())
    return RenderedMail(
        template=name,
        subject=subject[:MAX_SUBJECT_LENGTH],
        text=environment.get_template(f"{name}.txt").render(values),
        html=environment.get_template(f"{name}.html").render(values),
    )
