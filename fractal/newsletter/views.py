"""Public newsletter API: subscribe (no token needed), confirm, unsubscribe."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint

from fractal.models import SubscriptionStatus
from fractal.newsletter import service
from fractal.newsletter.schemas import EmptyOut, SubscribeIn, SubscriptionStateOut, TokenIn, TokenQueryIn
from fractal.ratelimit import newsletter_rate_limit
from fractal.web import db_session, mail_backend, settings

newsletter_blueprint = APIBlueprint("newsletter", __name__, tag="Newsletter", url_prefix="/newsletter")


@newsletter_blueprint.post("/subscribe")
@newsletter_blueprint.input(SubscribeIn, arg_name="body")
@newsletter_blueprint.output(EmptyOut, status_code=202)
@newsletter_blueprint.doc(
    summary="Subscribe (sends a confirmation mail; same answer for known and unknown addresses)",
    description=(
        "Double opt-in: stores a pending subscription and mails a confirmation link. The answer is the same "
        "whether or not the address is known, so it reveals nothing about who subscribed. Rate limited per client"
        " address."
    ),
    responses={400: "Validation error", 429: "Rate limited", 503: "Mail backend unavailable"},
)
@newsletter_rate_limit
def subscribe(body: SubscribeIn) -> Any:
    config = settings()
    service.subscribe_newsletter(
        db_session(),
        email=str(body.email),
        backend=mail_backend(),
        sender=config.mail_from,
        public_url=config.public_url,
        secret_key=config.secret_key.get_secret_value(),
    )
    return {}


@newsletter_blueprint.get("/confirm")
@newsletter_blueprint.input(TokenQueryIn, location="query", arg_name="query")
@newsletter_blueprint.output(SubscriptionStateOut)
@newsletter_blueprint.doc(
    summary="Confirm a subscription with the mailed link",
    description=(
        "The signed token from the confirmation mail activates the subscription. An expired, tampered or unknown "
        "token is 400 `INVALID_TOKEN`."
    ),
    responses={400: "Invalid token"},
)
def confirm(query: TokenQueryIn) -> Any:
    subscription = service.confirm_newsletter(
        db_session(), token=query.token, secret_key=settings().secret_key.get_secret_value()
    )
    return {"status": subscription.status}


@newsletter_blueprint.post("/unsubscribe")
@newsletter_blueprint.input(TokenIn, arg_name="body")
@newsletter_blueprint.output(SubscriptionStateOut)
@newsletter_blueprint.doc(
    summary="Unsubscribe with the token from any newsletter mail",
    description=(
        "The signed token included in every newsletter mail ends the subscription. An invalid token is 400 "
        "`INVALID_TOKEN`."
    ),
    responses={400: "Invalid token"},
)
def unsubscribe(body: TokenIn) -> Any:
    service.unsubscribe_newsletter(db_session(), token=body.token, secret_key=settings().secret_key.get_secret_value())
    return {"status": SubscriptionStatus.UNSUBSCRIBED}
