"""sd_notify through `sdnotify`, with the protocol's rules on failure.

`sd_notify(3)`: with no `NOTIFY_SOCKET` we are not under systemd and do nothing; a
notification that cannot be delivered must never stop the service. We log the first
failure once (so a bogus socket is visible) and carry on silently after that.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import sdnotify

log = logging.getLogger("hello_cluster.notify")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not asked."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner.strip() != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    """Sends state changes to systemd; a silent no-op outside it."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        self._failed = False
        self._notifier: sdnotify.SystemdNotifier | None = None
        self.last_status = ""
        if self.address is None:
            return
        try:
            self._notifier = sdnotify.SystemdNotifier(debug=True)
        except Exception as err:  # sdnotify raises whatever connect() raised
            self._fail(err)

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def _fail(self, err: BaseException) -> None:
        if not self._failed:
            log.warning("NOTIFY_SOCKET=%s is unusable (%s); carrying on without systemd "
                        "notifications", self.address, err)
        self._failed = True
        self._notifier = None

    def send(self, *fields: str) -> None:
        if self._notifier is None:
            return
        try:
            self._notifier.notify("\n".join(fields))
        except Exception as err:
            self._fail(err)

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading: replacing workers")

    def stopping(self, status: str = "stopping: draining workers") -> None:
        self.last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
