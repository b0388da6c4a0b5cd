"""``big5 serve``: run the service with uvicorn (settings from the environment, prefix ``BIG5_``)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
REFUSED_EXIT = 78  # EX_CONFIG: refused to start (no keys beyond loopback, no database URL in the image)
ENGINE_LOST_EXIT = 3  # the engine died and could not be restarted (docker-compose.yml restarts the service)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
        log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
        insecure_no_auth: Annotated[
            bool,
            typer.Option(
                "--insecure-no-auth",
                help="Serve beyond loopback with no API keys (every caller an admin); "
                "also BIG5_SERVICE__INSECURE_NO_AUTH=1.",
            ),
        ] = False,
    ) -> None:
        """Serve /v1/generate, /v1/chat/completions, adapters, training jobs and assessments.

        Bound beyond loopback (not 127.0.0.0/8, ::1, localhost) with no API keys configured, it refuses
        to start unless given --insecure-no-auth.
        """
        import uvicorn

        from big5core.settings import DatabaseUrlRequired, get_settings
        from service.app import create_app
        from service.deps import InsecureExposure, check_exposure
        from service.middleware import install_request_id_logging

        install_request_id_logging()
        logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, force=True)
        settings = get_settings()
        if insecure_no_auth:
            service = settings.service.model_copy(update={"insecure_no_auth": True})
            settings = settings.model_copy(update={"service": service})
        try:
            logger.log(*check_exposure(settings.service, host))
            _ = settings.resolved_database_url  # in the image: no URL fails now, not after the engine start
        except (InsecureExposure, DatabaseUrlRequired) as exc:
            typer.echo(f"big5 serve: {exc}", err=True)
            raise typer.Exit(REFUSED_EXIT) from None
        lost: list[str] = []

        def engine_lost(reason: str) -> None:  # the engine cannot be restarted: stop, then exit non-zero
            lost.append(reason)
            server.should_exit = True

        application = create_app(settings, on_engine_lost=engine_lost)
        # log_config=None: keep the root configuration above (request ids) for uvicorn's loggers too.
        config = uvicorn.Config(application, host=host, port=port, log_config=None, log_level=log_level.lower())
        server = uvicorn.Server(config)
        server.run()
        if lost:
            typer.echo(f"big5 serve: {lost[0]}; exiting for the supervisor to restart the service", err=True)
            raise typer.Exit(ENGINE_LOST_EXIT)
