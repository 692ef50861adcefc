"""About 100 MB of Python objects built at import: the reference data a big app loads.

bench/memory.py measures what a server's workers cost when the app they import is big (a
catalogue, a routing table, a model's vocabulary). The records are ordinary containers -
dicts, lists, str, int, float - all tracked by the garbage collector, so a full collection
in a worker that did not `gc.freeze()` them touches every one of them (and dirties the
copy-on-write pages of a preloading parent), as a real app's data would.

HEAVY_APP_MB (default 100) scales the data, so the smoke test can use less; one record
costs about 600 bytes (measured with the RSS before and after building them).
"""

from __future__ import annotations

import os

BYTES_PER_RECORD = 600
MEGABYTES = int(os.environ.get("HEAVY_APP_MB", "100"))
COUNT = MEGABYTES * 1024 * 1024 // BYTES_PER_RECORD

RECORDS: dict[str, dict[str, object]] = {
    f"user-{i:07d}": {"id": i, "name": f"name {i}", "score": i * 0.5,
                      "tags": [f"t{i % 97}", f"g{i % 13}"]}
    for i in range(COUNT)
}


def lookup(i: int) -> dict[str, object] | None:
    """One record by number (what a request handler would read)."""
    return RECORDS.get(f"user-{i % max(1, COUNT):07d}")
