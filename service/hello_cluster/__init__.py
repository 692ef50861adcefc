"""hello-cluster: a systemd- and container-native prefork supervisor for ASGI services."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the type of hello_cluster.run for checkers; the import itself is lazy
    from hello_cluster.api import run

__version__ = "0.1.0"
__all__ = ["__version__", "run"]


def __getattr__(name: str) -> Any:
    """`hello_cluster.run`, imported on first use (PEP 562): `import hello_cluster`, which
    every module of the package does for the version, must not pull in the CLI."""
    if name == "run":
        from hello_cluster.api import run

        return run
    raise AttributeError(f"module 'hello_cluster' has no attribute {name!r}")
