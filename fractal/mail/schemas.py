"""Mail API bodies."""

from __future__ import annotations

from typing import Annotated

import email_validator
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from fractal.schemas import StrictIn


def validate_address(value: str) -> str:
    """A bare deliverable-looking address (no display name, no DNS lookup), normalised by email-validator."""
    try:
        return str(email_validator.validate_email(value, check_deliverability=False).normalized)
    except email_validator.EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None


EmailAddress = Annotated[str, StringConstraints(min_length=3, max_length=320), AfterValidator(validate_address)]
ArgValue = Annotated[str, StringConstraints(max_length=2000)]


class MailIn(StrictIn):
    template: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    to: EmailAddress
    args: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], ArgValue] = Field(
        default_factory=dict, max_length=50
    )


class MailSentOut(BaseModel):
    message_id: str


class TemplateOut(BaseModel):
    name: str
    subject: str
    required_args: list[str]
    description: str


class TemplateListOut(BaseModel):
    templates: list[TemplateOut]
