"""The errors an operator can cause, each with its documented exit code.

Everything the operator can get wrong surfaces as a `ClusterError`: the CLI prints its message
on one line and exits with its code. Anything else escaping is a bug in hello-cluster.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in hello-cluster: please report it
EXIT_USAGE = 2  # an invalid flag, env value or combination
EXIT_LISTENER = 3  # a listener could not be bound or a socket-activated fd is unusable
EXIT_APP = 4  # the application could not be loaded, or is neither ASGI nor WSGI
EXIT_CRASH_LOOP = 5  # workers kept dying before they became ready
EXIT_RESOURCE = 6  # runtime directory, fd limit or privilege drop failed

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "clean stop",
    EXIT_INTERNAL: "internal error (a bug: please report it)",
    EXIT_USAGE: "invalid option, environment value or combination",
    EXIT_LISTENER: "listener error: bind failed or socket activation fds unusable",
    EXIT_APP: "the application could not be loaded (import, attribute, not ASGI or WSGI)",
    EXIT_CRASH_LOOP: "crash loop: workers kept dying before becoming ready",
    EXIT_RESOURCE: "resource error: runtime dir, fd limit or user/group",
}


class ClusterError(Exception):
    """An error the operator can fix; `str()` is the one-line message."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ClusterError):
    exit_code = EXIT_USAGE


class ListenerError(ClusterError):
    exit_code = EXIT_LISTENER


class AppLoadError(ClusterError):
    exit_code = EXIT_APP


class ResourceError(ClusterError):
    exit_code = EXIT_RESOURCE
