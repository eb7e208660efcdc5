"""Serving pagecast over HTTP: ``pagecast serve`` (the job API at ``/v1``, and the webhook
receiver at ``/webhook`` when its secrets are set), and the servers the demo and the tests run
in a thread of their own."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from pagecast.api import create_api
from pagecast.errors import ConfigurationError
from pagecast.settings import Settings
from pagecast.webhook_app import EventApplier, create_app, healthz


def create_server(settings: Settings, engine: sa.Engine) -> FastAPI:
    """``pagecast serve``: the HTTP job API at ``/v1``, and the webhook receiver beside it when
    the app secret and the verify token are set."""
    if settings.app_secret and settings.webhook_verify_token:
        app = create_app(settings, engine)
    else:
        app = FastAPI(title="pagecast", openapi_url=None)
        app.get("/healthz")(healthz)
    app.mount("/v1", create_api(settings, engine))
    return app


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Serve ``app`` in the foreground until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


@contextmanager
def running_receiver(
    settings: Settings, engine: sa.Engine, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[tuple[str, EventApplier]]:
    """Serve the receiver on ``port`` (0: a free one) in a background thread; yields its
    ``/webhook`` URL and its event applier."""
    app = create_app(settings, engine)
    with serving(app, host=host, port=port) as url:
        yield f"{url}/webhook", app.state.applier


@contextmanager
def serving(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` on ``port`` (0: a free one) in a background thread; yields its base URL."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that name it, and without it
    # every keep-alive answer waited ~40 ms for a delayed ACK.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="pagecast-server", daemon=True
    )
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ConfigurationError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
