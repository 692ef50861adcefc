"""Real framework apps for the apps suite: one route each, the same work under every server.

- `fastapi_app`: FastAPI, one JSON route (`{"message": "Hello Cluster!"}`), the header set
  through FastAPI's injected `Response`, as an app would;
- `starlette_app`: Starlette, one route answering a `JSONResponse`;
- `django_asgi`, `django_wsgi`: Django 5 with settings made here (no database, no
  middleware, DEBUG off), one view answering a `JsonResponse`;
- `flask_app`: Flask, one view answering the same JSON with `jsonify`;
- `flask_sleep_app`: the same view after `time.sleep(0.005)`, as a view waiting 5 ms on a
  database would: the case where the server's threads matter.

Every response carries `x-worker-pid` (the bench finds the workers by it) and the same
JSON object (28 bytes; Flask adds a newline, Django a space), so differences within one
app measure the servers. Django's ASGI handler sends no content-length. Import with
PYTHONPATH=bench. (No `from __future__ import annotations`: FastAPI reads the route's
annotations at run time, and `Response` is imported inside `_fastapi`.)
"""


import os
from typing import Any

MESSAGE = {"message": "Hello Cluster!"}


def _pid() -> str:
    return str(os.getpid())


# ---- FastAPI -----------------------------------------------------------------------------

def _fastapi() -> Any:
    from fastapi import FastAPI, Response

    app = FastAPI()

    @app.get("/")
    async def root(response: Response) -> dict[str, str]:
        response.headers["x-worker-pid"] = _pid()
        return MESSAGE

    return app


# ---- Starlette ---------------------------------------------------------------------------

def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def root(request: Request) -> JSONResponse:
        return JSONResponse(MESSAGE, headers={"x-worker-pid": _pid()})

    return Starlette(routes=[Route("/", root)])


# ---- Django ------------------------------------------------------------------------------

def _django_setup() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=False, SECRET_KEY="bench-only", ALLOWED_HOSTS=["*"],
                           ROOT_URLCONF=__name__, MIDDLEWARE=[], INSTALLED_APPS=[],
                           DATABASES={}, USE_TZ=True)
        django.setup()


def django_view(request: Any) -> Any:
    from django.http import JsonResponse

    response = JsonResponse(MESSAGE)
    response["x-worker-pid"] = _pid()
    return response


def _urlpatterns() -> list[Any]:
    from django.urls import path

    return [path("", django_view)]


# ---- Flask -------------------------------------------------------------------------------

def _flask() -> Any:
    from flask import Flask, jsonify

    app = Flask(__name__)

    @app.get("/")
    def root() -> Any:
        response = jsonify(MESSAGE)
        response.headers["x-worker-pid"] = _pid()
        return response

    return app


def _flask_sleep() -> Any:
    import time

    from flask import Flask, jsonify

    app = Flask(__name__)

    @app.get("/")
    def root() -> Any:
        time.sleep(0.005)
        response = jsonify(MESSAGE)
        response.headers["x-worker-pid"] = _pid()
        return response

    return app


def __getattr__(name: str) -> Any:
    """Build an app only when a server asks for it, so each imports just its framework."""
    if name == "fastapi_app":
        app = _fastapi()
    elif name == "starlette_app":
        app = _starlette()
    elif name == "flask_app":
        app = _flask()
    elif name == "flask_sleep_app":
        app = _flask_sleep()
    elif name == "urlpatterns":
        app = _urlpatterns()
    elif name in ("django_asgi", "django_wsgi"):
        _django_setup()
        if name == "django_asgi":
            from django.core.asgi import get_asgi_application

            app = get_asgi_application()
        else:
            from django.core.wsgi import get_wsgi_application

            app = get_wsgi_application()
    else:
        raise AttributeError(name)
    globals()[name] = app
    return app
