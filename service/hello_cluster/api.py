"""`hello_cluster.run(app, **options)`: start hello-cluster from Python, as `uvicorn.run()` does.

It is the command line by another door: each keyword is an option's long name with
underscores (`max_requests=1000` is `--max-requests 1000`), turned into the same argv and
parsed by the same parsers, so the API can say nothing the CLI could not, and the
environment and `--config` file apply as they do there (a keyword wins, like a flag).

The app must be a `"module:attr"` string: workers import it after the fork, each in its
own process; an app object built in the caller's process would be shared by every worker
through copy-on-write memory, with whatever connections and threads it already holds.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable
from typing import Any

from hello_cluster.config import OPTIONS, parse_bool

_BY_KEYWORD = {opt.dest: opt for opt in OPTIONS}


class OptionError(TypeError):
    """A keyword that is no option, or a value of the wrong kind: a mistake in the caller."""


def argv_for(app: str, options: dict[str, Any]) -> list[str]:
    """The command line `run` stands for: pure, so it is tested without a process."""
    if not isinstance(app, str):
        raise OptionError(
            f"hello_cluster.run: app must be a 'module:attr' string, not a "
            f"{type(app).__name__} object: each worker imports it after the fork (pass e.g. "
            f"'main:app', or 'main:create_app' with factory=True)")
    argv = ["--app", app]
    for keyword, value in options.items():
        opt = _BY_KEYWORD.get(keyword)
        if opt is None or keyword == "app":
            close = difflib.get_close_matches(keyword, list(_BY_KEYWORD), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise OptionError(f"hello_cluster.run: no option {keyword!r}{hint}")
        if value is None:
            continue  # unset: the environment, the file or the default decide
        if opt.parse is parse_bool:
            if not isinstance(value, bool):
                raise OptionError(f"hello_cluster.run: {keyword} takes True or False, not "
                                  f"{value!r}")
            argv.append(opt.flag if value else f"--no-{opt.name}")
            continue
        if isinstance(value, bool):
            raise OptionError(f"hello_cluster.run: {keyword} takes a value, not {value!r}")
        values: Iterable[Any] = value if opt.repeat and isinstance(value, list | tuple) \
            else [value]
        if not opt.repeat and isinstance(value, list | tuple):
            raise OptionError(f"hello_cluster.run: {keyword} takes one value, not a list")
        for item in values:
            argv += [opt.flag, str(item)]
    return argv


def run(app: str, **options: Any) -> int:
    """Run the master in this process until it stops; return its exit status.

    Mistakes in the keywords raise OptionError (a TypeError) before anything starts; a bad
    value is said in one line on stderr and returned as exit status 2, as the CLI does.
    """
    argv = argv_for(app, options)
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("hello_cluster.run must be called from the main thread: the master "
                           "handles signals (TERM, HUP, TTIN/TTOU), which only it can receive")
    from hello_cluster.cli import main

    return main(argv)
