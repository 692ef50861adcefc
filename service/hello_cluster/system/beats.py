"""Heartbeats through shared memory: each worker stamps its own cell, the master reads them
on its own schedule.

A heartbeat used to be one byte down each worker's pipe every 0.1 s. Every byte woke the
master, and every wake-up looked at the whole pool: with N workers that is 10*N wake-ups a
second, each costing O(N), so the idle master's CPU grew with the square of the pool
(67% of a core at 128 workers). Here a worker's beat is a plain store of
`time.monotonic()` into its cell of one anonymous `MAP_SHARED` mapping, made by the master
before the first fork and inherited by every worker: no syscall for the worker, no
wake-up for the master. The master reads the cells of its live workers every `SCAN`
seconds, so its cost is O(N) per scan and a fixed number of scans per second, whatever the
workers do. CLOCK_MONOTONIC is one clock for every process on the machine, so the master
compares the stamps with its own `time.monotonic()`.

What the pipe gave for free still holds: the stamp is written from the worker's event loop
(the uvicorn tick), so a loop blocked by a synchronous call stops stamping, exactly as it
stopped writing the pipe. READY, RECYCLE and start-up errors stay on the pipe: they are
rare, and the master must act on them at once.

A cell belongs to one worker from its spawn to its reaping, and is handed out again only
after the worker is gone, so no two live processes ever write the same cell. An aligned
8-byte store is not torn on the machines CPython runs on; a torn read could only make a
worker look silent for one scan, which the next scan corrects.
"""

from __future__ import annotations

import mmap
import time

CELL = 8  # one float64 per worker
# How often the master reads the cells. The stall rule (STALL in master.py, three missed
# 0.1 s beats) is detected at most one scan late.
SCAN = 0.1


class BeatTable:
    """The shared cells and their owners; the master allocates, workers only stamp."""

    def __init__(self, cells: int) -> None:
        self.cells = cells
        self._map = mmap.mmap(-1, cells * CELL, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map).cast("d")
        self._free = list(range(cells - 1, -1, -1))  # pop() hands out the lowest first

    def allocate(self, now: float) -> int | None:
        """A free cell stamped `now` (a new worker counts as just beaten), or None when
        every cell is taken; such a worker beats through its pipe instead."""
        if not self._free:
            return None
        cell = self._free.pop()
        self.view[cell] = now
        return cell

    def release(self, cell: int | None) -> None:
        """The worker that owned `cell` has been reaped: nobody writes it any more."""
        if cell is not None:
            self._free.append(cell)

    def last_beat(self, cell: int) -> float:
        return float(self.view[cell])

    @property
    def in_use(self) -> int:
        return self.cells - len(self._free)


class Beater:
    """The worker's side: one store per tick of its event loop."""

    def __init__(self, view: memoryview[float], cell: int) -> None:
        self._view = view
        self._cell = cell

    def beat(self) -> None:
        self._view[self._cell] = time.monotonic()
