"""The composition root: `create_app(config)` wires routes, lifespan, errors and middleware.

granian calls it as a factory with no argument in each worker process, so it loads the config
itself then; tests pass one in.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from appliance import __version__, logs, metrics
from appliance.api import health
from appliance.api.access import access_layer
from appliance.api.errors import EXCEPTION_HANDLERS
from appliance.api.openapi import Document, operation_id
from appliance.api.services import open_services
from appliance.attachments import routes as attachments_routes
from appliance.auth import routes as keys_routes
from appliance.config import Config, load_config
from appliance.conversations import routes as conversations_routes
from appliance.exports import routes as exports_routes
from appliance.heartbeat import start_heartbeat
from appliance.messages import routes as messages_routes
from appliance.programs.api import die_with_parent
from appliance.realtime import drain
from appliance.realtime import routes as realtime_routes
from appliance.resources import open_resources
from appliance.webhooks import routes as webhooks_routes

log = structlog.get_logger()


def _lifespan(
    config: Config, signals: bool = False
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        stop = asyncio.Event()
        async with open_resources(config, "api") as res, open_services(res) as services:
            app.state.resources = res
            app.state.services = services
            app.state.shutting_down = False
            beats = await start_heartbeat(
                res.redis,
                res.keys,
                "api",
                config.appliance.instance,
                config.appliance.heartbeat_interval,
                stop,
            )
            # Start-up objects (modules, routes, pools) live as long as the process: taking them
            # out of the collector's reach turns full collections of 75-175 ms into a few ms.
            gc.collect()
            gc.freeze()
            if signals:  # a granian worker: its sockets are closed with 1001 before it stops
                drain.drain_on_signal(app.state, services, config.realtime.close_timeout)
            log.info("api_ready", bind=config.api.bind, port=config.api.port)
            try:
                yield
            finally:
                app.state.shutting_down = True
                stop.set()
                await beats
                metrics.process_exited()

    return lifespan


def create_app(config: Config | None = None) -> Litestar:
    signals = config is None  # granian's factory call, in a worker process
    if config is None:
        config = load_config()
        logs.configure("api", config.appliance.log_level, config.appliance.log_format)
        drain.block_signals()  # before any thread starts: see appliance/realtime/drain.py
        # In a granian worker: end with granian's main process, never serve outside it.
        die_with_parent(config.appliance.stop_timeout)
    app = Litestar(
        route_handlers=[
            *health.ROUTES,
            keys_routes.ROUTER,
            conversations_routes.ROUTER,
            messages_routes.ROUTER,
            attachments_routes.ROUTER,
            exports_routes.ROUTER,
            realtime_routes.ROUTER,
            webhooks_routes.ROUTER,
        ],
        lifespan=[_lifespan(config, signals)],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.api.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Messaging appliance",
            version=__version__,
            path="/schema",
            # The JSON document only, at /schema and /schema/openapi.json (no UI pages that
            # fetch scripts from elsewhere); see api/openapi.py.
            render_plugins=[Document(path=["/openapi.json", "/"])],
            operation_id_creator=operation_id,
        ),
        state=State({"shutting_down": False, "services": None}),
        logging_config=None,
        debug=False,
    )
    app.asgi_handler = access_layer(
        app.asgi_handler, config.api.max_body_bytes, config.api.body_timeout
    )
    return app
