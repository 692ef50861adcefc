"""The supervision loop: spawn, ready, serving, draining, dead, backing off, respawned.

One thread, one selector. Signal handlers only wake the loop (`signal.set_wakeup_fd` writes
the signal number into a pipe the selector watches); every decision is taken in the loop,
in the order the verbs below read, one `turn` after each wake-up:

    wait_for_events -> handle_signals -> reap_workers -> read_beats -> murder_workers
        -> recycle_workers -> manage_workers -> tell_systemd

This file gathers facts and applies verdicts; the decisions and the rest live beside it:
what a death, a template's death or a failed reload means (`decisions`), the delay
(`backoff`), which worker to recycle (`recycling`), the pool's state and what others see of
it (`pool`), forking and clearing up after a worker (`spawning`), hang kills and stacks
(`hangs`), the signal pipe (`wakeups`), the metrics port (`answers`), sd_notify
(`systemd`), --preload (`template`), --reload (`reloader`). Processes and the clock are
reached through a `processes.ProcessTable`, so tests/test_master.py drives this loop over a
fake one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import selectors
import signal
import sys
from dataclasses import InitVar, dataclass, field

from hello_cluster.config import MAX_WORKERS, Config
from hello_cluster.errors import EXIT_APP, EXIT_CRASH_LOOP, EXIT_OK
from hello_cluster.observe.endpoint import Endpoint
from hello_cluster.observe.metrics import PoolStats
from hello_cluster.observe.status_page import PoolSnapshot
from hello_cluster.supervisor import backoff, decisions
from hello_cluster.supervisor.answers import open_endpoint
from hello_cluster.supervisor.decisions import TemplateVerdict, Verdict
from hello_cluster.supervisor.hangs import KILL_GRACE, Hangs
from hello_cluster.supervisor.oom import OomWatch
from hello_cluster.supervisor.pool import Pool, Slot, State, Worker
from hello_cluster.supervisor.processes import Os, ProcessTable, describe_status
from hello_cluster.supervisor.recycling import Recycler
from hello_cluster.supervisor.reloader import Watcher
from hello_cluster.supervisor.spawning import Spawner
from hello_cluster.supervisor.systemd import Systemd
from hello_cluster.supervisor.template import Template, Templates, become_subreaper
from hello_cluster.supervisor.wakeups import HANDLED, Wakeups
from hello_cluster.system import channel as ch
from hello_cluster.system.beats import SCAN, BeatTable
from hello_cluster.system.cpus import PinPlan, cgroup_cpu_limit, plan_pinning
from hello_cluster.system.notify import Notifier, watchdog_interval
from hello_cluster.system.sockets import Listeners

log = logging.getLogger("hello_cluster.master")

MAX_TIMEOUT = 1.0  # the loop turns at least this often (watchdog, status, deadlines)
# A steered worker silent this long (three of its 0.1 s beats) gets no new connections
# until it beats again: its event loop is blocked, so it could not accept them.
STALL = 0.3


@dataclass
class Master:
    cfg: Config
    listeners: Listeners
    desired: InitVar[int]
    notifier: Notifier = field(default_factory=Notifier)
    multiproc_dir: str | None = None
    policy: backoff.Policy = field(default_factory=backoff.Policy)
    dump_dir: str | None = None  # the workers' stack files (system/stackdump.py)
    procs: ProcessTable = field(default_factory=Os)  # fork, kill, reap, clock (a fake in tests)

    def __post_init__(self, desired: int) -> None:
        self.pid = os.getpid()
        self.started_at = self.procs.monotonic()  # /status uptime
        self.pool = Pool(desired)
        self.selector = selectors.DefaultSelector()
        self.breaker = backoff.Breaker(self.policy.crash_loop_limit)
        self.exit_code: int | None = None
        self.reload_pending = False
        self.drain_at: float | None = None
        self.drain_deadline: float | None = None
        self.stop_reason = ""
        self.oom = OomWatch()
        self.systemd = Systemd(self.notifier, watchdog_interval(os.environ, self.pid))
        self.endpoint: Endpoint | None = None
        # Room for a full pool of MAX_WORKERS twice over (a reload) and as many draining.
        self.beats = BeatTable(4 * MAX_WORKERS)
        self.next_scan = 0.0
        self.scanned_at = 0.0  # when the beats were last read: silences are measured here
        self.next_respawn: float | None = 0.0  # the earliest respawn due: at start, now
        self.recycler = Recycler(self.cfg.max_worker_memory, self.cfg.max_worker_lifetime or 0.0)
        self.hangs = Hangs(self.cfg, self.dump_dir, self.procs.kill)
        self.spawner = Spawner(self.cfg, self.listeners, self.beats, self.procs, self.pid,
                               self.dump_dir, self.multiproc_dir, self.fds_not_for_children)
        self.templates: Templates | None = None  # --preload
        self.said_error: str | None = None  # the last worker error logged (said once)
        self.watcher = Watcher(self.cfg, self.pid) if self.cfg.reload else None  # --reload
        self.stack_poll: float | None = None  # while a hung worker's stack is awaited
        self.wakeups = Wakeups(self.selector)
        # The CPUs and quota as they are at start (what --workers auto counted too): the
        # pinning plan is worked out from them and the pool size at each spawn.
        self.usable_cpus = tuple(sorted(os.sched_getaffinity(0)))
        self.cpu_quota = cgroup_cpu_limit() if self.cfg.cpu_affinity != "none" else None
        self.pin_reason = ""

    # ---- life of the master -------------------------------------------------------------

    def run(self) -> int:
        self.wakeups.install()
        self.begin()
        while True:
            self.wait_for_events()
            if not self.turn():
                break
        self.shutdown()
        assert self.exit_code is not None
        return self.exit_code

    def begin(self) -> None:
        if self.cfg.preload:
            become_subreaper()
            self.templates = Templates(self.cfg, self.pid, self.beats.view, self.selector,
                                       self.policy)
            self.spawner.templates = self.templates
        if self.listeners.metrics is not None:
            self.endpoint = open_endpoint(self.listeners.metrics, self.selector,
                                          self.pool_stats, self.multiproc_dir, self.snapshot,
                                          self.readiness, self.procs.monotonic)
        log.info("master ready to fork %d workers on %s%s", self.pool.desired,
                 self.listeners.describe(),
                 " (socket activation)" if self.listeners.activated else "")
        self.notifier.status(f"starting {self.pool.desired} workers")

    def turn(self) -> bool:
        """One turn of the loop, after a wake-up; False once stopped with every worker reaped."""
        self.handle_signals()
        self.reap_workers()
        if self.exit_code is not None and not self.pool.workers:
            return False
        self.read_beats()
        self.murder_workers()
        self.recycle_workers()
        self.manage_workers()
        self.tell_systemd()
        return True

    def wait_for_events(self) -> None:
        now = self.procs.monotonic()
        timeout = max(0.0, min(self.deadlines(), default=now + MAX_TIMEOUT) - now)
        self.dispatch(min(timeout, MAX_TIMEOUT))

    def dispatch(self, timeout: float) -> None:
        """Wait up to `timeout` for the selector, then run what woke it."""
        for key, _ in self.selector.select(timeout):
            key.data()
        self.pool.stats.wakeups += 1
        if self.endpoint is not None:
            self.endpoint.expire(self.procs.monotonic())

    def deadlines(self) -> list[float]:
        """The few times the loop must wake at, none of them per worker.

        Hangs, stalls and overdue drains are all found by the beat scan, so a pool of any
        size adds one timer (`next_scan`), not one per worker: the master wakes about
        1/SCAN times a second when nothing happens.
        """
        times = [t for t in (self.next_respawn, self.drain_at, self.drain_deadline,
                             self.stack_poll, self.systemd.deadline(),
                             self.endpoint.next_deadline() if self.endpoint else None)
                 if t is not None]
        if self.pool.workers:
            times.append(self.next_scan)
        return times

    def shutdown(self) -> None:
        self.wakeups.uninstall()
        if self.endpoint is not None:
            self.endpoint.close()
        self.listeners.close_app()
        if self.watcher is not None:
            self.watcher.close()
        log.log(logging.INFO if self.exit_code == EXIT_OK else logging.ERROR,
                "master exiting with code %d%s", self.exit_code,
                f" ({self.stop_reason})" if self.stop_reason else "")

    # ---- signals ------------------------------------------------------------------------

    def handle_signals(self) -> None:
        for sig in self.wakeups.take():  # a burst of the same signal is one request
            if sig in (signal.SIGTTIN, signal.SIGTTOU):
                self.scale(+1 if sig == signal.SIGTTIN else -1)
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop(EXIT_OK, f"{signal.Signals(sig).name} received")
            elif sig == signal.SIGQUIT:
                self.stop_now()
            elif sig == signal.SIGHUP:
                self.reload()

    def begin_stop(self, code: int, reason: str) -> None:
        """Graceful stop: /readyz goes 503, serve through --shutdown-delay, then drain."""
        if self.exit_code is not None:
            return
        self.exit_code, self.stop_reason, self.pool.state = code, reason, State.STOPPING
        now = self.procs.monotonic()
        self.drain_at = now + (self.cfg.shutdown_delay if code == EXIT_OK else 0.0)
        log.log(self.quiet, "stopping (%s): serving %.1fs more, then draining for up to %.1fs",
                reason, self.drain_at - now, self.cfg.graceful_timeout)
        self.notifier.stopping(f"stopping: {reason}")
        self.extend_systemd_timeout(now)

    def stop_now(self) -> None:
        log.warning("SIGQUIT: stopping immediately")
        if self.exit_code is None:
            self.exit_code, self.stop_reason = EXIT_OK, "SIGQUIT"
            self.pool.state = State.STOPPING
            self.notifier.stopping("stopping immediately")
        self.listeners.close_app()
        if self.templates is not None:
            self.templates.stop_all()
        for w in self.pool.workers.values():
            w.retiring = w.retiring or "shutdown"
            self.procs.kill(w.pid, signal.SIGKILL)
        self.drain_at = None

    def start_drain(self, now: float) -> None:
        """Close our copy of the listeners, then ask every worker to finish and exit."""
        self.drain_at = None
        self.drain_deadline = now + self.cfg.graceful_timeout + KILL_GRACE
        self.listeners.close_app()
        if self.templates is not None:
            self.templates.stop_all()
        self.retire([(w, "shutdown") for w in self.pool.workers.values()], now)

    def reload(self) -> None:
        pool = self.pool
        if pool.state == State.STOPPING:
            return
        if pool.state == State.RELOADING:
            self.reload_pending = True
            return
        pool.generation += 1
        pool.stats.reloads += 1
        pool.state = State.RELOADING
        log.info("reload: rolling replacement of %d workers (generation %d)", pool.desired,
                 pool.generation)
        self.notifier.reloading()

    def scale(self, step: int) -> None:
        pool = self.pool
        if pool.state == State.STOPPING:
            return
        new = min(MAX_WORKERS, max(1, pool.desired + step))
        if new == pool.desired:
            log.info("scale: staying at %d workers (limits 1..%d)", new, MAX_WORKERS)
            return
        log.info("scale: %d -> %d workers", pool.desired, new)
        pool.desired = pool.stats.desired = new
        while len(pool.slots) < new:
            pool.slots.append(Slot())
        self.retire([(w, "scale-down") for w in pool.workers.values() if w.slot >= new],
                    self.procs.monotonic())
        del pool.slots[new:]

    # ---- the life of workers ------------------------------------------------------------

    def pinning(self) -> PinPlan:
        """Which CPU each slot gets at today's pool size; logged when the answer changes."""
        plan = plan_pinning(self.cfg.cpu_affinity, self.usable_cpus, self.pool.desired,
                            self.cpu_quota)
        if plan.reason != self.pin_reason:
            self.pin_reason = plan.reason
            if not plan.cpus:
                what = "none"
            elif self.cfg.cpu_affinity == "always":
                what = "every worker pinned"
            else:
                what = "a threaded WSGI worker pins itself while its traffic is keep-alive"
            # Said at info only when asked for: under `auto` each worker says when it pins.
            log.log(logging.INFO if self.cfg.cpu_affinity == "always" else logging.DEBUG,
                    "cpu affinity: %s (%s)", what, plan.reason)
        return plan

    def spawn_worker(self, slot: int, now: float) -> None:
        generation = self.pool.generation
        cpu = self.pinning().cpu_for(slot)
        born = self.spawner.spawn(slot, generation, now, cpu)
        if born is None:
            return  # the --preload template is still importing the app; its READY wakes us
        if isinstance(born, str):
            self.pool.slots[slot].failures += 1
            self.schedule_respawn(slot, now, born)
            return
        w = Worker(pid=born.pid, slot=slot, generation=generation, fd=born.fd, spawned_at=now,
                   last_beat=now, cell=born.cell)
        self.pool.workers[w.pid] = w
        self.selector.register(w.fd, selectors.EVENT_READ, lambda: self.read_channel(w))
        self.pool.stats.spawns += 1
        log.debug("spawned worker %d pid %d (generation %d)", slot + 1, w.pid, generation)

    def fds_not_for_children(self) -> list[int]:
        """The master's own fds, which a forked worker, template or watcher closes at once."""
        fds = [*self.wakeups.fds(), self.selector.fileno(),
               *(w.fd for w in self.pool.workers.values())]
        if self.endpoint is not None:
            fds.append(self.endpoint.sock.fileno())
            fds.extend(self.endpoint.conns)
        if self.templates is not None:
            fds.extend(self.templates.fds())
        return fds

    def read_beats(self) -> None:
        """Every SCAN: take each worker's last stamp from the shared table, O(workers)."""
        now = self.procs.monotonic()
        if now >= self.next_scan:
            self.next_scan, self.scanned_at = now + SCAN, now
            self.pool.take_beats(self.beats)

    def read_channel(self, w: Worker) -> None:
        try:
            data = os.read(w.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # EOF: the worker is gone; reap_workers will tell how
            self.selector.unregister(w.fd)
            return
        events, errors, w.buffer = ch.parse(w.buffer + data)
        now = self.procs.monotonic()
        if events or errors:
            w.last_beat = now
        for text in errors:
            w.error = text  # said (once) by worker_died, which knows what it leads to
        for event in events:
            if event == ch.READY and w.ready_at is None:
                self.worker_ready(w, now)
            elif event == ch.RECYCLE and w.recycle is None and w.retiring is None:
                self.begin_recycle(w, "max-requests", "served --max-requests")

    def worker_ready(self, w: Worker, now: float) -> None:
        w.ready_at = now
        self.pool.ever_ready = True
        self.breaker = self.breaker.worker_ready()
        log.info("worker %d pid %d ready in %.0f ms", w.slot + 1, w.pid,
                 (now - w.spawned_at) * 1000)

    def recycle_workers(self) -> None:
        """--max-worker-memory and --max-worker-lifetime: one planned replacement at a time,
        chosen by the recycling policy; manage_workers forks the replacement."""
        pool = self.pool
        if not self.recycler.enabled or pool.state != State.RUNNING:
            return
        serving, in_flight = [], False
        for w in pool.workers.values():
            if w.recycle in ("memory", "lifetime"):
                in_flight = True
            elif w.recycle is None and w.serving:
                serving.append(w)
        decision = self.recycler.due(serving, self.procs.monotonic(), pool.desired, in_flight)
        if decision is not None:
            chosen = pool.workers[decision.worker.pid]
            self.begin_recycle(chosen, decision.reason, decision.detail)

    def begin_recycle(self, w: Worker, reason: str, detail: str) -> None:
        """A planned replacement: counted now, the worker drains once its successor is ready."""
        w.recycle = reason
        self.recycler.forget(w.pid)
        self.pool.stats.recycles[reason.replace("-", "_")] += 1
        log.info("worker %d pid %d: recycling (%s); its replacement starts first",
                 w.slot + 1, w.pid, detail)

    def retire(self, batch: list[tuple[Worker, str]], now: float) -> None:
        """Planned ends: steered away from, then SIGTERM (drain), SIGKILL after the
        graceful timeout. One steer for the whole batch, so a reload of N is O(N)."""
        leaving = [(w, why) for w, why in batch if w.retiring is None]
        if not leaving:
            return
        for w, why in leaving:
            w.retiring = why
            w.kill_at = now + self.cfg.graceful_timeout + KILL_GRACE
            log.log(self.quiet, "worker %d pid %d: draining (%s)", w.slot + 1, w.pid, why)
        self.steer()  # no new connection for them from here on
        for w, _ in leaving:
            self.procs.kill(w.pid, signal.SIGTERM)

    def reap_workers(self) -> None:
        while (reaped := self.procs.reap()) is not None:
            pid, status, usage = reaped
            now = self.procs.monotonic()
            w = self.pool.workers.pop(pid, None)
            if w is None and self.watcher is not None and self.watcher.reaped(pid, status, now):
                continue
            t = self.templates.reaped(pid) if w is None and self.templates else None
            if t is not None:
                self.template_died(t, status, now)
            elif w is None:
                # As PID 1 we inherit orphans; reaping them is the whole job.
                log.debug("reaped orphan pid %d (status %#x)", pid, status)
            else:
                self.pool.slot_cpu.worker_reaped(w.slot, usage)
                self.worker_died(w, status, now)

    def worker_died(self, w: Worker, status: int, now: float) -> None:
        # Its last words (the line saying why it cannot start) may still be in the pipe if
        # it wrote them and exited after this turn's select: read them before judging.
        if w.fd in self.selector.get_map():  # not yet at EOF
            self.read_channel(w)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(w.fd)
        os.close(w.fd)
        self.recycler.forget(w.pid)
        self.spawner.release(w)
        judged = decisions.judge_death(self.pool.death(w, status, now, self.exit_code is not None),
                                       self.breaker, self.policy)
        self.apply_death(w, judged, status, now)

    def apply_death(self, w: Worker, judged: decisions.Judgement, status: int, now: float
                    ) -> None:
        """The effects of a verdict (decisions.judge_death): the log line, and what follows."""
        verdict, how, lifetime = judged.verdict, describe_status(status), now - w.spawned_at
        if verdict is Verdict.PLANNED:
            log.log(self.quiet, "worker %d pid %d ended (%s, %s) after %.1fs", w.slot + 1,
                    w.pid, w.retiring, how, lifetime)
            return
        reason = decisions.death_reason(w.hung, status, self.oom.rose)
        if verdict is Verdict.NOT_RESPAWNED:
            log.log(logging.DEBUG if self.quiet == logging.DEBUG else logging.WARNING,
                    "worker %d died: pid %d %s, %s, lived %.1fs; not respawned (stopping or "
                    "scaled down)", w.slot + 1, w.pid, reason, how, lifetime)
            return
        if verdict is Verdict.STOP_START:
            # Every worker would fail the same way: stop the start, say why once (exit line).
            self.begin_stop(os.WEXITSTATUS(status), w.error or how)
            return
        if verdict is Verdict.ABORT_RELOAD:
            self.abort_reload(f"new worker pid {w.pid} died before becoming ready"
                              + (f": {w.error}" if w.error else ""), w.error)
            return
        self.say_error(w)
        self.breaker = judged.breaker
        slot = self.pool.slots[w.slot]
        slot.failures = judged.failures
        self.pool.stats.restarts[reason] += 1
        slot.restarts += 1
        if verdict is Verdict.CRASH_LOOP:
            log.error(f"crash loop: {self.breaker.boot_deaths} workers in a row died before "
                      f"becoming ready; the last (pid {w.pid}) {how}"
                      + (f": {w.error}" if w.error else "") + "; giving up")
            self.pool.stats.crash_loop = True
            self.begin_stop(EXIT_CRASH_LOOP, "crash loop")
        elif verdict is Verdict.REPLACEMENT_RUNNING:
            # A replacement is already running (recycling or reload): nothing to schedule.
            log.warning("worker %d died: pid %d %s, %s, lived %.1fs; its replacement is "
                        "already starting", w.slot + 1, w.pid, reason, how, lifetime)
        else:
            self.schedule_respawn(w.slot, now,
                                  f"pid {w.pid} {reason}, {how}, lived {lifetime:.1f}s")

    @property
    def quiet(self) -> int:
        """The level of routine stop lines: DEBUG while a failed start stops, the exit line
        then being the one that says why."""
        return logging.DEBUG if self.exit_code not in (None, EXIT_OK) else logging.INFO

    def say_error(self, w: Worker) -> None:
        """A worker's start-up error, said once: the same line again is only a debug line."""
        if w.error is None:
            return
        level = logging.DEBUG if w.error == self.said_error else logging.ERROR
        self.said_error = w.error
        log.log(level, "worker %d pid %d cannot start: %s", w.slot + 1, w.pid, w.error)

    def schedule_respawn(self, index: int, now: float, what: str) -> None:
        slot = self.pool.slots[index]
        ceiling = backoff.ceiling(self.policy, slot.failures)
        wait = backoff.delay(self.policy, slot.failures, random.random)
        slot.respawn_at = now + wait
        log.warning("worker %d died: %s; failure %d in a row, respawn in %.3fs "
                    "(backoff ceiling %.3fs)", index + 1, what, slot.failures, wait, ceiling)

    # ---- reloads and --preload templates ------------------------------------------------

    def abort_reload(self, why: str, error: str | None = None) -> None:
        """Apply decisions.abandon_reload: the old generation serves on, the new one ends."""
        pool = self.pool
        abandon = decisions.abandon_reload(
            [o.generation for o in pool.workers.values() if o.retiring is None],
            pool.generation)
        if abandon is None:  # the verdicts that lead here saw old workers serving
            return
        log.error("reload failed: %s; keeping %d workers of the previous generation", why,
                  abandon.kept)
        self.said_error = error  # its siblings of the same generation fail the same way
        self.retire([(o, "reload-aborted") for o in pool.workers.values()
                     if o.generation == abandon.retire], self.procs.monotonic())
        pool.generation = abandon.keep
        if self.templates is not None:
            self.templates.stop_others(pool.generation)
        pool.state = State.RUNNING
        self.reload_pending = False
        self.notifier.ready(pool.status_line() + " (reload failed)")

    def template_died(self, t: Template, status: int, now: float) -> None:
        """Apply decisions.judge_template_death (Templates.died schedules a replacement)."""
        assert self.templates is not None
        pool = self.pool
        verdict, why = self.templates.died(t, status, now, decisions.TemplateDeath(
            imported=t.ready, current=t.generation == pool.generation,
            reloading=pool.state == State.RELOADING, old_serving=pool.old_serving(),
            ever_ready=pool.ever_ready, stopping=self.exit_code is not None,
            failures=self.templates.failures))
        if verdict is TemplateVerdict.ABORT_RELOAD:
            self.abort_reload(f"the new code could not be loaded: {why}")
        elif verdict is TemplateVerdict.STOP_START:
            self.begin_stop(EXIT_APP, why)

    # ---- hangs, slots, steering ---------------------------------------------------------

    def murder_workers(self) -> None:
        """Kill the hung, the slow to start and the drainers past their deadline (hangs.py)."""
        self.stack_poll = self.hangs.murder_workers(self.pool.workers.values(),
                                                    self.procs.monotonic(), self.scanned_at)

    def manage_workers(self) -> None:
        pool = self.pool
        self.steer()
        now = self.procs.monotonic()
        if self.watcher is not None:  # --reload: stopped with the master, else kept running
            self.watcher.tend(now, pool.state == State.STOPPING, self.spawner.helpers_close,
                              HANDLED)
        if pool.state == State.STOPPING:
            self.next_respawn = None
            if self.drain_at is not None and now >= self.drain_at:
                self.start_drain(now)
            if self.drain_deadline is not None:
                self.extend_systemd_timeout(now)
            return
        if self.templates is not None:
            self.templates.keep_current(pool.generation, now, self.spawner.helpers_close)
        due, waiting, leaving = pool.needs(now)
        for index in due:
            pool.slots[index].respawn_at = 0.0
            self.spawn_worker(index, now)  # a failed fork sets the slot's backoff
        self.next_respawn = min((t for i in (*due, *waiting)
                                 if (t := pool.slots[i].respawn_at) > now), default=None)
        self.retire(leaving, now)
        self.update_state()

    def steer(self) -> None:
        """Point the SO_REUSEPORT groups at the slots whose worker is ready and staying.

        Called every turn (a death, a READY or a missed beat each end a wait) and before
        any SIGTERM; it costs a setsockopt only when the set changed. A slot left out
        keeps its socket (held here), so what was queued on it waits for the slot's next
        worker. Silences are measured as of the last read of the beats, never older.
        """
        if not self.listeners.groups:
            return
        ready, stalled = self.pool.steerable(self.scanned_at, STALL)
        for w in stalled:
            self.pool.stats.stalls += 1
            log.debug("worker %d pid %d: no beat for %.1fs, its loop is blocked; no new "
                      "connections for it until it beats", w.slot + 1, w.pid,
                      self.scanned_at - w.last_beat)
        if frozenset(ready) != self.pool.steered:
            self.pool.steered = frozenset(ready)
            self.listeners.steer(ready)
            log.debug("steering new connections to slots %s",
                      ", ".join(str(s + 1) for s in sorted(ready)) or "(none: kernel hash)")

    def update_state(self) -> None:
        pool = self.pool
        if pool.state == State.STARTING and pool.ready_count() >= pool.desired:
            pool.state = State.RUNNING
            log.info("all %d workers ready", pool.desired)
            self.notifier.ready(pool.status_line())
        elif pool.state == State.RELOADING and pool.reload_done():
            pool.state = State.RUNNING
            log.info("reload complete: %d workers of generation %d", pool.ready_count(),
                     pool.generation)
            if self.templates is not None:
                self.templates.stop_others(pool.generation)
            self.notifier.ready(pool.status_line())
            if self.reload_pending:
                self.reload_pending = False
                self.reload()

    # ---- what others see ----------------------------------------------------------------

    def pool_stats(self) -> PoolStats:
        return self.pool.pool_stats(self.procs.monotonic())

    def snapshot(self) -> PoolSnapshot:
        return self.pool.snapshot(self.pid, self.started_at, self.cfg.request_metrics,
                                  self.multiproc_dir)

    def readiness(self) -> tuple[bool, str]:
        return self.pool.readiness(self.stop_reason)

    def tell_systemd(self) -> None:
        running = self.pool.state in (State.RUNNING, State.RELOADING)
        self.systemd.tell(self.procs.monotonic(), self.pool.status_line() if running else None)

    def extend_systemd_timeout(self, now: float) -> None:
        """While draining legitimately takes long, tell systemd not to kill us yet."""
        end = self.drain_deadline or ((self.drain_at or now) + self.cfg.graceful_timeout
                                      + KILL_GRACE)
        self.systemd.extend_timeout(now, end)


def run_master(cfg: Config, listeners: Listeners, desired: int, multiproc_dir: str | None,
               notifier: Notifier, dump_dir: str | None = None) -> int:
    policy = backoff.Policy(cfg.backoff_initial, cfg.backoff_factor, cfg.backoff_max,
                            cfg.backoff_reset_after, cfg.crash_loop_limit)
    master = Master(cfg, listeners, desired, notifier, multiproc_dir, policy, dump_dir)
    sys.stdout.flush()
    return master.run()
