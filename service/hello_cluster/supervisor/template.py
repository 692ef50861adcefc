"""`--preload`: a template process imports the app once; workers are forked from it.

A big app imported by every worker costs its memory once per worker. Forked from one
process that imported it, the workers share those pages copy-on-write (with `gc.freeze()`,
so the collector does not dirty them). gunicorn's `--preload` imports in the master, which
puts the app's code, threads and failures in the supervisor and keeps the old code across a
reload. Here the master never imports the app:

- The master forks a *template* per generation of code. It drops privileges, imports the
  app, freezes the collector, says READY (or one ERROR line) on a pipe, then waits for
  requests on a socketpair.
- To spawn, the master sends a request with the new worker's channel pipe and its
  listening sockets (SCM_RIGHTS). The template double-forks: the middle process exits at
  once, so the worker is orphaned to the master, which is a child subreaper
  (PR_SET_CHILD_SUBREAPER). The template answers with the worker's pid, and from there on
  the worker is the master's child like any other: reaped, timed out, steered, recycled.
- A SIGHUP reload starts a new template, so new code loads; its workers replace the old
  ones as usual, and the old template is stopped once the reload completes. If the new
  template cannot import the app, the reload is abandoned and the old one keeps spawning.
- A respawn is a fork of the template: no import at all.

The master waits for a spawn answer at most SPAWN_TIMEOUT: a template that does not answer
is killed and replaced, so a wedged template can delay supervision by that much, once.
What a template's death means is the pure decisions.judge_template_death; `Templates`
applies the part that is its own (the backoff before a new one) and hands the master the
rest (abandon the reload, fail the start).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from hello_cluster.config import Config
from hello_cluster.http import tls
from hello_cluster.supervisor import backoff, decisions
from hello_cluster.supervisor.decisions import TemplateVerdict
from hello_cluster.supervisor.processes import describe_status
from hello_cluster.supervisor.wakeups import HANDLED
from hello_cluster.system import channel as ch
from hello_cluster.system.sockets import Listeners
from hello_cluster.worker import hooks as worker_hooks
from hello_cluster.worker import loader
from hello_cluster.worker import process as worker

log = logging.getLogger("hello_cluster.master")

PR_SET_CHILD_SUBREAPER = 36
SPAWN_TIMEOUT = 2.0
_PID = struct.Struct("!i")


def become_subreaper() -> None:
    """Orphans of our descendants (the template's workers) become our children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


@dataclass
class Template:
    """The master's handle on one template process."""

    pid: int
    generation: int
    fd: int  # its channel: READY or an ERROR line
    sock: socket.socket  # requests out, worker pids back
    started_at: float = 0.0
    ready: bool = False
    error: str | None = None
    buffer: bytes = b""

    def read_channel(self) -> bool:
        """Read what the template said; True when something changed (or it is gone)."""
        try:
            data = os.read(self.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return False
        events, errors, self.buffer = ch.parse(self.buffer + data)
        if errors:
            self.error = errors[0]
        if ch.READY in events:
            self.ready = True
        return bool(events or errors or not data)

    def spawn(self, request: dict[str, Any], fds: Sequence[int]) -> int | None:
        """Ask for a worker; its pid, or None if the template did not answer in time."""
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], list(fds))
            answer = self.sock.recv(_PID.size)
        except OSError:
            return None
        if len(answer) != _PID.size:
            return None
        pid: int = _PID.unpack(answer)[0]
        return pid if pid > 0 else None

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class Templates:
    """The live templates, newest last: at most the current generation and the one a
    reload is replacing."""

    cfg: Config
    master_pid: int
    beats: memoryview[float]
    selector: selectors.BaseSelector
    policy: backoff.Policy = field(default_factory=backoff.Policy)
    live: list[Template] = field(default_factory=list)
    due: float = 0.0  # when a new template may start: a failed one's backoff
    failures: int = 0  # consecutive template failures (judge_template_death counts them)

    def current(self, generation: int) -> Template | None:
        return next((t for t in self.live if t.generation == generation), None)

    def ready(self, generation: int) -> bool:
        """`generation`'s template has imported the app: workers can be forked from it."""
        template = self.current(generation)
        return template is not None and template.ready

    def keep_current(self, generation: int, now: float,
                     close_fds: Callable[[], Sequence[int]]) -> None:
        """Keep a template for `generation` (a reload makes a new one): start it when due,
        kill it when it did not import the app within --startup-timeout."""
        t = self.current(generation)
        if t is not None and not t.ready and t.error is None \
                and now - t.started_at > self.cfg.startup_timeout:
            t.error = (f"the --preload template pid {t.pid} did not import the app within "
                       f"{self.cfg.startup_timeout:g}s (--startup-timeout)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(t.pid, signal.SIGKILL)  # died() says why, once
        if t is None and now >= self.due:
            self.start(generation, close_fds())

    def died(self, t: Template, status: int, now: float, facts: decisions.TemplateDeath
             ) -> tuple[TemplateVerdict, str]:
        """Judge a reaped template's death: a replacement is scheduled here; the verdict
        and why are returned for the master (abandon the reload, fail the start)."""
        why = t.error or f"the --preload template {describe_status(status)} before " \
                         "importing the app"
        judged = decisions.judge_template_death(facts)
        self.failures = judged.failures
        if judged.verdict is TemplateVerdict.REPLACE:
            wait = backoff.delay(self.policy, self.failures, random.random)
            self.due = now + wait
            if t.ready:
                log.warning("template pid %d %s; a new one imports the app in %.3fs", t.pid,
                            describe_status(status), wait)
            else:
                log.warning("template pid %d could not import the app: %s; a new one tries "
                            "in %.3fs", t.pid, why, wait)
        return judged.verdict, why

    def spawn_worker(self, generation: int, slot: int, cell: int | None,
                     listeners: Listeners, dump_dir: str | None, channel_fd: int,
                     cpu: int | None = None) -> tuple[int | None, str]:
        """A worker of `generation` forked by its template (ready: see `ready`): its pid
        and "", or None and why not."""
        template = self.current(generation)
        assert template is not None and template.ready
        neighbours = listeners.neighbours(slot)
        pid = template.spawn({"slot": slot, "generation": generation, "cell": cell,
                              "own_socket": bool(listeners.groups),
                              "neighbours": len(neighbours), "dump_dir": dump_dir,
                              "cpu": cpu},
                             [channel_fd, *(s.fileno() for s in
                                            [*listeners.for_slot(slot), *neighbours])])
        if pid is None:
            self.stop(template)  # a new one starts on the next turn
            return None, f"the --preload template pid {template.pid} did not answer"
        return pid, ""

    def start(self, generation: int, close_fds: Sequence[int]) -> Template:
        """Fork a template for `generation`; READY or ERROR arrives on its channel."""
        read_fd, write_fd = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for t in self.live:  # a template never holds another's ends
            close_fds = [*close_fds, t.fd, t.sock.fileno()]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)  # as for a worker
        try:
            pid = os.fork()
            if pid == 0:
                ours.close()
                os.close(read_fd)
                _run_template(self.cfg, self.master_pid, generation, theirs, write_fd,
                              close_fds, self.beats)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        ours.settimeout(SPAWN_TIMEOUT)
        template = Template(pid, generation, read_fd, ours, started_at=time.monotonic())
        self.live.append(template)
        self.selector.register(read_fd, selectors.EVENT_READ, lambda: self._read(template))
        # At start the app's own lines follow; a failure is said once, by the exit line.
        log.log(logging.INFO if generation else logging.DEBUG,
                "template pid %d: importing the app for generation %d (--preload)", pid,
                generation)
        return template

    def _read(self, template: Template) -> None:
        if template.read_channel():
            with contextlib.suppress(KeyError, ValueError):
                if template.ready or template.error:
                    self.selector.unregister(template.fd)

    def fds(self) -> list[int]:
        """What a forked worker or template must not keep open."""
        return [fd for t in self.live for fd in (t.fd, t.sock.fileno())]

    def reaped(self, pid: int) -> Template | None:
        """The template that had `pid`, now forgotten; None if `pid` was not one."""
        for t in self.live:
            if t.pid == pid:
                self.forget(t)
                return t
        return None

    def forget(self, template: Template) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(template.fd)
        template.close()
        self.live.remove(template)

    def stop(self, template: Template) -> None:
        """A template no longer needed: closing its socket makes it exit."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(template.pid, signal.SIGTERM)
        self.forget(template)

    def stop_others(self, generation: int) -> None:
        """After a reload completes or is abandoned, only `generation`'s template stays."""
        for t in [t for t in self.live if t.generation != generation]:
            log.info("template pid %d (generation %d) stopped: generation %d serves",
                     t.pid, t.generation, generation)
            self.stop(t)

    def stop_all(self) -> None:
        for t in list(self.live):
            self.stop(t)


# ---- the template process ------------------------------------------------------------

def _run_template(cfg: Config, master_pid: int, generation: int, sock: socket.socket,
                  channel_fd: int, close_fds: Sequence[int], beats: memoryview[float]
                  ) -> NoReturn:
    code = 1
    try:
        worker.become_child(master_pid, [], close_fds, "template",
                            title=f"template (generation {generation})")
        channel = ch.WorkerChannel(channel_fd)
        try:
            # The key may be readable by root only: read it before the privilege drop. A
            # reload's new template reads the files again, so it rotates the certificate.
            ssl_context = tls.server_context(cfg) if tls.enabled(cfg) else None
            worker.drop_privileges(cfg.user, cfg.group)
            gc.disable()  # no collection holes in the pages the workers will share
            hooks = worker_hooks.load(cfg.hooks, cfg.app_dir)  # before the app, as in a worker
            loaded = loader.load(cfg.app, cfg.app_dir, cfg.factory, cfg.interface,
                                 cfg.wsgi_threads)
            app = loaded.app  # a WSGI adapter's thread pool starts threads only when used
            log.info("--app %s: %s (template for generation %d)", cfg.app, loaded.why,
                     generation)
            gc.freeze()  # and no refcount-list writes to them from the workers' collectors
        except worker.START_ERRORS as err:
            os._exit(worker.report_start_error(channel, err))
        channel.send(ch.READY)
        _serve_requests(cfg, master_pid, sock, channel_fd, app, beats, ssl_context, hooks)
    except BaseException:
        log.exception("template crashed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve_requests(cfg: Config, master_pid: int, sock: socket.socket, channel_fd: int,
                    app: Any, beats: memoryview[float], ssl_context: Any,
                    hooks: worker_hooks.Hooks | None) -> NoReturn:
    sock.settimeout(None)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 4096, 64)
        except InterruptedError:
            continue
        if not message:  # the master closed our socket: this generation is done
            os._exit(0)
        request = json.loads(message)
        pid = _fork_worker(cfg, master_pid, request, fds, app, beats, ssl_context, hooks,
                           keep_out=[sock.fileno(), channel_fd])
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        sock.send(_PID.pack(pid))


def _fork_worker(cfg: Config, master_pid: int, request: dict[str, Any], fds: list[int],
                 app: Any, beats: memoryview[float], ssl_context: Any,
                 hooks: worker_hooks.Hooks | None, keep_out: list[int]) -> int:
    """Double fork: the middle process exits at once, so the worker becomes the master's."""
    if not fds:
        return -1
    channel_fd, *socket_fds = fds
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        pid = os.fork()
        if pid == 0:
            os.close(w)
            gc.enable()
            socks = [socket.socket(fileno=fd) for fd in socket_fds]
            served = len(socks) - request.get("neighbours", 0)
            spec = worker.WorkerSpec(
                slot=request["slot"], generation=request["generation"], master_pid=master_pid,
                sockets=socks[:served], channel_fd=channel_fd, neighbours=socks[served:],
                close_fds=keep_out, own_socket=request["own_socket"],
                beats=beats if request["cell"] is not None else None,
                beat_cell=request["cell"] or 0, app=app, reparented=True,
                ssl_context=ssl_context, hooks=hooks, dump_dir=request.get("dump_dir"),
                cpu=request.get("cpu"))
            worker.run(cfg, spec)
        os.write(w, _PID.pack(pid))
        os._exit(0)
    os.close(w)
    try:
        answer = os.read(r, _PID.size)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    return _PID.unpack(answer)[0] if len(answer) == _PID.size else -1
