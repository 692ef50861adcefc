"""The pool as the master knows it: its phase, its workers and slots, and what is read from them.

The loop's verbs (master.py) change a `Pool`; /status, /metrics, /readyz and sd_notify read
it through the queries below, and the facts of a death for decisions.judge_death come from
it. No process, clock or log is touched here (the beat table is read as memory), so what
the pool looks like from outside is decided in one place and tested without processes.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from hello_cluster.errors import EXIT_APP, EXIT_RESOURCE
from hello_cluster.observe.metrics import PoolStats
from hello_cluster.observe.status_page import PoolSnapshot, SlotView, WorkerView, worker_state
from hello_cluster.supervisor import decisions
from hello_cluster.system.beats import BeatTable
from hello_cluster.system.procstat import SlotCpu
from hello_cluster.system.stackdump import StackRequest


class State(enum.Enum):
    """The pool's phase; its value is what /status and `hello-cluster status` show."""

    STARTING = "starting"  # forking the first pool; READY=1 once every worker accepts
    RUNNING = "running"
    RELOADING = "reloading"  # a rolling replacement (SIGHUP) is under way
    STOPPING = "stopping"  # draining after SIGTERM/SIGINT, or stopping a failed start


@dataclass
class Worker:
    pid: int
    slot: int
    generation: int
    fd: int
    spawned_at: float
    last_beat: float
    ready_at: float | None = None
    retiring: str | None = None  # why we are stopping it: a planned end, never backed off
    kill_at: float | None = None
    hung: bool = False
    stalled: bool = False  # silent past STALL: left out of the steering
    recycle: str | None = None  # a planned replacement asked for: max-requests, memory, lifetime
    buffer: bytes = b""
    error: str | None = None
    cell: int | None = None  # its beat cell in the shared table (None: beats by pipe)
    stack: StackRequest | None = None  # hung: its stack asked for, SIGTERM once it came
    hung_why: str = ""

    @property
    def serving(self) -> bool:
        """Ready, and neither draining nor hung: it accepts connections."""
        return self.ready_at is not None and self.retiring is None and not self.hung


@dataclass
class Slot:
    failures: int = 0
    respawn_at: float = 0.0
    restarts: int = 0  # unplanned deaths since the master started (/status)


@dataclass
class Pool:
    desired: int
    workers: dict[int, Worker] = field(default_factory=dict)
    slots: list[Slot] = field(default_factory=list)
    generation: int = 0
    state: State = State.STARTING
    stats: PoolStats = field(default_factory=PoolStats)
    steered: frozenset[int] | None = None  # the slots new connections go to
    ever_ready: bool = False  # any worker has ever been ready
    slot_cpu: SlotCpu = field(default_factory=SlotCpu)  # reaped workers' CPU, per slot

    def __post_init__(self) -> None:
        self.slots = self.slots or [Slot() for _ in range(self.desired)]
        self.stats.desired = self.desired

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.serving)

    def staying_by_slot(self) -> dict[int, list[Worker]]:
        """The workers not being retired, by slot: one pass, so a turn stays O(workers)."""
        staying: dict[int, list[Worker]] = {}
        for w in self.workers.values():
            if w.retiring is None:
                staying.setdefault(w.slot, []).append(w)
        return staying

    def needs(self, now: float) -> tuple[list[int], list[int], list[tuple[Worker, str]]]:
        """What each slot needs this turn: the slots due for a worker (none of the current
        generation, backoff over), the ones waiting out a backoff, and the workers to
        retire because their slot's successor is ready (a reload's or a recycle's)."""
        staying = self.staying_by_slot()
        due: list[int] = []
        waiting: list[int] = []
        leaving: list[tuple[Worker, str]] = []
        for index, slot in enumerate(self.slots):
            live = staying.get(index, ())
            current = [w for w in live if w.generation == self.generation and w.recycle is None]
            if not current:
                (due if now >= slot.respawn_at else waiting).append(index)
            elif any(w.ready_at is not None for w in current):
                leaving += [(w, w.recycle or "reload") for w in live if w not in current]
        return due, waiting, leaving

    def take_beats(self, table: BeatTable) -> None:
        """Each worker's last stamp from the shared beat table (a memory read), O(workers)."""
        for w in self.workers.values():
            if w.cell is not None:
                w.last_beat = max(w.last_beat, table.last_beat(w.cell))

    def old_serving(self) -> bool:
        """Workers of an older generation than the current one still serve (a reload)."""
        return any(w.generation < self.generation and w.retiring is None
                   for w in self.workers.values())

    def reload_done(self) -> bool:
        """Every staying worker is of the current generation, and enough are ready."""
        return not any(w.generation != self.generation and w.retiring is None
                       for w in self.workers.values()) and self.ready_count() >= self.desired

    def death(self, w: Worker, status: int, now: float, stopping: bool) -> decisions.Death:
        """The facts of `w`'s death (already taken out of `workers`) for judge_death."""
        exited = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        in_reload = (w.ready_at is None and w.generation == self.generation
                     and self.generation > 0 and self.state == State.RELOADING)
        return decisions.Death(
            planned=w.retiring is not None, stopping=stopping, scaled_away=w.slot >= self.desired,
            start_error=w.error is not None and exited in (EXIT_APP, EXIT_RESOURCE),
            ever_ready=self.ever_ready,
            ready_for=None if w.ready_at is None else now - w.ready_at,
            new_in_reload=in_reload, old_serving=in_reload and self.old_serving(),
            slot_alive=any(o.slot == w.slot for o in self.workers.values()),
            failures=self.slots[w.slot].failures if w.slot < len(self.slots) else 0)

    def status_line(self) -> str:
        restarts = sum(self.stats.restarts.values())
        return f"{self.ready_count()}/{self.desired} workers ready, {restarts} restarts"

    def readiness(self, stop_reason: str) -> tuple[bool, str]:
        """/readyz: whether a load balancer should send traffic here, and why (or not)."""
        ready = self.ready_count()
        if self.stats.crash_loop:
            return False, "crash loop: workers keep dying before they become ready"
        if self.state == State.STOPPING:
            return False, f"stopping: {stop_reason}"
        if ready == 0:
            return False, f"no worker ready yet (0/{self.desired})"
        return True, f"ready: {ready}/{self.desired} workers"

    def pool_stats(self, now: float) -> PoolStats:
        """The gauges of the master's registry, brought up to date."""
        s = self.stats
        s.desired = self.desired
        s.running = len(self.workers)
        s.ready = self.ready_count()
        s.steered = len(self.steered) if self.steered is not None else s.ready
        staying = self.staying_by_slot()
        s.backoff_seconds = max((sl.respawn_at - now for i, sl in enumerate(self.slots)
                                 if sl.respawn_at > now and i not in staying), default=0.0)
        return s

    def snapshot(self, pid: int, started_at: float, request_metrics: bool,
                 multiproc_dir: str | None) -> PoolSnapshot:
        """The pool as /status and the per-slot samples see it: values, not our objects."""
        return PoolSnapshot(
            pid=pid, state=self.state.value, started_at=started_at, desired=self.desired,
            ready=self.ready_count(), reloads=self.stats.reloads,
            restarts=sum(self.stats.restarts.values()), crash_loop=self.stats.crash_loop,
            request_metrics=request_metrics, multiproc_dir=multiproc_dir,
            workers=tuple(WorkerView(
                w.pid, w.slot, w.generation, w.spawned_at,
                worker_state(w.hung, w.retiring is not None, w.ready_at is not None,
                             w.stalled), w.retiring is None)
                for w in self.workers.values()),
            slots=tuple(SlotView(s.restarts, s.respawn_at) for s in self.slots),
            slot_cpu=self.slot_cpu)

    def steerable(self, seen: float, stall: float) -> tuple[set[int], list[Worker]]:
        """The slots whose worker serves and beat within `stall` of `seen` (the last read of
        the beats), and the workers that just went silent (marked stalled here)."""
        ready: set[int] = set()
        newly: list[Worker] = []
        for w in self.workers.values():
            if not w.serving or w.slot >= self.desired:
                continue
            stalled = seen - w.last_beat > stall
            if stalled and not w.stalled:
                newly.append(w)
            w.stalled = stalled
            if not stalled:
                ready.add(w.slot)
        return ready, newly
