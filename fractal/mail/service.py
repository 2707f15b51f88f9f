"""Sending templated mail: render, refuse bad input before anything leaves, deliver, record an event."""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from sqlalchemy.orm import Session

from fractal.errors import ServiceUnavailableError
from fractal.events import EventKind, record_event
from fractal.mail.backends import MailBackend, MailDeliveryError, OutgoingMail
from fractal.mail.registry import render_mail

log = structlog.get_logger(__name__)


def deliver_mail(
    session: Session,
    *,
    backend: MailBackend,
    sender: str,
    template: str,
    to: str,
    args: Mapping[str, str],
    actor: str,
) -> str:
    """Render and send one mail and add its event to the caller's transaction (the caller commits).

    Returns:
        The message id.
    Raises:
        UnprocessableError: unknown template or missing arguments (nothing is sent).
        ServiceUnavailableError: the backend could not deliver.
    """
    rendered = render_mail(template, args)
    try:
        message_id = backend.send(OutgoingMail(sender=sender, to=to, rendered=rendered))
    except MailDeliveryError as exc:
        log.warning("mail_delivery_failed", template=template, backend=backend.name, reason=str(exc))
        raise ServiceUnavailableError("The mail could not be delivered right now; retry shortly.") from exc
    # The event names the mail, never its body: bodies can hold links with tokens in them.
    record_event(
        session,
        kind=EventKind.MAIL_SENT,
        actor=actor,
        detail={"template": template, "to": to, "message_id": message_id, "backend": backend.name},
    )
    log.info("mail_sent", template=template, backend=backend.name, message_id=message_id)
    return message_id


def send_templated_mail(
    session: Session,
    *,
    backend: MailBackend,
    sender: str,
    template: str,
    to: str,
    args: Mapping[str, str],
    actor: str,
) -> str:
    """Send one templated mail and record it; one unit of work.

    Returns:
        The message id.
    Raises:
        UnprocessableError: unknown template or missing arguments (nothing is sent).
        ServiceUnavailableError: the backend could not deliver.
    """
    message_id = deliver_mail(session, backend=backend, sender=sender, template=template, to=to, args=args, actor=actor)
    session.commit()
    return message_id
