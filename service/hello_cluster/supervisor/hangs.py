"""Killing what does not answer: hung workers, slow starts, drains past their deadline.

A worker beats from its event loop, which turns only once it serves: importing the app and
its lifespan startup come before, so until READY a worker is judged by how long it has been
starting (--startup-timeout), not by its silence (--worker-timeout). A hung worker's stack
is asked for first (faulthandler, answered even from inside a C call; system/stackdump.py)
and logged with the reason in one record, then it gets SIGTERM and, KILL_GRACE later,
SIGKILL. The master's loop goes on meanwhile: the stack is polled every STACK_POLL, for at
most STACK_WAIT.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hello_cluster.config import Config
from hello_cluster.supervisor.pool import Worker
from hello_cluster.system import stackdump
from hello_cluster.system.stackdump import StackRequest

log = logging.getLogger("hello_cluster.master")

KILL_GRACE = 2.0  # a hung worker gets this long after SIGTERM before SIGKILL
# A hung worker's stack is waited for this long before it is killed anyway.
STACK_WAIT = 0.5
STACK_POLL = 0.01


@dataclass
class Hangs:
    cfg: Config
    dump_dir: str | None  # the workers' stack files; None: no stack is asked for
    kill: Callable[[int, int], None]  # the master's process table's kill

    def murder_workers(self, workers: Iterable[Worker], now: float, scanned_at: float
                       ) -> float | None:
        """Kill the hung, the ones not ready within --startup-timeout, and the drainers
        past their deadline; silences are measured at `scanned_at`, the last read of the
        beats. Returns when to look again for a stack still awaited (None: none is)."""
        poll: float | None = None
        for w in workers:
            if w.stack is not None:
                if w.stack.done() or w.stack.expired(now):
                    self.signal_hung(w, now)
                else:
                    poll = now + STACK_POLL
                continue
            if w.kill_at is not None:
                if now >= w.kill_at:
                    log.warning("worker %d pid %d did not stop in time (%s); SIGKILL",
                                w.slot + 1, w.pid, w.retiring or "timeout")
                    self.kill(w.pid, signal.SIGKILL)
                    w.kill_at = now + 3600  # once; reap_workers takes it from here
                continue
            if w.ready_at is None:
                if now - w.spawned_at > self.cfg.startup_timeout:
                    poll = self.kill_hung(w, now, f"not ready after {now - w.spawned_at:.1f}s "
                                          "(--startup-timeout): its app import or lifespan "
                                          "startup is too slow or stuck") or poll
                continue
            silent = scanned_at - w.last_beat
            if silent > self.cfg.worker_timeout:
                poll = self.kill_hung(w, now, f"silent for {silent:.1f}s (--worker-timeout)"
                                      ) or poll
        return poll

    def kill_hung(self, w: Worker, now: float, why: str) -> float | None:
        """Ask for its stack first; the SIGTERM follows once it came, or after STACK_WAIT
        (signal_hung). Returns when to poll for the stack (None: signalled at once)."""
        w.hung, w.hung_why = True, why
        if self.dump_dir is not None:
            try:
                path = stackdump.file_path(self.dump_dir, w.slot, w.pid, "stacks")
                w.stack = StackRequest.send(path, w.pid, STACK_WAIT)
            except OSError as err:
                log.debug("worker %d pid %d: cannot ask for its stack: %s", w.slot + 1, w.pid,
                          err)
        if w.stack is None:
            self.signal_hung(w, now)
            return None
        return now + STACK_POLL

    def signal_hung(self, w: Worker, now: float) -> None:
        """One record: why it is killed, and its stack (every thread, innermost call last;
        under --log-format json the frames are a list in the same object)."""
        asked, w.stack = w.stack, None
        threads = asked.read() if asked is not None else []
        line = f"worker {w.slot + 1} pid {w.pid} {w.hung_why}; killing it"
        fields: dict[str, Any] = {"slot": w.slot + 1, "worker_pid": w.pid}
        if threads:
            fields["threads"] = stackdump.to_json(threads)
            if self.cfg.log_format != "json":
                line += "; its stack, innermost call last:\n" + stackdump.render(threads)
        elif asked is not None:
            line += f" (its stack did not come within {STACK_WAIT:g}s)"
        log.error("%s", line, extra={"fields": fields})
        w.kill_at = now + KILL_GRACE
        self.kill(w.pid, signal.SIGTERM)
