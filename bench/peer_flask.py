"""The WSGI suite's page: the same 43 bytes as every contender's, from a Flask view.

A real Flask app (routing, request and response objects) rather than a bare WSGI callable,
because that is what a WSGI server serves in production; every WSGI contender serves this
module, so differences measure the servers. The body is hello-cluster's own BODY.
"""

from __future__ import annotations

import os

from flask import Flask, Response

from hello_cluster.app import BODY

app = Flask(__name__)


@app.get("/")
def hello() -> Response:
    return Response(BODY, content_type="text/html; charset=utf-8",
                    headers={"x-worker-pid": str(os.getpid())})
