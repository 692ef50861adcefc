"""Radamsa-mutated requests (bench/radamsa.py) against both protocols, with a small budget.

The full run (9,000 cases per protocol, seed 22) is in bench/results/radamsa/; this one
keeps 1,000 per protocol in the suite (about 2 s each) so a regression shows in CI: no
byte h11 refuses, no 500/502/504 for a client's bytes, no connection held open after the
client's half-close, the worker and the master alive.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import BIN, ROOT


def harness() -> object:
    spec = importlib.util.spec_from_file_location("radamsa_harness", ROOT / "bench" / "radamsa.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["radamsa_harness"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("http", ["fast", "uvicorn"])
def test_radamsa_mutations_hurt_nothing(http: str) -> None:
    report = harness().fuzz(http, 1000, 22, str(BIN))  # type: ignore[attr-defined]
    assert report["cases"] == 1000
    assert report["malformed"] == [], report["malformed"][:3]
    assert report["forbidden"] == [], report["forbidden"][:3]
    assert report["slow"] == [], report["slow"][:3]
    assert report["workers_unchanged"] and report["master_alive"], report
    assert report["statuses"].get(200, 0) > 100  # the mutations are not all refused
