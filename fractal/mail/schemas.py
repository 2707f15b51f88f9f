"""Mail API bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, EmailStr, Field, StringConstraints

from fractal.schemas import StrictIn

ArgValue = Annotated[str, StringConstraints(max_length=2000)]


class MailIn(StrictIn):
    template: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    to: Annotated[EmailStr, StringConstraints(max_length=320)]
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
