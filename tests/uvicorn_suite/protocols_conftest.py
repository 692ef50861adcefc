"""Copied by tests/test_uvicorn_suite.py to `tests/protocols/conftest.py` of uvicorn's sdist.

uvicorn's HTTP protocol tests take the protocol class from the `http_protocol_cls` fixture
of their root conftest (parametrized with httptools and h11). A conftest nearer the tests
overrides that fixture: the whole file then runs against hello-cluster's protocol instead.
"""

import pytest

from hello_cluster.http.fastproto import FastProtocol


@pytest.fixture(params=[FastProtocol], ids=["fast"])
def http_protocol_cls(request: pytest.FixtureRequest) -> type:
    return request.param
