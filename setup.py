"""Compiles the HTTP protocol (service/hello_cluster/http/fastproto.py) with mypyc.

Everything else is declared in pyproject.toml. mypyc turns the typed module into a C
extension that runs the same code without the interpreter's per-bytecode work: about a
third fewer instructions per request of the built-in page, and about a fifth less CPU per
request end to end (docs/benchmarks.md). The .py stays the source of truth; the compiled
module is preferred on import when it is there. HELLO_CLUSTER_PURE=1 skips the compile
(pure Python, same behaviour), e.g. where no C compiler is installed.
"""

import os
from typing import Any

from setuptools import setup


def ext_modules() -> list[Any]:
    if os.environ.get("HELLO_CLUSTER_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    # Not the project's strict mypy settings (make lint applies those): here mypy only types
    # the module for the compiler. Imported modules are read for their types, their own
    # errors not reported; the build environment holds uvicorn and httptools
    # (pyproject.toml's build-system), so the types are the same as in the venv's build.
    return mypycify(["--config-file=", "--ignore-missing-imports", "--follow-imports=silent",
                     "service/hello_cluster/http/fastproto.py"], opt_level="3")


setup(ext_modules=ext_modules())
