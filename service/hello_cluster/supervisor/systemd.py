"""What the master tells systemd each turn: the watchdog ping, STATUS= when it changed, and
EXTEND_TIMEOUT_USEC= while a drain legitimately takes long (system/notify.py sends them;
outside systemd they cost nothing)."""

from __future__ import annotations

from dataclasses import dataclass

from hello_cluster.system.notify import Notifier

EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC=, each asking for this much more


@dataclass
class Systemd:
    notifier: Notifier
    watchdog_every: float | None  # WATCHDOG_USEC= meant for us (None: no watchdog)
    watchdog_next: float = 0.0
    extend_next: float = 0.0
    last_status: str = ""

    def deadline(self) -> float | None:
        """When the loop must wake for the next watchdog ping."""
        return self.watchdog_next if self.watchdog_every else None

    def tell(self, now: float, status: str | None) -> None:
        """The watchdog ping when due; `status` (None: not one to say) only when it is news,
        so a quiet pool sends no datagram."""
        if self.watchdog_every and now >= self.watchdog_next:
            self.notifier.watchdog()
            self.watchdog_next = now + self.watchdog_every
        if status is not None and status != self.last_status:
            self.last_status = status
            self.notifier.status(status)

    def extend_timeout(self, now: float, end: float) -> None:
        """While draining until `end`, tell systemd not to kill us yet."""
        if now < self.extend_next:
            return
        self.notifier.extend_timeout(max(0.0, end - now) + EXTEND_EVERY)
        self.extend_next = now + EXTEND_EVERY
