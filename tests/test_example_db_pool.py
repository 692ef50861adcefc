"""examples/wsgi-db-pool: a WSGI app's per-worker sqlite3 pool, opened by post_fork and closed
by worker_exit, under --preload, through a rolling reload under load."""

from __future__ import annotations

import json
import signal
import sqlite3

from conftest import ROOT, Load, wait_for

EXAMPLE = ROOT / "examples" / "wsgi-db-pool"


def test_every_worker_has_its_own_pool_and_every_visit_counts_once(cluster, tmp_path) -> None:
    db = tmp_path / "visits.db"
    c = cluster("--workers", "2", "--preload", "--app", "app:app", "--hooks", "hooks",
                "--wsgi-threads", "3", "--app-dir", str(EXAMPLE),
                env={"DATABASE": str(db), "POOL_SIZE": "3"}, workers=2)
    status, _, body = c.get()
    assert status == 200 and json.loads(body)["pool"] == 3
    with Load(c.port, max_seconds=20) as load:
        wait_for(lambda: load.ok >= 20, 10, what="requests before the reload")
        c.signal(signal.SIGHUP)
        wait_for(lambda: c.log.count("ended (reload") == 2, 15, what="the reload")
        before = load.ok
        wait_for(lambda: load.ok >= before + 20, 10, what="requests after the reload")
    assert load.failures == [], load.failures[:5]
    c.signal(signal.SIGTERM)
    assert c.wait_exit(20) == 0
    with sqlite3.connect(db) as conn:
        visits = dict(conn.execute("SELECT pid, count(*) FROM visits GROUP BY pid").fetchall())
        events = conn.execute("SELECT pid, slot, generation, event, connections "
                              "FROM pool_events").fetchall()
    assert sum(visits.values()) == load.ok + 1  # each answered request counted exactly once
    opened = {pid: (slot, gen) for pid, slot, gen, event, n in events if event == "opened"}
    closed = {pid for pid, _, _, event, n in events if event == "closed" and n == 3}
    assert len(opened) == 4 and set(opened) == closed  # 2 workers x 2 generations, all closed
    assert sorted(opened.values()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert set(visits) <= set(opened) and c.pid not in opened  # workers only, never the master
