"""A per-client visit counter kept in a server-side session: the Node note's cluster caveat.

Every hello-cluster worker is its own process, so anything an app keeps in its own memory
(a dict of sessions, a cache) is seen only by the worker that wrote it. The client's next
connection may land on another worker - hello-cluster spreads them - or on a worker that a
reload or a crash replaced. A session store every worker reaches (Redis here) fixes that.

    SESSION_STORE=redis   (default) sessions live in Redis at REDIS_URL
    SESSION_STORE=memory  sessions live in each worker's own dict: only to show the breakage
    REDIS_URL             default redis://127.0.0.1:6379/0
    SESSION_COOKIE_SECURE 1 (default): the cookie is sent over HTTPS only; 0 for a plain
                          http://localhost demo

Serve it with `hello-cluster --app sessions_app:app` from this directory. Sessions are
handled by starsessions (SessionMiddleware with its RedisStore or InMemoryStore), talking
to Redis through redis-py's asyncio client.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starsessions import (
    InMemoryStore,
    SessionAutoloadMiddleware,
    SessionMiddleware,
    SessionStore,
)
from starsessions.session import get_session_handler, regenerate_session_id
from starsessions.stores.redis import RedisStore

LIFETIME_S = 3600  # a session unused for an hour expires (Redis TTL and cookie max-age)
STORES = ("redis", "memory")


class ConfigError(ValueError):
    """A bad environment value: the message names it and the fix (hello-cluster exits 4)."""


def _setting(name: str, default: str, allowed: tuple[str, ...] | None = None) -> str:
    value = os.environ.get(name, default).strip().lower()
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


def make_store() -> tuple[SessionStore, Redis | None]:
    """The store SESSION_STORE names, and the Redis client to close at shutdown (if any).

    The client is created at import, that is in each worker after fork (hello-cluster
    imports the app in the worker), so no connection is ever shared between processes;
    redis-py connects lazily, on the first request, inside the worker's event loop.
    """
    kind = _setting("SESSION_STORE", "redis", STORES)
    if kind == "memory":
        return InMemoryStore(), None
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        client = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    except ValueError as err:
        raise ConfigError(f"REDIS_URL={url!r} is not a Redis URL: {err}") from None
    return RedisStore(connection=client, prefix="hello-cluster-session."), client


STORE, REDIS = make_store()
SECURE = _setting("SESSION_COOKIE_SECURE", "1", ("1", "0", "true", "false")) in ("1", "true")


async def count(request: Request) -> Response:
    """Count this client's visits; say which worker answered and which store it used."""
    if get_session_handler(request).initially_empty:
        # An id nobody issued (or one that expired): never adopt a client-chosen id.
        regenerate_session_id(request)
    visits = int(request.session.get("visits", 0)) + 1
    request.session["visits"] = visits
    pid = os.getpid()
    return JSONResponse({"visits": visits, "worker_pid": pid, "store": type(STORE).__name__},
                        headers={"x-worker-pid": str(pid), "cache-control": "no-store"})


class StoreDown:
    """Redis unreachable while loading or saving a session: 503, and the worker stays up.

    Outermost of the app's middleware, because starsessions loads and saves the session
    in middleware, outside the reach of Starlette's exception handlers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except RedisError:
            if started:
                raise
            await JSONResponse({"error": "session store unavailable"}, status_code=503,
                               headers={"retry-after": "1", "x-worker-pid": str(os.getpid())}
                               )(scope, receive, send)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    if REDIS is not None:  # drain: close this worker's connections to Redis cleanly
        await REDIS.aclose()


app = Starlette(
    routes=[Route("/", count, methods=["GET"])],
    middleware=[
        Middleware(StoreDown),
        Middleware(SessionMiddleware, store=STORE, lifetime=LIFETIME_S, rolling=True,
                   cookie_https_only=SECURE, cookie_name="session"),
        Middleware(SessionAutoloadMiddleware),
    ],
    lifespan=lifespan,
)
