"""--gc: the worker's cyclic garbage collector, set once the app has started.

A served request allocates thousands of container objects (a Flask request about a
thousand), so with Python's default young-generation threshold of 700 the collector runs
every request or two, and with views in threads many of those objects are still alive when
it runs: they are promoted, and the older generations, which hold the whole imported app,
are walked again and again. Under load that was 5.4% of a Flask worker's CPU and 4.0% of a
FastAPI one's (perf: gc_collect_main, visit_reachable, visit_decref, the *_traverse
functions); tuned, 1.4% and 0.

Freezing what exists once the app has started (its modules, routes, pools: objects that
live as long as the worker) takes them out of every later collection, and a young
threshold of 7000 lets most request garbage die by reference count before a collection
looks at it. Cycles are still collected, only later: at most a few thousand objects'
worth of cyclic garbage waits between collections. `--gc python` keeps the interpreter's
settings, for an app that tunes the collector itself.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("hello_cluster.worker")


def tune(thresholds: tuple[int, int, int] | None) -> None:
    """Freeze the started app's heap and set the thresholds; None leaves Python's own."""
    if thresholds is None:
        return
    # No gc.collect() first: a collection writes to the header of every object it walks,
    # which copies each page the worker still shares with the master (USS 5 -> 13 MiB per
    # worker here); freeze() only splices lists. What startup garbage it freezes stays.
    gc.freeze()
    gc.set_threshold(*thresholds)
    log.debug("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), thresholds)
