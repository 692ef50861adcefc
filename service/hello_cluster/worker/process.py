"""The child side of fork(): become a worker, serve the app with uvicorn, report to the master.

A worker imports the application itself (so a reload picks up new code and an import error
is reported, not inherited), tells the master when it is really accepting, stamps a
heartbeat from its event loop every tick (beats.py), and never outlives its master.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import importlib
import logging
import os
import pwd
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import setproctitle
import uvicorn

from hello_cluster import logs
from hello_cluster.config import DEFAULT_APP, Config, gc_thresholds
from hello_cluster.errors import (
    EXIT_APP,
    EXIT_RESOURCE,
    EXIT_USAGE,
    AppLoadError,
    ResourceError,
)
from hello_cluster.http import tls
from hello_cluster.http.appcheck import checked_response
from hello_cluster.http.fastproto import FastProtocol
from hello_cluster.http.policy import ACCEPTED, connection_limit
from hello_cluster.http.uvicornproto import WorkerProtocol, expire_slow_heads
from hello_cluster.system import channel as ch
from hello_cluster.system.beats import Beater
from hello_cluster.worker import affinity, gctune, loader
from hello_cluster.worker import hooks as worker_hooks
from hello_cluster.worker.looplag import LoopLag
from hello_cluster.worker.neighbours import Helper
from hello_cluster.worker.stalls import StallWatch
from hello_cluster.worker.taskdump import Dumps

log = logging.getLogger("hello_cluster.worker")

PR_SET_PDEATHSIG = 1
UVICORN_STARTUP_FAILURE = 3  # uvicorn's exit when the app's lifespan startup fails
# A worker's own exit statuses (seen in the master's log, never the master's exit code):
# 0 drained, 1 crashed (or the demo), 2 TLS files unusable, 4 app import failed, 6 resource,
# 70 app startup failed.
EXIT_APP_STARTUP = 70
TICK = 0.1  # uvicorn's main loop period
# With a socket of its own (a SO_REUSEPORT group), a draining worker keeps accepting this
# long: the master has already steered new connections away, but a handshake begun just
# before that completes one round trip later, into this worker's socket.
LISTEN_GRACE = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    slot: int
    generation: int
    master_pid: int
    sockets: Sequence[socket.socket]
    channel_fd: int
    close_fds: Sequence[int]
    own_socket: bool = False  # its slot's socket of a steered SO_REUSEPORT group
    neighbours: Sequence[socket.socket] = ()  # the next slot's sockets (steal.Helper)
    beats: memoryview[float] | None = None  # the master's shared beat table (beats.py), if any
    beat_cell: int = 0  # this worker's cell in it
    app: Any = None  # the app as the --preload template imported it
    reparented: bool = False  # forked by the template, adopted by the master
    ssl_context: Any = None  # the template's TLS context, for a worker it forked
    hooks: worker_hooks.Hooks | None = None  # --hooks as the --preload template imported it
    dump_dir: str | None = None  # where its stack and task dumps go (system/stackdump.py)
    cpu: int | None = None  # the CPU it is pinned to (--cpu-affinity; system/cpus.py)


def preload_engine() -> None:
    """Import the engine in the master, once, before any fork.

    Every worker then starts with uvloop, httptools and uvicorn's protocol and lifespan
    modules already in memory: a respawn costs a fork, not a re-import, and a worker that
    dropped privileges never needs to read the interpreter's files again. Importing spawns
    no thread, so the master stays single-threaded.
    """
    import concurrent.futures.thread  # noqa: F401  (uvloop imports it lazily at loop start)

    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.loops.uvloop  # noqa: F401
    import uvicorn.protocols.websockets.auto  # noqa: F401  (websockets and its metadata)
    import uvloop  # noqa: F401
    from a2wsgi import wsgi  # noqa: F401  (the WSGI adapter: stdlib only, starts no thread)


def preload_builtin_app() -> None:
    """Import hello-cluster's own app in the master, before any fork.

    It is our code, like the engine: a worker that dropped privileges may not be able to read
    the checkout it comes from (a clone in a mode-700 home). A user's app is still imported
    by each worker after the drop, so a reload loads new code and only the app's user reads it.
    """
    importlib.import_module(DEFAULT_APP.partition(":")[0])


# Resolved once in the master: find_library() costs milliseconds a worker should not pay.
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_master(master_pid: int, reparented: bool = False) -> None:
    """The kernel SIGKILLs us when the master dies, so no worker lingers after a crash.

    A worker forked by the --preload template (`reparented`) is first the child of a
    middle process that exits at once; the death signal follows the parent, so it is set
    only once the master (a child subreaper) has become ours.
    """
    if reparented:
        for _ in range(2000):  # the middle process exits right after forking us
            if os.getppid() == master_pid:
                break
            time.sleep(0.001)
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os._exit(1)


def drop_privileges(user: str | None, group: str | None) -> None:
    """Workers never run as root when --user/--group are given (the master bound already)."""
    if user is None and group is None:
        return
    if os.getuid() != 0:
        return
    try:
        uid = pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        raise ResourceError(f"--user {user}: no such user; create it or name another") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else (
            pwd.getpwnam(user).pw_gid if user else None)
    except KeyError:
        raise ResourceError(f"--group {group}: no such group; create it or name another"
                            ) from None
    try:
        if gid is not None:
            os.setgroups([gid])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as err:
        raise ResourceError(f"--user/--group: cannot switch to {user or ''}:{group or ''} "
                            f"({err.strerror}); start as root or drop --user/--group") from None


class WorkerServer(uvicorn.Server):
    """uvicorn's server with the master's protocol: ready, heartbeat, recycle requests."""

    def __init__(self, config: uvicorn.Config, channel: ch.WorkerChannel,
                 beat_ticks: int, max_requests: int, metrics: Any = None,
                 listen_grace: float = 0.0, beater: Beater | None = None,
                 neighbours: Sequence[socket.socket] = (),
                 hooks: worker_hooks.Hooks | None = None,
                 info: worker_hooks.WorkerInfo | None = None, dumps: Dumps | None = None,
                 stall_report_after: float = 0.0,
                 gc_thresholds: tuple[int, int, int] | None = None) -> None:
        super().__init__(config)
        self.gc_thresholds = gc_thresholds
        self.hooks, self.info = hooks, info
        self.dumps = dumps
        self.stall_watch = StallWatch.for_worker(stall_report_after, TICK)
        self.neighbours = neighbours
        self.helper: Helper | None = None
        self.beater = beater
        self.listen_grace = listen_grace
        self.metrics = metrics  # a RequestMetrics to flush each tick, or None
        self.channel = channel
        self.beat_ticks = beat_ticks
        self.max_requests = max_requests
        self.recycle_asked = False
        self.exit_code = 0
        self.loop_lag = LoopLag.for_worker(TICK)  # hello_cluster_event_loop_lag_seconds
        self.pinner: affinity.Pinner | None = None  # --cpu-affinity auto, a threaded WSGI app

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # SIGTERM drains; Ctrl-C reaches the whole process group, but stopping is the
        # master's decision, so workers ignore SIGINT. Nothing is re-raised on the way out.
        signal.signal(signal.SIGTERM, self.handle_exit)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.stall_watch is not None:
            self.stall_watch.stop()  # a drain's waits are not stalls
        if self.helper is not None:
            self.helper.stop()
        if self.listen_grace:
            await asyncio.sleep(self.listen_grace)  # still accepting: see LISTEN_GRACE
        await super().shutdown(sockets)
        if self.metrics is not None:
            self.metrics.flush()  # the last requests count too

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        said = StartupErrors()
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(said)
        try:
            await super().startup(sockets)  # sys.exit(3) when the app's startup failed
        except SystemExit:
            if said.reason:
                self.channel.error(f"the app's lifespan startup failed: {said.reason}")
            raise
        finally:
            uvicorn_log.removeFilter(said)
        said.replay(uvicorn_log)  # errors that did not stop the start are the app's to show
        if self.started and not self.should_exit:
            if self.neighbours:
                own = [s for s in sockets or () if s.family in (socket.AF_INET, socket.AF_INET6)]
                self.helper = Helper(self.neighbours, own, self.protocol_factory(),
                                     self.config.ssl, self.config.backlog)
                self.helper.start()
            if self.hooks is not None and self.info is not None:
                try:
                    self.hooks.call("worker_ready", self.info)
                except AppLoadError as err:  # a start that failed: exit 4, said by the master
                    self.channel.error(str(err))
                    self.exit_code, self.should_exit = EXIT_APP, True
                    return
            gctune.tune(self.gc_thresholds)  # what exists now lives as long as the worker
            if self.dumps is not None:
                self.dumps.serve_tasks(asyncio.get_running_loop())
            if self.stall_watch is not None:
                self.stall_watch.tick(time.monotonic())
                self.stall_watch.start()
            self.channel.send(ch.READY)

    def protocol_factory(self) -> Callable[[], Any]:
        """What uvicorn's startup makes for its listeners (Server.startup's create_protocol)."""
        config, state, app_state = self.config, self.server_state, self.lifespan.state
        loop = asyncio.get_running_loop()
        return lambda: config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=state, app_state=app_state, _loop=loop)

    async def on_tick(self, counter: int) -> bool:
        # time.monotonic, not uvloop's loop.time(): that one is cached per loop turn in ms.
        now = time.monotonic()
        if self.loop_lag is not None:
            self.loop_lag.tick(now)
        if self.stall_watch is not None:
            self.stall_watch.tick(now)
        if self.metrics is not None:
            self.metrics.flush()
        if self.beater is not None:
            self.beater.beat()  # a store into shared memory: no syscall, no wake-up
        elif counter % self.beat_ticks == 0:
            self.channel.send(ch.BEAT)
        if self.pinner is not None:
            self.pinner.tick(now, self.server_state.total_requests, ACCEPTED[0])
        if counter % 10 == 0:
            expire_slow_heads(self.server_state.connections, asyncio.get_running_loop().time())
        if (self.max_requests and not self.recycle_asked
                and self.server_state.total_requests >= self.max_requests):
            self.recycle_asked = True
            log.info("served %d requests (--max-requests); asking to be replaced",
                     self.server_state.total_requests)
            self.channel.send(ch.RECYCLE)
        demo = self.config.app
        if isinstance(demo, DemoExit) and demo.due is not None \
                and asyncio.get_running_loop().time() >= demo.due:
            self.exit_code = 1
            return True
        return await super().on_tick(counter)


class StartupErrors(logging.Filter):
    """Keeps uvicorn's lifespan errors out of every worker's log and hands over the reason.

    Each worker would log the same failure (often a whole traceback); the worker sends one
    line to the master instead, which says it once. With --log-level debug the records pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if text != "Application startup failed. Exiting." and not self.reason:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            self.reason = lines[-1] if lines else text  # a traceback's last line says what
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        self.held.append(record)
        return False

    def replay(self, logger: logging.Logger) -> None:
        """The start went on after all: log what was held back (the filter is off by now)."""
        for record in self.held:
            logger.handle(record)
        self.held.clear()


class DemoExit:
    """The seed experiment: exit with status 1 a while after serving a request.

    Node's demo calls process.exit(1) from a timer, dropping whatever that worker had just
    accepted. Here the worker drains like any stopping worker (listeners closed, in-flight
    requests finished) and then exits 1, so the experiment shows respawning without
    losing requests.
    """

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.due: float | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and self.due is None:
            log.info("demo: exiting with status 1 in %gs", self.seconds)
            self.due = asyncio.get_running_loop().time() + self.seconds


def build_app(cfg: Config, first: bool = True,
              preloaded: Any = None) -> tuple[Any, Any, bool]:
    """The app as served (with metrics and demo wrappers) and its RequestMetrics, if any.

    `preloaded`: the app as the --preload template loaded (and logged) it. With `--http
    fast` the protocol counts requests itself (fastproto.py), so the metrics object is made
    but does not wrap the app.
    """
    if preloaded is None:
        loaded = loader.load(cfg.app, cfg.app_dir, cfg.factory, cfg.interface,
                             cfg.wsgi_threads)
        log.log(logging.INFO if first else logging.DEBUG, "--app %s: %s%s", cfg.app,
                loaded.why, f", {cfg.wsgi_threads} threads per worker"
                if loaded.interface == loader.WSGI else "")
        preloaded = loaded.app
    app = preloaded
    wsgi = sys.modules.get("hello_cluster.http.wsgi")  # loaded only for a WSGI app
    threaded = cfg.wsgi_dispatch == "threads" and wsgi is not None \
        and isinstance(app, wsgi.WSGIMiddleware)  # a thread hand-off per request
    if cfg.wsgi_dispatch == "loop":  # imported only then: an ASGI worker never loads a2wsgi
        from hello_cluster.http.wsgi import WSGIMiddleware

        if isinstance(app, WSGIMiddleware):
            app.on_loop = True
    if cfg.request_timeout:  # innermost: the metrics and the access log see its 504
        from hello_cluster.http.deadline import RequestTimeout

        app = RequestTimeout(app, cfg.request_timeout)
    metrics = None
    if cfg.request_metrics and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from hello_cluster.observe.metrics import RequestMetrics

        metrics = RequestMetrics(app)
        if cfg.http != "fast":
            app = metrics
    if cfg.demo_exit_after is not None:
        app = DemoExit(app, cfg.demo_exit_after)
    return app, metrics, threaded


def serve(cfg: Config, spec: WorkerSpec, channel: ch.WorkerChannel,
          ssl_context: ssl.SSLContext | None = None, dumps: Dumps | None = None) -> int:
    # --hooks: imported here (or by the --preload template), post_fork before the app import.
    hooks = spec.hooks if spec.reparented else worker_hooks.load(cfg.hooks, cfg.app_dir)
    info = worker_hooks.WorkerInfo(spec.slot, os.getpid(), spec.generation, cfg.app,
                                   cfg.app_dir, spec.reparented)
    if hooks is not None:
        hooks.call("post_fork", info)
    app, metrics, threaded = build_app(cfg, first=spec.slot == 0 and spec.generation == 0,
                                       preloaded=spec.app)
    access_log = None
    if cfg.access_log:  # off: not wrapped at all, nothing on the request path
        from hello_cluster.http.accesslog import AccessLog

        app = access_log = AccessLog(app, spec.slot + 1)
    max_requests = 0
    if cfg.max_requests:
        max_requests = cfg.max_requests + (
            int.from_bytes(os.urandom(4), "big") % (cfg.max_requests_jitter + 1))
    if cfg.http == "uvicorn":
        app = checked_response(app)
    if cfg.forwarded_allow_ips:  # outermost, where uvicorn puts its own: the access log
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        from hello_cluster.http.forwarded import Forwarded

        app = Forwarded(ProxyHeadersMiddleware(app, list(cfg.forwarded_allow_ips)),
                        cfg.forwarded_allow_ips)  # and the app see the client they name
    http: Any = FastProtocol.with_metrics(metrics) if cfg.http == "fast" else WorkerProtocol
    if cfg.proxy_protocol != "off":
        from hello_cluster.http.proxyproto import behind_proxies

        http = behind_proxies(http, cfg.proxy_protocol, cfg.forwarded_allow_ips)
    uv_config = uvicorn.Config(
        app,
        loop="hello_cluster.http.tls:new_event_loop",  # uvloop, TLS handshakes bounded
        http=http,
        lifespan="auto",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, int(cfg.graceful_timeout)),
        timeout_keep_alive=max(1, int(cfg.keep_alive_timeout)),
        limit_concurrency=connection_limit(cfg.limit_concurrency),
        root_path=cfg.root_path,  # both protocols put it in front of scope["path"]
        # Off unless asked: trusting a proxy is a deployment decision (uvicorn trusts
        # 127.0.0.1 by default), and the middleware costs 0.65 us on every request
        # (bench/micro_metrics.py). When asked, it is wrapped above, with Forwarded.
        proxy_headers=False,
        # Built in run() before privileges are dropped (tls.py); uvicorn serves it as is.
        ssl_context_factory=(lambda _config, _default: ssl_context) if ssl_context else None,
    )
    # Beats are stamped into the master's shared table every tick (beats.py). Only a worker
    # that got no cell (the table full) beats down its pipe: every tick with a socket of
    # its own, as the master takes a worker whose loop stalls out of the steering within
    # STALL (master.py), else often enough for --worker-timeout.
    beat_ticks = 1 if spec.own_socket else max(1, int(min(1.0, cfg.worker_timeout / 4) / TICK))
    beater = Beater(spec.beats, spec.beat_cell) if spec.beats is not None else None
    server = WorkerServer(uv_config, channel, beat_ticks, max_requests, metrics,
                          LISTEN_GRACE if spec.own_socket else 0.0, beater, spec.neighbours,
                          hooks, info, dumps, cfg.stall_report_after,
                          gc_thresholds(cfg.gc))
    if cfg.cpu_affinity == "auto" and spec.cpu is not None and threaded:
        server.pinner = affinity.Pinner.start(spec.cpu)
    server.run(sockets=list(spec.sockets))
    if access_log is not None:
        access_log.flush()  # the lines of the last tenth of a second
    if hooks is not None and server.started:
        hooks.exit(info)  # after the drain, before the exit
    return server.exit_code if server.started else EXIT_APP_STARTUP


def become_child(master_pid: int, unblock: Iterable[int], close_fds: Iterable[int],
                 role: str, reparented: bool = False, title: str | None = None) -> None:
    """The first steps of any child the master forks (a worker, a --preload template):
    default signal handling, Ctrl-C left to the master, signals unblocked only now that
    nothing can reach the master's wakeup pipe, death with the master, none of its fds."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, unblock)
    die_with_master(master_pid, reparented)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    logs.ROLE["name"] = role
    setproctitle.setproctitle(f"hello-cluster: {title or role}")


# Start-up failures the operator can fix: said to the master in one line, not a traceback.
START_ERRORS = (tls.TlsError, AppLoadError, ResourceError)


def report_start_error(channel: ch.WorkerChannel, err: Exception) -> int:
    """Tell the master why we cannot start; the exit status that goes with it."""
    channel.error(str(err))
    if isinstance(err, tls.TlsError):
        return EXIT_USAGE
    return EXIT_APP if isinstance(err, AppLoadError) else EXIT_RESOURCE


def run(cfg: Config, spec: WorkerSpec, unblock: Iterable[int] = ()) -> NoReturn:
    """Entry point in the forked child; never returns into the master's code.

    The master forked with its signals blocked; they stay blocked until our own handlers
    are in place, so nothing meant for this worker can reach the master's wakeup pipe.
    """
    code = 1
    try:
        become_child(spec.master_pid, unblock, spec.close_fds, f"worker {spec.slot + 1}",
                     reparented=spec.reparented)
        channel = ch.WorkerChannel(spec.channel_fd)
        if spec.cpu is not None and cfg.cpu_affinity == "always":  # first: every thread
            # started from here on inherits it (`auto` decides later: worker/affinity.py)
            refused = affinity.set_all_threads({spec.cpu})
            if refused is not None:
                log.warning("%s; running unpinned", refused)
        try:
            # The key is read before dropping privileges: it may stay readable by root only.
            # (A worker forked by the --preload template gets the template's context: the
            # template read the key before it dropped privileges.)
            ssl_context = spec.ssl_context if spec.reparented else (
                tls.server_context(cfg) if tls.enabled(cfg) else None)
            drop_privileges(cfg.user, cfg.group)
            # Before the app is imported: a worker stuck importing it answers a dump too.
            dumps = Dumps.start(spec.dump_dir, spec.slot)
            code = serve(cfg, spec, channel, ssl_context, dumps)
        except START_ERRORS as err:
            code = report_start_error(channel, err)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
            if code == UVICORN_STARTUP_FAILURE:
                code = EXIT_APP_STARTUP
    except BaseException:
        log.exception("worker crashed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
