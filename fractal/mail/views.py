"""Admin mail API: list the shipped templates, send one (scope ``admin``)."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint

from fractal.auth.api_keys import ApiScope
from fractal.auth.decorators import admin_required
from fractal.mail import service
from fractal.mail.registry import list_templates, template_subject
from fractal.mail.schemas import MailIn, MailSentOut, TemplateListOut
from fractal.web import current_admin_actor, db_session, mail_backend, settings

mail_admin_blueprint = APIBlueprint("mail_admin", __name__, tag="Mail", url_prefix="/admin")
_AUTH = {401: "Unauthorized", 403: "Forbidden"}


@mail_admin_blueprint.get("/mail/templates")
@mail_admin_blueprint.output(TemplateListOut)
@mail_admin_blueprint.doc(summary="Mail templates shipped in the package", security="UserToken", responses=_AUTH)
@admin_required(ApiScope.ADMIN_READ)
def get_templates() -> Any:
    return {
        "templates": [
            {
                "name": template.name,
                "subject": template_subject(template.name),
                "required_args": list(template.required_args),
                "description": template.description,
            }
            for template in list_templates()
        ]
    }


@mail_admin_blueprint.post("/mail")
@admin_required(ApiScope.ADMIN_WRITE)
@mail_admin_blueprint.input(MailIn, arg_name="body")
@mail_admin_blueprint.output(MailSentOut, status_code=202)
@mail_admin_blueprint.doc(
    summary="Send a templated mail",
    security="UserToken",
    responses={
        **_AUTH,
        400: "Validation error",
        422: "Unknown template or missing arguments",
        503: "Mail backend unavailable",
    },
)
def send_mail(body: MailIn) -> Any:
    message_id = service.send_templated_mail(
        db_session(),
        backend=mail_backend(),
        sender=settings().mail_from,
        template=body.template,
        to=str(body.to),
        args=body.args,
        actor=current_admin_actor(),
    )
    return {"message_id": message_id}
