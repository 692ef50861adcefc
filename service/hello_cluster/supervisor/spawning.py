"""What a worker is given at birth and what is cleared after its death.

A worker gets a pipe to the master (its news: READY, RECYCLE, why it cannot start), a cell
in the beat table, its listening sockets and the fds it must close, then is forked: by the
master through its process table, or by the --preload template (template.py). After its
death its cell is freed and its stack files and metric files are cleared. The master
(master.py) decides when; this module only does it.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from hello_cluster.config import Config
from hello_cluster.observe.metrics import worker_gone
from hello_cluster.supervisor.pool import Worker
from hello_cluster.supervisor.processes import ProcessTable
from hello_cluster.supervisor.template import Templates
from hello_cluster.supervisor.wakeups import HANDLED
from hello_cluster.system import stackdump
from hello_cluster.system.beats import BeatTable
from hello_cluster.system.sockets import Listeners
from hello_cluster.worker import process as worker

log = logging.getLogger("hello_cluster.master")


@dataclass(frozen=True)
class Born:
    pid: int
    fd: int  # the master's end of its pipe, non-blocking
    cell: int | None  # its beat cell (None: the table is full, it beats by pipe)


@dataclass
class Spawner:
    cfg: Config
    listeners: Listeners
    beats: BeatTable
    procs: ProcessTable
    master_pid: int
    dump_dir: str | None
    multiproc_dir: str | None
    own_fds: Callable[[], list[int]]  # the master's fds, closed in every child
    templates: Templates | None = None  # --preload: workers are forked by the template

    def spawn(self, slot: int, generation: int, now: float,
              cpu: int | None = None) -> Born | str | None:
        """A new worker in `slot`, or why none could be forked; None while the --preload
        template of `generation` is still importing the app."""
        if self.templates is not None and not self.templates.ready(generation):
            return None
        self.listeners.grow(slot + 1)  # a slot added by SIGTTIN needs its own socket
        read_fd, write_fd = os.pipe()
        cell = self.beats.allocate(now)
        if self.templates is not None:
            pid, error = self.templates.spawn_worker(generation, slot, cell, self.listeners,
                                                     self.dump_dir, write_fd, cpu)
        else:
            pid, error = self.fork(slot, generation, read_fd, write_fd, cell, cpu)
        os.close(write_fd)
        if pid is None:
            os.close(read_fd)
            self.beats.release(cell)
            return error
        os.set_blocking(read_fd, False)
        return Born(pid, read_fd, cell)

    def fork(self, slot: int, generation: int, read_fd: int, write_fd: int,
             cell: int | None, cpu: int | None = None) -> tuple[int | None, str]:
        close_fds = [read_fd, *self.own_fds(), *self.listeners.not_for_slot(slot)]
        spec = worker.WorkerSpec(slot=slot, generation=generation, master_pid=self.master_pid,
                                 sockets=self.listeners.for_slot(slot), channel_fd=write_fd,
                                 close_fds=close_fds, own_socket=bool(self.listeners.groups),
                                 neighbours=self.listeners.neighbours(slot),
                                 beats=self.beats.view if cell is not None else None,
                                 beat_cell=cell or 0, dump_dir=self.dump_dir, cpu=cpu)
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Block our signals across fork(): a signal landing in the child before it has reset
        # its handlers would be written into our wakeup pipe and read as ours. The child
        # resets the handlers, then unblocks; whatever was pending reaches the new handlers.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            return self.procs.fork_worker(self.cfg, spec, blocked), ""
        except OSError as err:
            return None, f"fork failed: {err.strerror}"
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def helpers_close(self) -> list[int]:
        """What a template or the --reload watcher closes: ours, and every listening socket."""
        return [*self.own_fds(), *self.listeners.not_for_slot(-1),
                *(s.fileno() for s in self.listeners.app)]

    def release(self, w: Worker) -> None:
        """A reaped worker's cell, stack files and metric files (its pipe is the master's)."""
        if self.dump_dir is not None:
            stackdump.remove_files(self.dump_dir, w.slot, w.pid)
        self.beats.release(w.cell)  # nobody writes it any more: free for the next worker
        if self.multiproc_dir is not None:
            try:
                worker_gone(self.multiproc_dir, w.pid)
            except Exception as err:  # bookkeeping must never take supervision down
                log.warning("could not archive the metric files of pid %d: %s", w.pid, err)
