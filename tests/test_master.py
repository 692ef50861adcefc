"""The master in-process, over a fake process table, as gunicorn's tests/test_arbiter.py drives
its arbiter: fork, kill, wait and the clock are the fake's (supervisor/processes.py); the
pipes, the selector, the beat table and sd_notify's socket are real. One test per row of the
restart-policy table (docs/how-it-works.md, "Restart policy"), then hangs, reloads and the
planned ends, each reached in milliseconds: no process is started and nothing sleeps. The
process tests (test_supervision.py, test_reload.py, ...) prove the wiring."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hello_cluster.config import Config
from hello_cluster.errors import EXIT_APP, EXIT_CRASH_LOOP, EXIT_OK, EXIT_RESOURCE
from hello_cluster.supervisor import backoff
from hello_cluster.supervisor.hangs import KILL_GRACE
from hello_cluster.supervisor.master import Master
from hello_cluster.supervisor.pool import State
from hello_cluster.supervisor.processes import Reaped
from hello_cluster.supervisor.wakeups import requests
from hello_cluster.system import channel as ch
from hello_cluster.system.notify import Notifier
from hello_cluster.system.sockets import Listeners
from hello_cluster.worker.process import WorkerSpec

POLICY = backoff.Policy(initial=0.1, factor=2.0, cap=30.0, reset_after=10.0,
                        crash_loop_limit=3)
USAGE = resource.struct_rusage((0.25, 0.05) + (0,) * 14)  # what wait4 says of a child
TURNS = 20  # a bound on every "until" below


@dataclass
class Child:
    """A worker as the fake has it: its end of the pipe the master forked it with."""

    pid: int
    spec: WorkerSpec
    channel: ch.WorkerChannel
    hung: bool = False  # its event loop is blocked: no beats
    signals: list[int] = field(default_factory=list)
    ended: bool = False


class FakeProcesses:
    """The process table the master sees: forks nothing, kills nothing, its own clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = 40_000
        self.children: dict[int, Child] = {}
        self.ended: list[Reaped] = []
        self.fork_error: OSError | None = None

    # ---- what the master calls (processes.ProcessTable) ------------------------------------

    def monotonic(self) -> float:
        return self.now

    def fork_worker(self, cfg: Config, spec: WorkerSpec, unblock: Iterable[int]) -> int:
        if self.fork_error is not None:
            raise self.fork_error
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        # The master closes its copy of the write end after the fork, as a child keeps its own.
        self.children[pid] = Child(pid, spec, ch.WorkerChannel(os.dup(spec.channel_fd)))
        return pid

    def kill(self, pid: int, sig: int) -> None:
        self.children[pid].signals.append(sig)

    def reap(self) -> Reaped | None:
        return self.ended.pop(0) if self.ended else None

    # ---- what the test does to its children -----------------------------------------------

    def advance(self, seconds: float) -> None:
        """Time passes; every child whose loop turns stamps its beat cell."""
        self.now += seconds
        for c in self.live():
            if not c.hung and c.spec.beats is not None:
                c.spec.beats[c.spec.beat_cell] = self.now

    def live(self) -> list[Child]:
        return [c for c in self.children.values() if not c.ended]

    def say(self, pid: int, event: bytes) -> None:
        self.children[pid].channel.send(event)

    def end(self, pid: int, status: int, error: str | None = None) -> None:
        """The child ends with wait status `status`, its last words said first."""
        child = self.children[pid]
        if error is not None:
            child.channel.error(error)
        os.close(child.channel.fd)
        child.ended = True
        self.ended.append((pid, status, USAGE))

    def exit(self, pid: int, code: int, error: str | None = None) -> None:
        self.end(pid, code << 8, error)

    def killed(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self.end(pid, sig)

    def obey(self) -> None:
        """Every child told SIGTERM or SIGKILL ends by it (a drain that finished at once)."""
        for c in self.live():
            if signal.SIGKILL in c.signals:
                self.killed(c.pid, signal.SIGKILL)
            elif signal.SIGTERM in c.signals:
                self.exit(c.pid, 0)


@dataclass
class Pool:
    master: Master
    procs: FakeProcesses
    notify: socket.socket

    def step(self) -> bool:
        """One turn of the loop: what the selector has ready now, then the verbs."""
        self.master.dispatch(0.0)
        return self.master.turn()

    def signal(self, sig: int) -> None:
        """As the C handler does: the signal number into the master's wakeup pipe."""
        os.write(self.master.wakeups.write_fd, bytes([sig]))

    def pids(self, slot: int | None = None, generation: int | None = None) -> list[int]:
        return sorted(w.pid for w in self.master.pool.workers.values()
                      if slot in (None, w.slot) and generation in (None, w.generation))

    def only(self, slot: int) -> int:
        pids = self.pids(slot)
        assert len(pids) == 1, pids
        return pids[0]

    def ready(self, pids: Iterable[int] | None = None) -> None:
        for pid in list(self.pids() if pids is None else pids):
            self.procs.say(pid, ch.READY)
        self.step()

    def started(self) -> None:
        """The first turns: the pool forked and every worker ready, state running."""
        self.step()
        self.ready()
        assert self.master.pool.state is State.RUNNING

    def notices(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return out

    def until_stopped(self) -> None:
        """Drains finish as soon as asked; the loop ends with every worker reaped."""
        for _ in range(TURNS):
            self.procs.obey()
            if not self.step():
                return
            self.procs.advance(0.1)
        raise AssertionError(f"still running: {self.master.pool.workers}")


@pytest.fixture
def make_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[Callable[..., Pool]]:
    made: list[Pool] = []
    random.seed(21)  # backoff's jitter: the same delays every run

    def make(workers: int = 2, **options: Any) -> Pool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / f"notify{len(made)}"))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", sock.getsockname())
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        procs = FakeProcesses()
        cfg = Config(**options)
        master = Master(cfg, Listeners(), workers, Notifier(), policy=POLICY, procs=procs)
        master.begin()
        pool = Pool(master, procs, sock)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        for c in pool.procs.live():
            os.close(c.channel.fd)
        for w in pool.master.pool.workers.values():
            os.close(w.fd)
        pool.master.selector.close()
        for fd in pool.master.wakeups.fds():
            os.close(fd)
        pool.notify.close()


MakePool = Callable[..., Pool]


# ---- the restart-policy table, row by row ------------------------------------------------

def test_a_first_death_respawns_at_once(make_pool: MakePool,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Row 1: the slot's first unplanned death: a new worker in the same turn, no delay."""
    pool = make_pool()
    pool.started()
    assert "READY=1" in "".join(pool.notices())
    dead, other = pool.only(0), pool.only(1)
    pool.procs.killed(dead)
    pool.step()
    respawned = pool.only(0)
    assert respawned != dead and pool.only(1) == other
    assert pool.master.pool.slots[0].failures == 1 and pool.master.pool.slots[0].restarts == 1
    assert pool.master.pool.stats.restarts["signal"] == 1
    assert f"pid {dead} signal, killed by SIGKILL" in caplog.text
    assert "respawn in 0.000s" in caplog.text


def test_ready_past_reset_after_makes_a_death_a_first_one_again(make_pool: MakePool) -> None:
    """Row 1, the second half: ready for --backoff-reset-after proves the slot healthy."""
    pool = make_pool()
    pool.started()
    pool.master.pool.slots[0].failures = 5
    pool.procs.advance(POLICY.reset_after)
    pool.procs.exit(pool.only(0), 1)
    pool.step()
    assert pool.master.pool.slots[0].failures == 1 and len(pool.pids(0)) == 1


def test_the_same_slot_failing_again_backs_off_alone(make_pool: MakePool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Row 2: initial * factor^(n-2) with full jitter; the other slot is not delayed."""
    pool = make_pool()
    pool.started()
    waited = []
    for failure in (1, 2, 3):
        pool.procs.exit(pool.only(0), 1)
        pool.step()
        slot = pool.master.pool.slots[0]
        assert slot.failures == failure
        wait = slot.respawn_at - pool.procs.now if slot.respawn_at else 0.0  # 0: forked
        assert 0 <= wait <= backoff.ceiling(POLICY, failure)
        if wait > 0:
            waited.append(failure)
            assert pool.pids(0) == []  # waiting: nothing forked before its time
            assert pool.master.pool_stats().backoff_seconds == pytest.approx(wait)
            pool.procs.advance(wait)
            pool.step()
        pool.ready(pool.pids(0))
        assert len(pool.pids(1)) == 1 and pool.master.pool.slots[1].failures == 0
    assert waited == [2, 3]  # with this seed's jitter; the first failure never waits
    assert "failure 3 in a row" in caplog.text and "backoff ceiling 0.200s" in caplog.text


def test_boot_deaths_in_a_row_are_a_crash_loop(make_pool: MakePool,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Row 3: --crash-loop-limit workers in a row die before ever being ready: exit 5."""
    pool = make_pool()
    pool.step()
    for _ in range(POLICY.crash_loop_limit):
        pid = pool.pids()[0]
        pool.procs.exit(pid, 1)
        pool.procs.advance(POLICY.initial * 4)  # past any backoff so far
        pool.step()
    master = pool.master
    assert master.exit_code == EXIT_CRASH_LOOP and master.pool.state is State.STOPPING
    assert master.pool.stats.crash_loop and not master.readiness()[0]
    assert f"crash loop: 3 workers in a row died before becoming ready; the last (pid {pid}) " \
           "exit status 1; giving up" in caplog.text
    assert any("STOPPING=1" in n for n in pool.notices())
    pool.until_stopped()
    assert sum(master.pool.stats.restarts.values()) == 3


@pytest.mark.parametrize(("code", "error"), [
    (EXIT_APP, "--app nope:app: No module named 'nope'"),  # row 4: the app cannot be loaded
    (EXIT_RESOURCE, "cannot drop privileges to --user nobody2: no such user"),  # row 5
])
def test_a_start_that_cannot_succeed_stops_at_once(make_pool: MakePool, code: int,
                                                   error: str) -> None:
    """Rows 4 and 5: before any worker was ready, one says why and exits 4 or 6: the
    master exits with that code, says why once (the exit line's reason), no retries."""
    pool = make_pool()
    pool.step()
    first, other = pool.pids()
    pool.procs.exit(first, code, error)
    pool.step()
    master = pool.master
    assert master.exit_code == code and master.stop_reason == error
    assert pool.pids() == [other] and sum(master.pool.stats.restarts.values()) == 0
    assert signal.SIGTERM in pool.procs.children[other].signals  # drained, not waited for
    pool.until_stopped()
    assert len(pool.procs.children) == 2  # nothing respawned


def test_a_reloads_new_workers_that_cannot_start_keep_the_old_ones(
        make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    """Row 6: the reload is abandoned, the old generation serves on, the new one drains."""
    pool = make_pool()
    pool.started()
    old = pool.pids()
    pool.notices()
    pool.signal(signal.SIGHUP)
    pool.step()
    assert pool.master.pool.state is State.RELOADING and pool.master.pool.generation == 1
    new = pool.pids(generation=1)
    assert len(new) == 2
    pool.procs.exit(new[0], EXIT_APP, "--app main:app: SyntaxError: invalid syntax")
    pool.signal(signal.SIGHUP)  # came during the failing reload: dropped with it
    pool.step()
    master = pool.master
    assert master.pool.state is State.RUNNING and master.pool.generation == 0
    assert "reload failed: new worker pid" in caplog.text
    assert "keeping 2 workers of the previous generation" in caplog.text
    assert pool.procs.children[new[1]].signals == [signal.SIGTERM]
    assert all(pool.procs.children[pid].signals == [] for pid in old)
    assert any("(reload failed)" in n for n in pool.notices())
    pool.procs.obey()
    pool.step()
    assert pool.pids() == old and sum(master.pool.stats.restarts.values()) == 0
    assert master.pool.state is State.RUNNING and not master.reload_pending


def test_a_reload_replaces_every_worker_and_the_old_ends_are_planned(make_pool: MakePool
                                                                     ) -> None:
    """Row 7, reload: each old worker drains once its slot's new one is ready."""
    pool = make_pool()
    pool.started()
    old = pool.pids()
    pool.signal(signal.SIGHUP)
    pool.step()
    new = pool.pids(generation=1)
    pool.ready([new[0]])
    assert pool.procs.children[old[0]].signals == [signal.SIGTERM]  # slot 1's old one
    assert pool.procs.children[old[1]].signals == []  # its successor is not ready yet
    pool.ready([new[1]])
    pool.procs.obey()
    pool.step()
    master = pool.master
    assert pool.pids() == new and master.pool.state is State.RUNNING
    assert sum(master.pool.stats.restarts.values()) == 0 and master.pool.stats.reloads == 1
    assert [s.failures for s in master.pool.slots] == [0, 0]


def test_scale_down_and_up_are_planned(make_pool: MakePool) -> None:
    """Row 7, SIGTTOU and SIGTTIN: the slot scaled away is drained and not respawned."""
    pool = make_pool()
    pool.started()
    gone = pool.only(1)
    pool.signal(signal.SIGTTOU)
    pool.step()
    assert pool.master.pool.desired == 1
    assert pool.procs.children[gone].signals == [signal.SIGTERM]
    pool.procs.obey()
    pool.step()
    assert pool.pids(1) == [] and sum(pool.master.pool.stats.restarts.values()) == 0
    pool.signal(signal.SIGTTIN)
    pool.step()
    assert len(pool.pids(1)) == 1 and pool.master.pool.desired == 2


def test_max_requests_recycles_with_the_replacement_ready_first(make_pool: MakePool) -> None:
    """Row 7, recycling: counted as a recycle, never as a restart."""
    pool = make_pool()
    pool.started()
    tired = pool.only(0)
    pool.procs.say(tired, ch.RECYCLE)
    pool.step()
    successor = [p for p in pool.pids(0) if p != tired]
    assert len(successor) == 1 and pool.procs.children[tired].signals == []
    pool.ready(successor)
    assert pool.procs.children[tired].signals == [signal.SIGTERM]
    pool.procs.obey()
    pool.step()
    master = pool.master
    assert pool.pids(0) == successor and master.pool.stats.recycles["max_requests"] == 1
    assert sum(master.pool.stats.restarts.values()) == 0


def test_a_death_while_the_replacement_starts_is_not_doubled(make_pool: MakePool) -> None:
    """Counted (it was not planned), but its successor is already running: no fork."""
    pool = make_pool()
    pool.started()
    tired = pool.only(0)
    pool.procs.say(tired, ch.RECYCLE)
    pool.step()
    forks = len(pool.procs.children)
    pool.procs.killed(tired, signal.SIGSEGV)
    pool.step()
    assert len(pool.procs.children) == forks and len(pool.pids(0)) == 1
    assert pool.master.pool.stats.restarts["signal"] == 1


def test_shutdown_serves_through_the_delay_then_drains(make_pool: MakePool,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """Row 7, shutdown: SIGTERM; a death before the drain is not respawned."""
    pool = make_pool(shutdown_delay=5.0)
    pool.started()
    pool.signal(signal.SIGTERM)
    pool.step()
    master = pool.master
    assert master.exit_code == EXIT_OK and not master.readiness()[0]
    assert all(c.signals == [] for c in pool.procs.live())  # still serving
    pool.procs.killed(pool.only(0))  # dies on its own meanwhile
    pool.step()
    assert pool.pids(0) == [] and "not respawned (stopping or scaled down)" in caplog.text
    pool.procs.advance(5.0)
    pool.step()
    assert pool.procs.children[pool.only(1)].signals == [signal.SIGTERM]
    pool.until_stopped()
    assert sum(master.pool.stats.restarts.values()) == 0


# ---- hangs and timeouts -----------------------------------------------------------------

def test_a_silent_worker_is_killed_and_respawned_as_a_timeout(
        make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(worker_timeout=1.0)
    pool.started()
    stuck = pool.procs.children[pool.only(0)]
    stuck.hung = True
    for _ in range(TURNS):
        pool.procs.advance(0.25)
        pool.step()
        if stuck.signals:
            break
    assert stuck.signals == [signal.SIGTERM] and pool.procs.children[pool.only(1)].signals == []
    assert f"worker 1 pid {stuck.pid} silent for" in caplog.text
    pool.procs.advance(KILL_GRACE)
    pool.step()
    assert stuck.signals == [signal.SIGTERM, signal.SIGKILL]  # it ignored the SIGTERM
    pool.procs.killed(stuck.pid)
    pool.step()
    assert pool.master.pool.stats.restarts["timeout"] == 1 and len(pool.pids(0)) == 1


def test_a_worker_not_ready_within_the_startup_timeout_is_killed(make_pool: MakePool,
                                                                 caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    """Before READY only --startup-timeout applies: silence while importing is no hang."""
    pool = make_pool(startup_timeout=3.0, worker_timeout=1.0)
    pool.step()
    slow = pool.procs.children[pool.only(0)]
    pool.ready([pool.only(1)])
    pool.procs.advance(2.5)
    pool.step()
    assert slow.signals == []
    pool.procs.advance(1.0)
    pool.step()
    assert slow.signals == [signal.SIGTERM]
    assert "(--startup-timeout)" in caplog.text


def test_a_failed_fork_is_a_failure_of_its_slot(make_pool: MakePool,
                                                caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(workers=1)
    pool.procs.fork_error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    pool.step()
    assert pool.pids() == [] and pool.master.pool.slots[0].failures == 1
    assert "fork failed: Resource temporarily unavailable" in caplog.text
    pool.procs.fork_error = None
    pool.procs.advance(backoff.ceiling(POLICY, 1))
    pool.step()
    assert len(pool.pids()) == 1


def test_a_burst_of_signals_is_read_as_one_request_each() -> None:
    """supervisor/wakeups.requests: HUP x3 is one reload, each TTIN/TTOU counts, no CHLD."""
    burst = [signal.SIGHUP, signal.SIGCHLD, signal.SIGTTIN, signal.SIGHUP, signal.SIGTTIN,
             signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM]
    assert requests(burst) == [signal.SIGHUP, signal.SIGTTIN, signal.SIGTTIN, signal.SIGTERM]


def test_a_hup_burst_through_the_pipe_is_one_reload(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.started()
    for _ in range(50):
        pool.signal(signal.SIGHUP)
    pool.step()
    assert pool.master.pool.stats.reloads == 1 and not pool.master.reload_pending
