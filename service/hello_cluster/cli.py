"""`hello-cluster`: parse, open listeners, decide the pool, prepare the runtime dir, supervise.

Every operator mistake ends here as one line on stderr and a documented exit code; only a
bug in hello-cluster shows a traceback.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

import setproctitle

from hello_cluster import logs
from hello_cluster.config import Config, describe, load_config
from hello_cluster.errors import EXIT_INTERNAL, ClusterError, ConfigError, ResourceError
from hello_cluster.http import tls
from hello_cluster.system.cpus import auto_workers
from hello_cluster.system.notify import Notifier
from hello_cluster.system.sockets import open_listeners

log = logging.getLogger("hello_cluster")

FDS_PER_WORKER = 5  # in the master: a listening socket and a channel pipe per worker, and slack


@dataclass
class RuntimeDir:
    path: str
    created: bool  # a private temp dir of ours, removed at exit

    def cleanup(self, metrics_dir: str | None, stacks_dir: str | None = None) -> None:
        for path in (metrics_dir, stacks_dir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)


def prepare_runtime_dir(cfg: Config) -> RuntimeDir:
    """--runtime-dir, else systemd's $RUNTIME_DIRECTORY, else a private temp dir."""
    chosen = cfg.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    if chosen is None:
        try:
            return RuntimeDir(tempfile.mkdtemp(prefix="hello-cluster-"), created=True)
        except OSError as err:
            raise ResourceError(f"cannot create a runtime dir in {tempfile.gettempdir()} "
                                f"({err.strerror}); set --runtime-dir to a writable dir"
                                ) from None
    if not os.path.exists(chosen):
        with suppress(OSError):
            os.mkdir(chosen, 0o700)  # only the last component: a typo'd parent stays an error
    if not os.path.isdir(chosen) or not os.access(chosen, os.W_OK | os.X_OK):
        raise ResourceError(f"--runtime-dir {chosen}: not a writable directory; create it or "
                            "point --runtime-dir (or RUNTIME_DIRECTORY) elsewhere")
    return RuntimeDir(chosen, created=False)


def make_metrics_dir(runtime: RuntimeDir, cfg: Config, name: str = "metrics") -> str:
    """A fresh, private dir for this instance's multiprocess metric files (or, named
    `stacks`, its workers' stack dumps: system/stackdump.py), writable by the workers."""
    path = os.path.join(runtime.path, f"{name}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.mkdir(path, 0o700)
        if os.getuid() == 0 and (cfg.user or cfg.group):
            # Workers that dropped privileges write their metric files here.
            import grp
            import pwd

            uid = pwd.getpwnam(cfg.user).pw_uid if cfg.user else -1
            gid = grp.getgrnam(cfg.group).gr_gid if cfg.group else -1
            os.chown(path, uid, gid)
            if runtime.created:
                os.chown(runtime.path, uid, gid)
    except KeyError as err:
        raise ResourceError(f"--user/--group: no such user or group {err}") from None
    except OSError as err:
        raise ResourceError(f"cannot create {path} ({err.strerror}); make --runtime-dir "
                            "writable") from None
    return path


def make_stacks_dir(runtime: RuntimeDir, cfg: Config) -> str | None:
    """The workers' stack dump files (system/stackdump.py); None, and no dumps, if it cannot
    be made: an unknown --user is the worker's to report, in its own words."""
    try:
        return make_metrics_dir(runtime, cfg, "stacks")
    except ResourceError as err:
        log.debug("no stack dumps: %s", err)
        shutil.rmtree(os.path.join(runtime.path, f"stacks-{os.getpid()}"), ignore_errors=True)
        return None


def check_fd_limit(workers: int) -> None:
    """Raise the soft fd limit to the hard one; refuse a pool the limit cannot hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = 64 + FDS_PER_WORKER * workers
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ResourceError(f"the open-file limit ({soft}) is too low for {workers} workers "
                            f"(needs {needed}); raise LimitNOFILE= / ulimit -n or use fewer "
                            "--workers")


def decide_pool(cfg: Config) -> int:
    if cfg.workers is not None:
        log.info("workers: %d (--workers)", cfg.workers)
        return cfg.workers
    decision = auto_workers()
    log.info("workers: %d (auto: %s)", decision.workers, decision.reason)
    return decision.workers


def run(cfg: Config) -> int:
    for warning in tls.check_in_child(cfg):  # exit 2 on unusable TLS files
        log.warning("%s", warning)
    tls.forget_password_env()
    notifier = Notifier()
    desired = decide_pool(cfg)
    check_fd_limit(desired)
    listeners = open_listeners(cfg.binds, cfg.metrics_bind, os.environ, os.getpid(),
                               slots=desired, reuse_port=cfg.reuse_port,
                               defer_accept=cfg.defer_accept)
    runtime: RuntimeDir | None = None
    metrics_dir: str | None = None
    stacks_dir: str | None = None
    try:
        runtime = prepare_runtime_dir(cfg)
        stacks_dir = make_stacks_dir(runtime, cfg)
        if listeners.metrics is not None:
            metrics_dir = make_metrics_dir(runtime, cfg)
            # prometheus_client picks its value class when first imported: set this first.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from hello_cluster.supervisor.master import run_master
        from hello_cluster.worker.process import preload_builtin_app, preload_engine

        preload_engine()
        preload_builtin_app()

        setproctitle.setproctitle("hello-cluster: master")
        return run_master(cfg, listeners, desired, metrics_dir, notifier, stacks_dir)
    finally:
        listeners.close_app()
        if listeners.metrics is not None:
            with suppress(OSError):
                listeners.metrics.close()
        if runtime is not None:
            runtime.cleanup(metrics_dir, stacks_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["status"]:  # `hello-cluster status`: a client of a running master
        from hello_cluster.observe.status_command import main as status_main

        return status_main(args[1:])
    if args[:1] == ["dump"]:  # `hello-cluster dump`: every live worker's stacks and tasks
        from hello_cluster.observe.dump_command import main as dump_main

        return dump_main(args[1:])
    if args[:1] == ["config"]:  # `hello-cluster config [flags]`: what would run, and why
        try:
            print("\n".join(describe(args[1:])))
        except ConfigError as err:
            print(f"hello-cluster: error: {err}", file=sys.stderr)
            return err.exit_code
        return 0
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        print(f"hello-cluster: error: {err}", file=sys.stderr)
        return err.exit_code
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        return run(cfg)
    except ClusterError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:
        log.exception("internal error: this is a bug in hello-cluster, please report it")
        return EXIT_INTERNAL
