"""The heavy app of bench/memory.py: a Starlette app over ~100 MB of data built at import.

Every contender serves this same file (`heavy_app:app`, PYTHONPATH=bench), so the memory a
pool costs differs only by how the server forks and shares it. `GET /` reads one record
(so a request touches the data and the framework's whole request path) and answers with
the `x-worker-pid` header the bench's probes count workers by. `GET /gc` runs a full
collection in the worker that answers, as a long-running worker eventually does by itself:
it visits every container the app built, and writes to each one's header unless they were
frozen (`gc.freeze()`) before the fork.
"""

from __future__ import annotations

import gc
import itertools
import os

import heavy_data
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_next = itertools.count()


async def index(request: Request) -> JSONResponse:
    record = heavy_data.lookup(next(_next))
    return JSONResponse({"records": heavy_data.COUNT, "record": record},
                        headers={"x-worker-pid": str(os.getpid())})


async def collect(request: Request) -> JSONResponse:
    return JSONResponse({"collected": gc.collect(), "frozen": gc.get_freeze_count()},
                        headers={"x-worker-pid": str(os.getpid())})


app = Starlette(routes=[Route("/", index), Route("/gc", collect)])
