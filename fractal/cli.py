"""Flask CLI commands (`flask --app app <command>`): tokens, the scaler and the history purge."""

from __future__ import annotations

import click
from flask import Flask


def register_cli(app: Flask) -> None:
    @app.cli.command("token")
    @click.option("--admin", is_flag=True, help="Grant the admin scope.")
    @click.option("--user", "user_id", default="dev-user", show_default=True, help="The token's subject.")
    @click.option("--ttl", "ttl_s", default=24 * 3600, show_default=True, help="Lifetime in seconds.")
    def token_command(admin: bool, user_id: str, ttl_s: int) -> None:
        """Print a development user token (last line of output)."""
        settings = app.extensions["fractal"].settings
        if settings.env == "production":
            raise click.ClickException("Development tokens are not available in production.")
        from fractal.auth.dev_keys import ensure_dev_keypair, mint_token

        pair = ensure_dev_keypair()
        click.echo(
            mint_token(
                pair.private_pem,
                user_id=user_id,
                admin=admin,
                ttl_s=ttl_s,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            )
        )

    @app.cli.command("scaler")
    @click.option("--once", is_flag=True, help="Run one pass, print its report as JSON and exit.")
    def scaler_command(once: bool) -> None:
        """Run the scaler loop until SIGTERM (many replicas may run: one pass at a time wins the lock)."""
        import json

        from fractal.scaling.runner import ScalerPassFailed, build_wakeup, run_scaler

        state = app.extensions["fractal"]
        try:
            report = run_scaler(
                state.settings,
                state.session_factory,
                state.cloud,
                wakeup=build_wakeup(state.settings),
                once=once,
            )
        except ScalerPassFailed as failure:
            click.echo(json.dumps({"ran": False, "error": str(failure)}))
            raise click.ClickException(f"scaler pass failed: {failure}") from None
        if once and report is not None:
            click.echo(json.dumps(report.as_dict()))

    @app.cli.command("purge")
    @click.option(
        "--max-seconds", "max_s", type=float, default=None, help="Stop after this long (FRACTAL_PURGE_MAX_S)."
    )
    @click.option("--batch-size", type=click.IntRange(1, 100_000), default=None, help="Rows per batch.")
    def purge_command(max_s: float | None, batch_size: int | None) -> None:
        """Purge history past its retention once, in batches, and print the counts as JSON."""
        import json

        from fractal.database import session_scope
        from fractal.metrics import record_purge
        from fractal.retention import default_log_objects, purge_history

        state = app.extensions["fractal"]
        with session_scope(state.session_factory) as session:
            report = purge_history(
                session,
                settings=state.settings,
                log_objects=default_log_objects(state.settings),
                batch_size=batch_size,
                max_s=max_s,
            )
        record_purge(report.purged)
        click.echo(json.dumps(report.as_dict()))
        if report.errors:
            raise click.ClickException("purge failed for: " + "; ".join(report.errors))
